"""The certificate as a second ONNX graph, `certify.onnx` beside `model.onnx`, so that
onnxruntime computes it without torch.

Inputs: `input` (B, C, H, W) float32 pixels in [0, 1] and `eps` (B,) float32, one L-inf radius
per image. Outputs, all over the ball cut to [0, 1] (see bounds.py):
  `margins` (B, L, L): [b, c, j] a lower bound of s_c - s_j of the served logits s; the answer
      c is certified on the ball iff margins[b, c, j] > 0 for every j != c;
  `lower`, `upper` (B, L): bounds of each served logit.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from service.manifest import CERTIFY_FILE
from training.certify.bounds import BoundNet, head_bounds, input_box, propagate, served_sign
from training.losses import Objective
from training.nets import SimpleCNN

log = logging.getLogger(__name__)

INPUTS = ("input", "eps")
OUTPUTS = ("margins", "lower", "upper")
# Parity tolerance, relative to the largest bound: the graph sums the same terms in another
# order than torch, so the two differ by float32 rounding only.
PARITY_TOLERANCE = 1e-5


class ParityError(RuntimeError):
    """The exported bound graph does not compute what the torch bounds compute."""


@dataclass(frozen=True)
class GraphBounds:
    margins: npt.NDArray[np.float32]  # (B, L, L)
    lower: npt.NDArray[np.float32]  # (B, L)
    upper: npt.NDArray[np.float32]  # (B, L)


class Negate(nn.Module):
    """y = -x as a 1x1 depthwise convolution: onnxruntime keeps it, and the addition that
    follows it, in its blocked (NCHWc) convolution layout, where a subtraction is not."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("weight", -torch.ones(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, groups=self.weight.shape[0])


class CornerConvStack(nn.Module):
    """IBP through a Conv2d / ReLU / MaxPool2d chain, written for onnxruntime's CPU kernels.

    The same bounds as bounds.propagate (the parity check compares them), in another form: each
    convolution takes u + l and u - l and returns the corners C + Rn and C - Rn of its box (C the
    centre, Rn = -radius, from the weights -|W|/2), and every subtraction between two
    convolution outputs is an addition of a Negate. onnxruntime then runs the whole chain in
    its blocked layout and fuses the negations with the additions and ReLUs that follow them;
    the centre/radius form with subtractions makes it reorder every tensor back and forth."""

    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__()
        self.layers = layers
        self.negate = nn.ModuleList(
            Negate(m.out_channels) for m in layers if isinstance(m, nn.Conv2d)
        )

    def forward(self, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k = 0
        for m in self.layers:
            if isinstance(m, nn.Conv2d):
                # The first convolution reads the image's box (plain layout): subtract there.
                diff = upper - lower if k == 0 else upper + self.negate[k - 1](lower)
                args = (m.stride, m.padding, m.dilation, m.groups)
                centre = F.conv2d(upper + lower, m.weight * 0.5, m.bias, *args)
                neg_radius = F.conv2d(diff, m.weight.abs() * -0.5, None, *args)
                lower, upper = centre + neg_radius, centre + self.negate[k](neg_radius)
                k += 1
            elif isinstance(m, (nn.ReLU, nn.MaxPool2d)):
                lower, upper = m(lower), m(upper)  # monotone increasing
            else:
                raise TypeError(f"{type(m).__name__} in a convolution stack")
        return lower, upper


class ExportBoundNet(nn.Module):
    """What `certify.onnx` computes: bounds.BoundNet's bounds; for the SmallCNN, its convolution
    stack through CornerConvStack (the costly part of the graph), the rest as in bounds.py."""

    def __init__(self, net: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.net, self.objective = net, objective
        self.generic = BoundNet(net, objective)
        self.stack = CornerConvStack(net.conv) if isinstance(net, SimpleCNN) else None

    def forward(
        self, x: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.stack is None:
            return self.generic(x, eps)
        lower, upper = input_box(x, eps)
        norm = self.net.normalize
        lower, upper = self.stack(norm(lower), norm(upper))  # std > 0: monotone increasing
        box = propagate(self.net.mlp, (lower, upper))
        b = head_bounds(self.net.fc, box, served_sign(self.objective))
        return b.margins, b.lower, b.upper


def export_certify_graph(
    net: nn.Module,
    objective: Objective,
    input_shape: tuple[int, int, int],
    path: Path,
    opset: int = 18,
) -> None:
    """Export the IBP bound computation of net (eval mode) with a dynamic batch axis."""
    import onnx

    bound_net = ExportBoundNet(net.eval(), objective).eval()
    dummy = (torch.rand((2, *input_shape)), torch.full((2,), 0.1))
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        # Both inputs share the batch axis on purpose; the exporter says so once per export.
        warnings.filterwarnings("ignore", message=".*axis name: batch will not be used.*")
        program = torch.onnx.export(
            bound_net,
            dummy,
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            dynamic_shapes=({0: batch}, {0: batch}),
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    tmp = path.with_suffix(".tmp")
    program.save(str(tmp), external_data=False)  # one self-contained file, like model.onnx
    onnx.checker.check_model(onnx.load(str(tmp)), full_check=True)
    tmp.replace(path)


def session(path: Path) -> object:
    """An onnxruntime CPU session of a bound graph."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_graph(sess: object, x: npt.NDArray[np.float32], eps: float) -> GraphBounds:
    """Bounds from the ONNX graph for images x (B, C, H, W) at one radius."""
    feeds = {"input": x.astype(np.float32), "eps": np.full((x.shape[0],), eps, np.float32)}
    margins, lower, upper = sess.run(list(OUTPUTS), feeds)  # type: ignore[attr-defined]
    return GraphBounds(np.asarray(margins), np.asarray(lower), np.asarray(upper))


def check_parity(
    net: nn.Module, objective: Objective, path: Path, x: torch.Tensor, eps: float
) -> float:
    """Largest difference between the graph's and torch's bounds, relative to the largest bound;
    raises ParityError above PARITY_TOLERANCE."""
    from training.certify.bounds import ibp

    with torch.no_grad():
        want = ibp(net.eval(), x, eps, objective)
    got = run_graph(session(path), x.numpy(), eps)
    worst = 0.0
    for name in OUTPUTS:
        ref = getattr(want, name).numpy()
        scale = max(float(np.abs(ref).max()), 1.0)
        worst = max(worst, float(np.abs(getattr(got, name) - ref).max()) / scale)
    if worst > PARITY_TOLERANCE:
        raise ParityError(
            f"{path}: bounds differ from torch's by {worst:.2e} of the largest bound "
            f"(> {PARITY_TOLERANCE}); re-export with `notsure certify export`"
        )
    log.info("%s: parity with torch %.2e (relative) at eps %g", path, worst, eps)
    return worst


def export_model(
    model_dir: Path,
    parity_images: int = 64,
    eps: float | None = None,
    required: bool | None = None,
) -> tuple[Path, float]:
    """Write models/<name>/<version>/certify.onnx from the version's weights, check it against
    torch at eps 0, 0.1 and 0.3 on synthetic images, and record it in the manifest: its sha256,
    and, when given, the radius `eps` the service certifies each answer at and whether an
    answer `required` the certificate to be accepted (else the manifest's values stay).
    Returns (path, worst parity)."""
    from service.manifest import MANIFEST_FILE, Manifest
    from training.data import synthetic
    from training.modelio import load_torch_model

    net, manifest = load_torch_model(model_dir)
    objective: Objective = manifest.objective
    path = model_dir / CERTIFY_FILE
    export_certify_graph(net, objective, manifest.input_shape, path)
    x = synthetic(parity_images, seed=11, shape=manifest.input_shape).x
    try:
        worst = max(check_parity(net, objective, path, x, e) for e in (0.0, 0.1, 0.3))
    except ParityError:
        path.unlink(missing_ok=True)  # never leave a graph behind that disagrees with torch
        raise
    update = {"certify_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if eps is not None:
        update["certify_eps"] = eps
    if required is not None:
        update["certify_required"] = required
    fields = {**manifest.model_dump(), **update}
    new = Manifest.model_validate(fields)  # e.g. required without an eps is refused here
    tmp = model_dir / (MANIFEST_FILE + ".tmp")
    new.save(tmp)
    tmp.replace(model_dir / MANIFEST_FILE)
    return path, worst
