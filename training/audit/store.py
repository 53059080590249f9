"""Where the audit keeps what it has done: each job's finished chunks (the adversarial images
included) under `work_dir/<model>/<job>-<key>/chunk-*.npz`, and the same results without the
images in `results/<model>/<job>-<key>.npz` beside the JSON rows (a few kB a job, committed with
the docs). `load_job` joins the two; `missing_ranges` says which images are still to attack.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from training.audit.jobs import AuditJob

if TYPE_CHECKING:
    from training.audit.subject import AuditConfig, Model


def job_dir(cfg: AuditConfig, model: Model, job: AuditJob) -> Path:
    return cfg.work_dir / model.name / f"{job.name}-{job.key(model.key)}"


def results_path(cfg: AuditConfig, model: Model, job: AuditJob) -> Path:
    """The job's results without the images (kept with the docs)."""
    root = cfg.results_dir or cfg.out_json.parent / "results"
    return root / model.name / f"{job.name}-{job.key(model.key)}.npz"


IMAGES = "adv"  # the one array of a chunk that the kept results leave out


def _by_image(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Saved pieces joined in image order; where two hold the same image, the later one."""
    keys = set.intersection(*(set(p) for p in parts))
    joined = {k: np.concatenate([p[k] for p in parts]) for k in keys}
    idx = joined["idx"]
    # The last occurrence of each image: unique over the reversed order.
    _, first_rev = np.unique(idx[::-1], return_index=True)
    keep = len(idx) - 1 - first_rev  # sorted by image index, as np.unique sorts
    return {k: v[keep] for k, v in joined.items()}


def load_chunks(folder: Path) -> dict[str, np.ndarray] | None:
    """The saved chunks of a job (images included), in image order, or None if there are none."""
    files = sorted(f for f in folder.glob("chunk-*.npz") if not f.name.endswith(".tmp.npz"))
    if not files:
        return None
    return _by_image([dict(np.load(f, allow_pickle=False)) for f in files])


def load_job(cfg: AuditConfig, model: Model, job: AuditJob) -> dict[str, np.ndarray] | None:
    """A job's results without the images: the kept results and this machine's chunks
    together (a chunk wins where both hold an image), or None if there are neither."""
    parts = []
    kept = results_path(cfg, model, job)
    if kept.exists():
        parts.append(dict(np.load(kept, allow_pickle=False)))
    chunks = load_chunks(job_dir(cfg, model, job))
    if chunks is not None:
        parts.append({k: v for k, v in chunks.items() if k != IMAGES})
    return _by_image(parts) if parts else None


def keep_results(cfg: AuditConfig, model: Model, job: AuditJob) -> None:
    """Rewrite the job's kept results from everything saved so far."""
    saved = load_job(cfg, model, job)
    if saved is None:
        return
    path = results_path(cfg, model, job)
    if path.exists() and _same_arrays(path, saved):
        return  # unchanged: rewriting would only change the zip's timestamps
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **saved)
    tmp.replace(path)


def _same_arrays(path: Path, arrays: dict[str, np.ndarray]) -> bool:
    try:
        with np.load(path) as kept:
            return set(kept.files) == set(arrays) and all(
                np.array_equal(kept[k], v) for k, v in arrays.items()
            )
    except (OSError, ValueError):
        return False


def missing_ranges(
    saved: dict[str, np.ndarray] | None, n: int, chunk: int
) -> list[tuple[int, int]]:
    """(lo, hi) pieces of at most `chunk` images that no saved result covers yet; results saved
    with another chunk size are reused as they are."""
    todo = np.ones(n, dtype=bool)
    if saved is not None:
        todo[saved["idx"][saved["idx"] < n]] = False
    ranges: list[tuple[int, int]] = []
    i = 0
    while i < n:
        if not todo[i]:
            i += 1
            continue
        j = i
        while j < n and todo[j] and j - i < chunk:
            j += 1
        ranges.append((i, j))
        i = j
    return ranges
