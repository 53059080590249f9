"""What the audit attacks: its configuration and the models under attack, as the attacker (the
torch net and what it knows of the score) and the server (the ONNX graph and `service.scoring`)
see them. `Models` loads each once and is handed to whatever needs them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from service.kdensity import KernelSet
from service.manifest import MODEL_FILE, Manifest
from service.repository import read_kernel_set
from service.runtime import OnnxModel
from service.scoring import Scores, score_logits, threshold_for_refuse_rate
from training import data as data_mod
from training.attacks.threat import Threat
from training.modelio import load_torch_model, model_version_dir, test_images
from training.tiny import TINY_MODELS
from training.torch_scoring import KernelTensors, ScoreKind, served_kind, service_name

CALIBRATION = slice(5000, 10000)  # clean test images for other thresholds; attacks use < 5000


@dataclass(frozen=True)
class AuditConfig:
    """One run of `notsure audit`: a plan (`training.audit.plans`) on some models."""

    plan: str = "headline"
    models: tuple[str, ...] = ("mnist-resnet32-rce", "mnist-resnet32-ce")
    models_dir: Path = Path("models")
    data_dir: Path = Path("data")
    work_dir: Path = Path("runs/audit")
    out_json: Path = Path("docs/robustness/adaptive.json")
    chunk: int = 50
    threads: int = 1
    # Per-job results without the images (`training.audit.store`); None: `results/` beside
    # out_json.
    results_dir: Path | None = None
    eps: tuple[float, ...] | None = None  # only the plan's jobs at these budgets (None: all)
    dry_run: bool = False  # few images and steps (see `tiny`)
    url: str = "http://127.0.0.1:8000"  # the live service, for the "live" plan

    @classmethod
    def tiny(cls, work_dir: Path = Path("runs/audit"), **overrides: object) -> AuditConfig:
        """The dry run: the tiny synthetic models, built under work_dir on first use, few
        images and steps, rows written under work_dir (never over the measured ones)."""
        base = cls(
            models=TINY_MODELS,
            models_dir=work_dir / "dry-run-models",
            work_dir=work_dir,
            out_json=work_dir / "adaptive.json",
            dry_run=True,
        )
        return replace(base, **overrides)  # type: ignore[arg-type]


@dataclass
class Model:
    """One model as the attacker and the server see it."""

    name: str
    manifest: Manifest
    net: torch.nn.Module
    onnx: OnnxModel
    data: data_mod.TensorData
    kernel_set: KernelSet | None = None  # K-density's training features, when the model has one
    thresholds: dict[tuple[str, float | None], float] = field(default_factory=dict)

    def threshold(self, score: str, clean_refusal: float | None) -> float:
        """The manifest's T for the score the model is served on, else the T refusing that
        share of clean calibration images (5% when none is given)."""
        if clean_refusal is None and score == served_kind(self.manifest.score):
            return self.manifest.threshold
        key = (score, clean_refusal if clean_refusal is not None else 0.05)
        if key not in self.thresholds:
            scores = self.scores(self.calibration, key[0])
            self.thresholds[key] = threshold_for_refuse_rate(scores, key[1])
        return self.thresholds[key]

    @property
    def calibration(self) -> np.ndarray:
        return (
            self.data.x[CALIBRATION].numpy()
            if len(self.data) > CALIBRATION.start
            else self.data.x.numpy()
        )

    def scores(self, x: np.ndarray, score: str) -> np.ndarray:
        """(N,) the served score of each image, from the ONNX graph."""
        return self.served(x).named(service_name(score))  # type: ignore[arg-type]

    def served(self, x: np.ndarray) -> Scores:
        """`service.scoring` on the ONNX graph's outputs, K-density included when the model
        has a kernel set."""
        parts = [
            self.onnx.run_with_features(np.ascontiguousarray(x[i : i + 500], np.float32))
            for i in range(0, len(x), 500)
        ]
        logits = np.concatenate([p[0] for p in parts])
        feats = None if self.kernel_set is None else np.concatenate([p[1] for p in parts])  # type: ignore[misc]
        kernel = self.manifest.kernel.to_kernel()
        return score_logits(logits, kernel, features=feats, kernel_set=self.kernel_set)

    def threat(self, score: str, threshold: float) -> Threat:
        """What the attacker knows about this model, attacking `score` at `threshold`."""
        kset = None if self.kernel_set is None else KernelTensors.of(self.kernel_set)
        kernel = self.manifest.kernel.to_kernel()
        return Threat(self.net, self.manifest.objective, kernel, threshold, score, kset)  # type: ignore[arg-type]


def load_model(cfg: AuditConfig, name: str) -> Model:
    folder = model_version_dir(cfg.models_dir, name)
    net, manifest = load_torch_model(folder, "cpu")
    for p in net.parameters():
        p.requires_grad_(False)  # gradients w.r.t. the input only
    onnx = OnnxModel(folder / MODEL_FILE, device="cpu", intra_op_threads=cfg.threads)
    n_data = 10000 if not cfg.dry_run else 64
    data = test_images(manifest, cfg.data_dir, n_data)
    return Model(name, manifest, net, onnx, data, read_kernel_set(manifest, folder))


class Models:
    """The models under attack, each loaded on first use and kept: the configured ones, and
    any other a plan asks for (a transfer attack's sources)."""

    def __init__(self, cfg: AuditConfig) -> None:
        self.cfg = cfg
        self._loaded: dict[str, Model] = {}

    def under(self, cfg: AuditConfig) -> Models:
        """The same loaded models, for another plan or other budgets of the same audit."""
        other = Models(cfg)
        other._loaded = self._loaded  # shared: a model either loads is loaded for both
        return other

    def __getitem__(self, name: str) -> Model:
        if name not in self._loaded:
            self._loaded[name] = load_model(self.cfg, name)
        return self._loaded[name]

    def __iter__(self) -> Iterator[Model]:
        """The configured models, then any other loaded so far."""
        configured = [self[name] for name in self.cfg.models]
        others = [m for name, m in self._loaded.items() if name not in self.cfg.models]
        return iter(configured + others)

    def served(self) -> dict[str, ScoreKind]:
        """The score each model is served on, as the attacks name it."""
        return {m.name: served_kind(m.manifest.score) for m in self}
