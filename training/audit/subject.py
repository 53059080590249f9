"""What the audit attacks: its configuration and the models under attack, as the attacker (the
torch net and what it knows of the score) and the server (the ONNX graph, the bound graph when
the model has one, and `service.scoring`) see them. `Models` loads each once and is handed to
whatever needs them; `decided_wins` is what counts as a win."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from service.certify import CertifyGraph, load_certifier, with_certificate
from service.kdensity import KernelSet
from service.manifest import MODEL_FILE, Manifest
from service.repository import read_kernel_set
from service.runtime import OnnxModel
from service.scoring import NOT_SURE, Scores, decide, score_logits, threshold_for_refuse_rate
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
    # The bound graph that certifies each served answer, when the manifest names one; with
    # `certify_required` the service refuses an uncertified answer, and so does the audit.
    certifier: CertifyGraph | None = None

    @property
    def key(self) -> str:
        """What the audit's saved results depend on besides the job: the graph's sha256 and,
        when the model has one, its certificate (the decision changes with it, and the saved
        results say whether each answer was certified). A model without a certificate keeps the
        key its results were saved under."""
        m = self.manifest
        if m.certify_eps is None:
            return m.sha256
        blob = f"{m.sha256} certify {m.certify_sha256} {m.certify_eps!r} {m.certify_required}"
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def certificate(self) -> dict[str, object]:
        """A result row's certificate columns: the radius each answer is certified at and
        whether the decision required it; none for a model without a bound graph."""
        if self.certifier is None:
            return {}
        return {"certify_eps": self.certifier.eps, "certificate_required": self.certifier.required}

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
        """(N,) the served score of each image, from the ONNX graph (no certificate)."""
        return self.served(x, certify=False).named(service_name(score))  # type: ignore[arg-type]

    def served(self, x: np.ndarray, certify: bool = True) -> Scores:
        """`service.scoring` on the ONNX graph's outputs, K-density included when the model
        has a kernel set, and each answer's certificate (`service.certify.with_certificate`,
        as the service computes it) when the model has a bound graph, unless `certify` is off
        (only the scores are wanted)."""
        parts = [
            self.onnx.run_with_features(np.ascontiguousarray(x[i : i + 500], np.float32))
            for i in range(0, len(x), 500)
        ]
        logits = np.concatenate([p[0] for p in parts])
        feats = None if self.kernel_set is None else np.concatenate([p[1] for p in parts])  # type: ignore[misc]
        kernel = self.manifest.kernel.to_kernel()
        s = score_logits(logits, kernel, features=feats, kernel_set=self.kernel_set)
        if not certify:
            return s
        return with_certificate(s, np.ascontiguousarray(x, np.float32), self.certifier)

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
    kset = read_kernel_set(manifest, folder)
    certifier = load_certifier(manifest, folder, "cpu", cfg.threads)
    return Model(name, manifest, net, onnx, data, kset, certifier=certifier)


def decided_wins(
    s: Scores, y: npt.NDArray[np.int64], score: ScoreKind, threshold: float
) -> npt.NDArray[np.bool_]:
    """(N,) the answers an attack has won: the service's decision (`service.scoring.decide`) on
    `score` at `threshold` gives a label, and not the true one. Where the model requires a
    certificate, only a certified answer gets a label, so a win needs one."""
    labels = decide(replace(s, score_name=service_name(score)), threshold)
    return np.asarray((labels != NOT_SURE) & (labels != y))


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
