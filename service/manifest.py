"""The model manifest: everything the service needs to know about a model besides its graph.

Written by `notsure calibrate` next to `model.onnx`; read and checked by the service at load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.scoring import Kernel

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "weights.safetensors"


class KernelParams(BaseModel):
    """Kernel non-ME parameters, Eq. (5): mu = log(L-1), sigma from the training set."""

    model_config = ConfigDict(frozen=True)

    mu: float
    sigma: float = Field(gt=0)
    eta: float = Field(default=1.0, gt=0)

    def to_kernel(self, eta: float | None = None) -> Kernel:
        return Kernel(mu=self.mu, sigma=self.sigma, eta=self.eta if eta is None else eta)


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
    # The training attack of an adversarially trained model ("fgsm-rs eps 0.3 step 0.375, ...");
    # empty for standard training.
    adversarial: str = ""


class Manifest(BaseModel):
    """Describes one model version in the repository (like timm's PretrainedCfg)."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    version: int = Field(ge=1)
    classes: list[str] = Field(min_length=2)
    input_shape: tuple[int, int, int]  # (C, H, W), batch axis excluded
    pixel_range: tuple[float, float] = (0.0, 1.0)
    objective: Literal["ce", "rce"]
    # What the ONNX output is: the vector fed to the softmax at test time (-Z for RCE, Z for CE).
    output: Literal["neg_logits", "logits"]
    architecture: str
    kernel: KernelParams
    threshold: float = Field(ge=0.0, le=1.0)
    threshold_rule: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    training: TrainingInfo | None = None
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    weights_sha256: str | None = None
    command: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @field_validator("input_shape")
    @classmethod
    def _positive_shape(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if v[0] not in (1, 3) or v[1] < 1 or v[2] < 1:
            raise ValueError(f"input_shape must be (1|3, H, W), got {v}")
        return v

    @model_validator(mode="after")
    def _objective_matches_output(self) -> Manifest:
        expected = "neg_logits" if self.objective == "rce" else "logits"
        if self.output != expected:
            raise ValueError(f"a {self.objective} model must output {expected}, not {self.output}")
        return self

    @classmethod
    def load(cls, path: Path) -> Manifest:
        return cls.model_validate_json(path.read_text(encoding="utf-8"))

    def save(self, path: Path) -> None:
        text = json.dumps(self.model_dump(mode="json"), indent=2) + "\n"
        path.write_text(text, encoding="utf-8")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
