"""Plumbing of the attack tool: model and data lookup, batched scoring, the on-disk cache."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from service.manifest import MANIFEST_FILE, Manifest
from training import data as data_mod
from training.attack.service_client import Decisions
from training.progress import progress_bar

log = logging.getLogger(__name__)

# The dry run's synthetic test split: calibrate.py uses seed + 2 for the test split of seed 0.
SYNTHETIC_TEST_SEED = 2


class Scorer(Protocol):
    def infer(self, x: np.ndarray) -> Decisions: ...


def model_version_dir(models_dir: Path, name: str, version: int | None = None) -> Path:
    """models/<name>/<version>; the highest version that has a manifest unless one is given."""
    if version is not None:
        return models_dir / name / str(version)
    folder = models_dir / name
    versions = sorted(
        int(p.name) for p in folder.glob("*") if p.name.isdigit() and (p / MANIFEST_FILE).exists()
    )
    if not versions:
        raise FileNotFoundError(
            f"no calibrated version of {name!r} in {models_dir}/ (expected "
            f"{folder}/<version>/{MANIFEST_FILE}); check --models-dir and the model name"
        )
    return folder / str(versions[-1])


def test_images(manifest: Manifest, data_dir: Path, n: int) -> data_mod.TensorData:
    """The first n images of the test split of the data set the model was trained on."""
    dataset = manifest.training.dataset if manifest.training else "mnist"
    if dataset == "synthetic":
        return data_mod.synthetic(n, seed=SYNTHETIC_TEST_SEED, shape=manifest.input_shape)
    test = data_mod.load(dataset, data_dir, train=False)
    if n > len(test):
        raise ValueError(f"--n {n} is larger than the {dataset} test set ({len(test)} images)")
    return test.subset(slice(0, n))


def score_all(scorer: Scorer, x: np.ndarray, batch: int, description: str) -> Decisions:
    """Decisions for every image of x (N, C, H, W), sent in batches of `batch`, with a bar."""
    parts: list[Decisions] = []
    with progress_bar(description, total=len(x)) as bar:
        for i in range(0, len(x), batch):
            part = scorer.infer(np.ascontiguousarray(x[i : i + batch], dtype=np.float32))
            if len(part.label) != len(x[i : i + batch]):
                raise RuntimeError(f"asked for {len(x[i : i + batch])} decisions, got "
                                   f"{len(part.label)}")  # fmt: skip
            parts.append(part)
            bar.advance(len(part.label))
    return Decisions.concat(parts)


def cached(path: Path, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Load the arrays at `path` if a complete file is there, else compute and store them.

    The file name carries a hash of everything the result depends on, so a changed model, N,
    attack or scorer never reads a stale result; writes go through a temporary file so that an
    interrupted run leaves no half-written cache.
    """
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            log.debug("cached: %s", path)
            return {k: f[k] for k in f.files}
    arrays = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return arrays
