"""The audit's check of the certificate's soundness: a certified win is a bug in the bounds.

An audit win is an accepted wrong answer c at an adversarial image x'. When c is certified at
radius eps (`service.certify`), every image within eps of x' (L-inf, pixels in [0, 1]) gets the
label c. If the clean original x lies within eps of x' and the model labels x correctly (y, and
y != c since the answer is wrong), the certificate claimed something false. The same holds for
an image the bounds declare *certified handled* at eps around x (`training.certify.accuracy`):
no image within eps of x may then be a win.

Such a win raises `UnsoundCertificate`, never a log line: every figure the audit and the
service report with a certificate rests on the bounds. The runner saves a chunk before its rows
are built, so the adversarial image stays on disk to look at.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from training.audit.subject import Model

# The attacks' images sit on the sphere |x' - x|_inf = eps up to float32 rounding of x + delta
# (one unit in the last place at 1.0 is 2^-23): those count as inside the ball.
SLACK = 2.0**-23

Bools = npt.NDArray[np.bool_]


class UnsoundCertificate(RuntimeError):
    """An accepted wrong answer that the bounds say cannot exist; the message names the model,
    the job, the image and how far inside the certified ball its clean original lies."""

    def __init__(
        self, model: str, job: str, image: int, margin: float, linf: float, eps: float, why: str
    ) -> None:
        self.model, self.job, self.image = model, job, image
        self.margin, self.linf, self.eps = margin, linf, eps
        super().__init__(
            f"unsound certificate: {model}, job {job}, image {image}: an attack won it with "
            f"{why} at eps {eps:g}, and its correctly labelled clean original lies at L-inf "
            f"{linf:.6g}, inside that ball by a margin of {margin:.3g}. The bounds "
            "(training/certify/bounds.py, certify.onnx) are wrong for this image; do not "
            "report certified figures for this model until it is found"
        )


def check_wins(
    model: str,
    job: str,
    idx: npt.NDArray[np.int64],
    won: Bools,
    covered: Bools,
    linf: npt.NDArray[np.floating],
    eps: float,
    why: str,
) -> int:
    """Raise `UnsoundCertificate` for the first image won although `covered` (the bounds rule
    out a win there) and within eps of its clean original; returns how many covered images
    within eps were checked."""
    inside = covered & (np.asarray(linf, np.float64) <= eps + SLACK)
    bad = np.flatnonzero(won & inside)
    if len(bad):
        i = int(bad[0])
        d = float(linf[i])
        raise UnsoundCertificate(model, job, int(idx[i]), eps - d, d, eps, why)
    return int(inside.sum())


def check_certified_wins(
    model: Model,
    job: str,
    idx: npt.NDArray[np.int64],
    won: Bools,
    certified: Bools,
    linf: npt.NDArray[np.floating],
    eps: float,
) -> int:
    """The check on wins whose answer is certified on the ball around the adversarial image:
    `won`, `certified` and `linf` (to the clean original) per image `idx` of the model's test
    images. Returns how many certified wins had their clean original in the ball (all of them
    on clean images the model labels wrongly, or this raises)."""
    suspect = np.flatnonzero(won & certified & (np.asarray(linf, np.float64) <= eps + SLACK))
    right = np.zeros(len(idx), dtype=bool)
    if len(suspect):  # the clean originals' labels, for the few images that need them
        x = model.data.x[idx[suspect]].numpy()
        y = model.data.y[idx[suspect]].numpy()
        right[suspect] = model.served(x, certify=False).label == y
    check_wins(model.name, job, idx, won, certified & right, linf, eps, "a certified answer")
    return len(suspect)
