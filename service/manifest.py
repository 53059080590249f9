"""The model manifest: everything the service needs to know about a model besides its graph.

Written by `notsure calibrate` next to `model.onnx`; read and checked by the service at load.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.scoring import UNIT_SCORES, Kernel, ScoreName, default_score

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
# The bound graph beside model.onnx (interval bound propagation; `notsure certify export`).
CERTIFY_FILE = "certify.onnx"
WEIGHTS_FILE = "weights.safetensors"
KERNEL_SET_FILE = "kernel_set.npy"


class KernelParams(BaseModel):
    """Kernel non-ME parameters, Eq. (5): mu = log(L-1), sigma from the training set."""

    model_config = ConfigDict(frozen=True)

    mu: float
    sigma: float = Field(gt=0)
    eta: float = Field(default=1.0, gt=0)

    def to_kernel(self, eta: float | None = None) -> Kernel:
        return Kernel(mu=self.mu, sigma=self.sigma, eta=self.eta if eta is None else eta)


class KDensityParams(BaseModel):
    """The K-density detector's kernel set: `kernel_set.npy`, (classes, per_class, dim) float32
    final hidden vectors of training images, and the bandwidth sigma^2."""

    model_config = ConfigDict(frozen=True)

    file: str = KERNEL_SET_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    sigma2: float = Field(gt=0)
    per_class: int = Field(ge=1)
    dim: int = Field(ge=1)


class Guarantee(BaseModel):
    """What the threshold promises, with probability >= confidence over the draw of the n
    held-out images it was chosen on."""

    model_config = ConfigDict(frozen=True)

    rule: Literal["clean_refuse", "selective_risk"]
    # clean_refuse: the refuse rate on clean images is <= target (exact binomial bound).
    # selective_risk: the error rate among accepted images is <= target (SGR).
    target: float = Field(gt=0, lt=1)
    confidence: float = Field(gt=0, lt=1)
    n: int = Field(ge=1)
    bound: float | None = None  # selective_risk: the certified upper bound on the risk


# Quantiles kept of the held-out scores: q = 0, 0.005, ..., 1, so the refuse rate at any T is
# known to within half a percent, and drift checks have 200 equal-mass reference bins.
REFERENCE_QUANTILES = 201


class ScoreReference(BaseModel):
    """The held-out clean scores T was chosen on, kept as quantiles: the clean refuse rate that
    any other T would cost, and the reference that recent scores are compared with for drift."""

    model_config = ConfigDict(frozen=True)

    score: ScoreName
    n: int = Field(ge=1)  # held-out images the quantiles summarise
    # Score at q = i / (len - 1), non-decreasing: quantiles[0] the lowest, [-1] the highest.
    quantiles: list[float] = Field(min_length=2)
    refuse_rate: float = Field(ge=0, le=1)  # share of the n held-out scores below T, exactly

    @field_validator("quantiles")
    @classmethod
    def _sorted(cls, v: list[float]) -> list[float]:
        if any(not math.isfinite(q) for q in v) or any(b < a for a, b in itertools.pairwise(v)):
            raise ValueError("quantiles must be finite and non-decreasing")
        return v

    @classmethod
    def from_scores(cls, score: ScoreName, values: Any, threshold: float) -> ScoreReference:
        """Summarise held-out clean scores (any 1-D array) and the refuse rate T has on them."""
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            raise ValueError("no held-out scores to summarise")
        q = np.quantile(v, np.linspace(0.0, 1.0, REFERENCE_QUANTILES))
        return cls(score=score, n=int(v.size), quantiles=[float(x) for x in q],
                   refuse_rate=float((v < threshold).mean()))  # fmt: skip

    def refuse_rate_at(self, t: float) -> float:
        """The share of the held-out clean scores below t, linear between the kept quantiles."""
        q = np.asarray(self.quantiles)
        if t <= q[0]:
            return 0.0
        if t > q[-1]:
            return 1.0
        # Between quantiles i and i+1, whose scores are q[i] < t <= q[i+1]: ties (a run of
        # equal quantiles, e.g. many J-scores of exactly 0) count as below t only when < t.
        i = int(np.searchsorted(q, t, side="left")) - 1
        lo, hi = q[i], q[i + 1]
        frac = 0.0 if hi <= lo else (t - lo) / (hi - lo)
        return float((i + frac) / (len(q) - 1))


class TrainingInfo(BaseModel):
    """How the weights were produced."""

    model_config = ConfigDict(frozen=True)

    dataset: str
    train_samples: int = 0
    steps: int = 0
    batch_size: int = 0
    optimizer: str = ""
    wall_time_s: float = 0.0
    seed: int = 0
    # The training attack of an adversarially trained model ("fgsm-rs eps 0.3 step 0.375, ...")
    # or the bound of a certified one ("ibp eps 0.4, ..."); empty for standard training.
    adversarial: str = ""
    epochs: float = 0.0  # passes over the training images: steps * batch_size / train_samples
    hardware: str = ""  # where it trained: "x86_64, 2 CPU cores, no GPU; torch on cpu"
    # Which weights were kept when not the last ones: "step 7310 (epoch 17.0): best held-out ...".
    kept: str = ""


class Normalize(BaseModel):
    """Per-channel mean and std the service applies to pixels scaled to [0, 1], before the
    graph: x' = (x - mean) / std (torchvision's `Normalize`)."""

    model_config = ConfigDict(frozen=True)

    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _per_channel(self) -> Normalize:
        if len(self.mean) != len(self.std):
            raise ValueError(f"{len(self.mean)} means but {len(self.std)} stds; give one a channel")
        if not all(math.isfinite(m) for m in self.mean):
            raise ValueError("mean values must be finite")
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ValueError("std values must be finite and > 0")
        return self


class Manifest(BaseModel):
    """Describes one model version in the repository (like timm's PretrainedCfg)."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    version: int = Field(ge=1)
    classes: list[str] = Field(min_length=2)
    input_shape: tuple[int, int, int]  # (C, H, W), batch axis excluded
    pixel_range: tuple[float, float] = (0.0, 1.0)
    objective: Literal["ce", "rce"]
    # What the ONNX output is: the vector fed to the softmax at test time (-Z for RCE, Z for CE),
    # or, for an imported model that ends in a softmax, its probabilities.
    output: Literal["neg_logits", "logits", "probabilities"]
    architecture: str
    kernel: KernelParams
    # The score T applies to; manifests written before it existed get the objective's default.
    score: ScoreName
    threshold: float
    threshold_rule: str = ""
    guarantee: Guarantee | None = None
    # T of every score the model can compute, chosen by the same rule (the served one included):
    # what `notsure validate ood` compares, and what an operator can switch to.
    score_thresholds: dict[ScoreName, float] = Field(default_factory=dict)
    # Each score's held-out clean distribution its T was chosen on (empty in older manifests).
    score_references: dict[ScoreName, ScoreReference] = Field(default_factory=dict)
    k_density: KDensityParams | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    training: TrainingInfo | None = None
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    weights_sha256: str | None = None
    command: str = ""
    # What an imported model needs around its graph (`notsure import`); the defaults are what
    # the models `notsure train` makes expect, so older manifests load unchanged.
    # None: the graph takes pixels in [0, 1] as they are (or normalises them itself).
    normalize: Normalize | None = None
    # How an upload of another size becomes H x W: "stretch" (both sides scaled), or
    # "center_crop" (shorter side scaled to H / 0.875, centre H x W cut out: ImageNet's eval).
    resize: Literal["stretch", "center_crop"] = "stretch"
    # True: uploads of another size are resized without the request asking ("resize": true).
    resize_by_default: bool = False
    # The graph output read (None: the first); e.g. skl2onnx's "probabilities" after "label".
    output_name: str | None = None
    # The graph's fixed batch size (e.g. 1 for a graph exported without a dynamic batch axis);
    # None: any batch size. The batcher never builds batches larger than it.
    batch_size: int | None = Field(default=None, ge=1)
    # False when T was set by hand (`--threshold`): nothing measured says what it refuses.
    calibrated: bool = True
    # The per-answer certificate (certify.onnx beside model.onnx): the L-inf radius each answer
    # is certified at, around the input itself, and whether an answer needs it to be accepted.
    # None: the model has no bound graph, and no answer is certified.
    certify_eps: float | None = Field(default=None, gt=0.0, le=1.0)
    certify_required: bool = False
    certify_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def reference(self) -> ScoreReference | None:
        """The held-out distribution of the served score, when the manifest keeps it."""
        return self.score_references.get(self.score)

    @field_validator("input_shape")
    @classmethod
    def _positive_shape(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if v[0] not in (1, 3) or v[1] < 1 or v[2] < 1:
            raise ValueError(f"input_shape must be (1|3, H, W), got {v}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_score(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("score") is None and "objective" in data:
            data = {**data, "score": default_score(str(data["objective"]))}
        return data

    @model_validator(mode="after")
    def _objective_matches_output(self) -> Manifest:
        expected = ("neg_logits",) if self.objective == "rce" else ("logits", "probabilities")
        if self.output not in expected:
            raise ValueError(
                f"a {self.objective} model must output {' or '.join(expected)}, not {self.output}"
            )
        if self.normalize is not None and len(self.normalize.mean) != self.input_shape[0]:
            raise ValueError(
                f"normalize gives {len(self.normalize.mean)} values per statistic for "
                f"{self.input_shape[0]} channels; give one mean and one std a channel"
            )
        return self

    @model_validator(mode="after")
    def _certificate_complete(self) -> Manifest:
        if self.certify_eps is not None and self.certify_sha256 is None:
            raise ValueError(
                "certify_eps needs certify_sha256, the checksum of certify.onnx: "
                "run notsure certify export"
            )
        if self.certify_required and self.certify_eps is None:
            raise ValueError("certify_required needs certify_eps (the radius to certify at)")
        if self.certify_eps is not None and self.normalize is not None:
            raise ValueError(
                "a certificate needs a graph that takes pixels in [0, 1] (normalize: none); "
                "only models notsure trained have a bound graph"
            )
        return self

    @model_validator(mode="after")
    def _threshold_fits_score(self) -> Manifest:
        if self.score == "k_density" and self.k_density is None:
            raise ValueError("score k_density needs the k_density kernel set parameters")
        for name, t in {self.score: self.threshold, **self.score_thresholds}.items():
            check_threshold(name, t)
        for name, ref in self.score_references.items():
            if ref.score != name:
                raise ValueError(f"score_references[{name!r}] describes {ref.score}")
        return self

    @classmethod
    def load(cls, path: Path) -> Manifest:
        return cls.model_validate_json(path.read_text(encoding="utf-8"))

    def save(self, path: Path) -> None:
        text = json.dumps(self.model_dump(mode="json"), indent=2) + "\n"
        path.write_text(text, encoding="utf-8")


def check_threshold(score: str, t: float) -> None:
    """ValueError unless T is a finite number, in [0, 1] for the scores that live there."""
    if not math.isfinite(t):
        raise ValueError(f"threshold for {score} must be finite, got {t}")
    if score in UNIT_SCORES and not 0.0 <= t <= 1.0:
        raise ValueError(f"threshold for {score} must be in [0, 1], got {t}")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
