"""`notsure export`: a run folder -> models/<name>/<version>/{model.onnx, weights, provenance}.

The ONNX graph's first output, `logits`, is the vector fed to the softmax at test time (-Z for
RCE, Z for CE); the second, `features`, is the final hidden vector (for the K-density score).
Both have a dynamic batch axis, in one self-contained file. Parity with PyTorch is asserted on
real inputs for both.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from service.manifest import MODEL_FILE, WEIGHTS_FILE
from service.runtime import FEATURES_OUTPUT
from service.scoring import softmax
from training import data as data_mod
from training.losses import Objective, served_logits
from training.nets import build_net
from training.train import CONFIG_FILE, RESULT_FILE

log = logging.getLogger(__name__)

PROVENANCE_FILE = "training.json"
INPUT_NAME, OUTPUT_NAME, FEATURES_NAME = "input", "logits", FEATURES_OUTPUT
PARITY_TOLERANCE = 1e-5
FEATURES_TOLERANCE = 1e-4  # relative to the largest feature value


class ServedNet(nn.Module):
    """Wraps a network so that its output is what the service feeds to the softmax."""

    def __init__(self, net: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.net, self.objective = net, objective

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return served_logits(self.objective, self.net(x))  # (B, C, H, W) -> (B, L)


class ExportedNet(nn.Module):
    """What the ONNX graph computes: the served logits and the final hidden vector."""

    def __init__(self, net: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.net, self.objective = net, objective

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.net.features(x)  # (B, C, H, W) -> (B, D)
        return served_logits(self.objective, self.net.fc(feats)), feats  # (B, L), (B, D)


@dataclass(frozen=True)
class ExportConfig:
    run_dir: Path
    name: str
    version: int = 1
    models_dir: Path = Path("models")
    opset: int = 18
    parity_samples: int = 256


@dataclass(frozen=True)
class ExportResult:
    model_dir: Path
    max_prob_diff: float


def load_run(run_dir: Path) -> tuple[nn.Module, dict[str, object], dict[str, object]]:
    """The trained network of a run folder, in eval mode, with its config and result."""
    cfg = json.loads((run_dir / CONFIG_FILE).read_text())
    result = json.loads((run_dir / RESULT_FILE).read_text())
    net = build_net(str(cfg["arch"]), _dataset_shape(str(cfg["dataset"])), 10)
    net.load_state_dict(load_file(str(run_dir / WEIGHTS_FILE)))
    return net.eval(), cfg, result


def _dataset_shape(name: str) -> tuple[int, int, int]:
    return (3, 32, 32) if name == "cifar10" else (1, 28, 28)


def parity_inputs(cfg: dict[str, object], n: int) -> torch.Tensor:
    """Real test images when the data set is at hand, the synthetic set for dry runs."""
    if cfg["dry_run"] or cfg["dataset"] == "synthetic":
        return data_mod.synthetic(n, seed=3).x
    test = data_mod.load(str(cfg["dataset"]), Path(str(cfg["data_dir"])), train=False)
    return test.x[:n]


def onnx_logits(path: Path, x: np.ndarray) -> np.ndarray:
    return onnx_outputs(path, x)[0]


def onnx_outputs(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, features) of the exported graph on x, on the CPU."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    z, f = sess.run([OUTPUT_NAME, FEATURES_NAME], {INPUT_NAME: x.astype(np.float32)})
    return np.asarray(z), np.asarray(f)


def export_onnx(
    served: ExportedNet, input_shape: tuple[int, int, int], path: Path, opset: int
) -> None:
    """Export with a dynamic batch axis and check the graph fully with onnx.checker."""
    import onnx

    dummy = torch.zeros((2, *input_shape))
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(
        served,
        (dummy,),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME, FEATURES_NAME],
        dynamic_shapes=({0: batch},),
        opset_version=opset,
        dynamo=True,
        verbose=False,
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    # One self-contained file: weights inline, no external data (the model is ~2 MB).
    program.save(str(path), external_data=False)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)


def export(cfg: ExportConfig) -> ExportResult:
    """Export a run folder into the model repository and check parity with PyTorch."""
    net, train_cfg, result = load_run(cfg.run_dir)
    objective: Objective = train_cfg["objective"]  # type: ignore[assignment]
    served = ExportedNet(net, objective).eval()
    x = parity_inputs(train_cfg, cfg.parity_samples)
    out = cfg.models_dir / cfg.name / str(cfg.version)
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(served, tuple(x.shape[1:]), out / MODEL_FILE, cfg.opset)  # type: ignore[arg-type]

    with torch.no_grad():
        ref_z, ref_f = (t.numpy() for t in served(x))
    got_f = onnx_outputs(out / MODEL_FILE, x.numpy())[1]
    diff = float(np.abs(softmax(ref_z) - softmax(onnx_logits(out / MODEL_FILE, x.numpy()))).max())
    if diff > PARITY_TOLERANCE:
        raise RuntimeError(
            f"ONNX/PyTorch parity failed: max |dp| = {diff:.2e} > {PARITY_TOLERANCE}"
        )
    fdiff = float(np.abs(ref_f - got_f).max() / max(float(np.abs(ref_f).max()), 1e-12))
    if fdiff > FEATURES_TOLERANCE:
        raise RuntimeError(
            f"ONNX/PyTorch parity of the features failed: max relative |df| = {fdiff:.2e}"
        )
    shutil.copyfile(cfg.run_dir / WEIGHTS_FILE, out / WEIGHTS_FILE)
    provenance = {"config": train_cfg, "result": result}
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str))
    log.info("exported %s to %s (max |dp| vs PyTorch %.2e)", cfg.run_dir, out, diff)
    return ExportResult(model_dir=out, max_prob_diff=diff)
