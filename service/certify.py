"""The per-answer certificate: is the predicted label the label of every image within eps?

A model with a bound graph (`certify.onnx` beside `model.onnx`, written by `notsure certify
export`) gets, for each input x and the manifest's radius eps, lower bounds M[c, j] of
s_c(x') - s_j(x') of the served logits s over every x' with |x' - x|_inf <= eps, 0 <= x' <= 1
(interval bound propagation). The answer c is *certified* when M[c, j] > 0 for every j != c:
no image in that ball gets another label. Since a clean image an attacker starts from lies in the
ball around the attacked image, an accepted certified answer can never be a label the attack
changed from a correctly labelled clean image.

With `certify_required` in the manifest, an answer is accepted only when its score passes T and
it is certified (`service.scoring.decide`); otherwise the certificate is reported beside it.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from service.manifest import CERTIFY_FILE, Manifest
from service.preprocess import GraphMismatch
from service.runtime import Device, cuda_driver_present, select_providers, session_options
from service.scoring import Scores

Margins = npt.NDArray[np.float32]  # (B, L, L): [b, c, j] a lower bound of s_c - s_j
INPUTS = ("input", "eps")
MARGINS = "margins"
PIECE = 512  # images per run of the bound graph; a service batch is one piece


class CertifyLoadError(ValueError):
    """The bound graph is missing, altered or not the manifest's; the message says which."""


def certified_labels(margins: Margins) -> npt.NDArray[np.bool_]:
    """(B, L): True where class c is the label of every point of the ball."""
    m = np.array(margins, dtype=np.float32)
    idx = np.arange(m.shape[1])
    m[:, idx, idx] = np.inf  # the diagonal (c against itself, 0) does not count
    return np.asarray(m.min(axis=2) > 0)


def certified_answers(margins: Margins, labels: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """(B,): True where the answered label is certified on its image's ball."""
    return np.asarray(certified_labels(margins)[np.arange(len(labels)), labels])


class CertifyGraph:
    """One onnxruntime session of a bound graph, checked against the manifest; thread-safe."""

    def __init__(
        self, graph: bytes, manifest: Manifest, device: Device = "cpu", intra_op_threads: int = 0
    ) -> None:
        import onnxruntime as ort

        if manifest.certify_eps is None:
            raise CertifyLoadError("the manifest names no certify_eps")
        self.eps = float(manifest.certify_eps)
        self.required = manifest.certify_required
        self.num_classes = manifest.num_classes
        available = ort.get_available_providers()
        providers = select_providers(device, available, cuda_driver_present())
        self.session = ort.InferenceSession(
            graph, sess_options=session_options(intra_op_threads), providers=providers
        )
        _check(self.session, manifest)

    def certify(
        self, x: npt.NDArray[np.float32], labels: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.bool_]:
        """(B, C, H, W) pixels in [0, 1] and their answered labels -> (B,) certified."""
        return certified_answers(self.margins(x), labels)

    def margins(self, x: npt.NDArray[np.float32]) -> Margins:
        """(B, C, H, W) -> (B, L, L) margin bounds at the manifest's radius; in pieces of
        `PIECE` images, so that an offline caller's thousands of images stay in memory."""
        out = [np.zeros((0, self.num_classes, self.num_classes), np.float32)]
        for i in range(0, len(x), PIECE):
            part = x[i : i + PIECE]
            eps = np.full((part.shape[0],), self.eps, np.float32)
            (m,) = self.session.run([MARGINS], {"input": part, "eps": eps})
            out.append(np.asarray(m, np.float32))
        return np.concatenate(out)


def with_certificate(
    scores: Scores, x: npt.NDArray[np.float32], certifier: CertifyGraph | None
) -> Scores:
    """The scores of the batch x (B, C, H, W) as the service serves them: with a bound graph,
    whether each answered label is certified at its radius and whether `decide` requires it;
    without one, unchanged. The service and the audit both call this."""
    if certifier is None:
        return scores
    return replace(
        scores,
        certified=certifier.certify(x, scores.label),
        certify_eps=certifier.eps,
        certificate_required=certifier.required,
    )


def _check(session: object, manifest: Manifest) -> None:
    inputs = {i.name: i for i in session.get_inputs()}  # type: ignore[attr-defined]
    outputs = {o.name: o for o in session.get_outputs()}  # type: ignore[attr-defined]
    fix = "re-export it with notsure certify export"
    if set(inputs) != set(INPUTS) or MARGINS not in outputs:
        raise GraphMismatch(
            f"certify.onnx takes {sorted(inputs)} and gives {sorted(outputs)}, not a bound "
            f"graph (inputs input and eps, output margins); {fix}"
        )
    got = tuple(inputs["input"].shape[1:])
    if got != tuple(manifest.input_shape):
        raise GraphMismatch(
            f"certify.onnx takes images of {got}, the manifest says {tuple(manifest.input_shape)}; "
            f"{fix}"
        )
    n = manifest.num_classes
    shape = tuple(outputs[MARGINS].shape[1:])
    if shape != (n, n):
        raise GraphMismatch(f"certify.onnx gives margins of {shape} for {n} classes; {fix}")


def load_certifier(
    manifest: Manifest, folder: Path, device: Device = "cpu", intra_op_threads: int = 0
) -> CertifyGraph | None:
    """The version's bound graph when its manifest names one, verified as strictly as the model:
    the file's sha256 against the manifest, its inputs and outputs against the manifest."""
    if manifest.certify_eps is None:
        return None
    path = folder / CERTIFY_FILE
    if not path.is_file():
        raise CertifyLoadError(
            f"the manifest names a certificate at eps {manifest.certify_eps} but {CERTIFY_FILE} "
            "is missing; run notsure certify export"
        )
    graph = path.read_bytes()  # hashed and loaded from the same bytes
    if hashlib.sha256(graph).hexdigest() != manifest.certify_sha256:
        raise CertifyLoadError(
            f"{CERTIFY_FILE} does not match the manifest's certify_sha256 (corrupt or replaced); "
            "refusing to load it"
        )
    try:
        return CertifyGraph(graph, manifest, device, intra_op_threads)
    except GraphMismatch as exc:
        raise CertifyLoadError(str(exc)) from exc
