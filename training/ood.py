"""`notsure validate ood`: how well a served model refuses images from another distribution.

In-distribution (ID) = the model's own test set; out-of-distribution (OOD) = another data set
(Fashion-MNIST for MNIST models, MNIST for Fashion-MNIST models) and synthetic shifts of the ID
test images. Every image goes through the live service (KServe V2, binary tensors), which returns
every score it computes; for each score:

- refuse rate at T: the served T for the model's own score (the service's own decisions), the
  manifest's `score_thresholds` (same calibration rule) for the others;
- AUROC and FPR at 95% TPR, OpenOOD conventions: ID is the positive class, a higher score means
  "more in-distribution", FPR@95 = the share of OOD images accepted at the threshold that
  accepts 95% of the ID images.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from service.manifest import MANIFEST_FILE, Manifest
from service.scoring import NOT_SURE, SCORE_NAMES, accept
from training import data as data_mod
from training.clients import V2Client
from training.progress import progress_bar
from training.provenance import run_record

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
# The other data set that is out of distribution for a model trained on the key.
COUNTERPART = {"mnist": "fashion-mnist", "fashion-mnist": "mnist"}
SHIFTS = ("noise", "inverted", "blur", "rotated", "blank")
SHIFT_TEXT = {
    "noise": "uniform noise U(0, 1) per pixel",
    "inverted": "ID test images inverted (1 - x)",
    "blur": "ID test images, Gaussian blur sigma 2 px",
    "rotated": "ID test images rotated 90 degrees",
    "blank": "blank frames: each image one grey level, evenly spaced from 0 (black) to 1 (white)",
}


@dataclass(frozen=True)
class OodConfig:
    models: tuple[str, ...] = ("mnist-resnet32-rce",)
    ood: tuple[str, ...] = ()  # data sets or image folders / .npz; () = the model's counterpart
    # ID images of a model notsure did not train (`notsure import`): a folder or an .npz.
    id_data: Path | None = None
    shifts: tuple[str, ...] = SHIFTS
    url: str = "http://127.0.0.1:8000"
    data_dir: Path = Path("data")
    models_dir: Path = Path("models")
    n: int = 0  # images per set; 0 = the whole test sets
    batch_size: int = 256
    seed: int = 0
    out_dir: Path = Path("docs/ood")
    api_key: str | None = None
    timeout_s: float = 120.0


@dataclass
class SetScores:
    """The service's answers on one image set."""

    name: str
    description: str
    scores: dict[str, npt.NDArray[np.float64]] = field(default_factory=dict)  # name -> (N,)
    refused: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, bool))
    threshold: float = 0.0  # the T the service applied


def shifted(kind: str, x: F32, rng: np.random.Generator) -> F32:
    """A synthetic shift of (N, C, H, W) images in [0, 1]."""
    if kind == "noise":
        return rng.random(x.shape, dtype=np.float32)
    if kind == "inverted":
        return np.ascontiguousarray(1.0 - x, dtype=np.float32)
    if kind == "blur":
        from scipy.ndimage import gaussian_filter

        return np.asarray(gaussian_filter(x, sigma=(0, 0, 2, 2)), dtype=np.float32)
    if kind == "rotated":
        return np.ascontiguousarray(np.rot90(x, k=1, axes=(2, 3)), dtype=np.float32)
    if kind == "blank":  # an empty scan, a covered lens, a black or white frame
        levels = np.linspace(0.0, 1.0, num=x.shape[0], dtype=np.float32)
        return np.ascontiguousarray(np.broadcast_to(levels[:, None, None, None], x.shape))
    raise ValueError(f"unknown shift {kind!r}; choose from {', '.join(SHIFTS)}")


def load_test_images(dataset: str, data_dir: Path, n: int) -> F32:
    """The first n test images of a data set (all when n is 0)."""
    x = data_mod.load(dataset, data_dir, train=False).x.numpy()
    return np.ascontiguousarray(x[:n] if n else x, dtype=np.float32)


def roc_metrics(id_scores: npt.ArrayLike, ood_scores: npt.ArrayLike) -> tuple[float, float]:
    """(AUROC, FPR at 95% TPR) with ID as the positive class and higher = more ID."""
    from sklearn.metrics import roc_auc_score, roc_curve

    s_id, s_ood = np.asarray(id_scores, np.float64), np.asarray(ood_scores, np.float64)
    y = np.r_[np.ones(s_id.size), np.zeros(s_ood.size)]
    s = np.r_[s_id, s_ood]
    fpr, tpr, _ = roc_curve(y, s)
    return float(roc_auc_score(y, s)), float(fpr[np.searchsorted(tpr, 0.95, side="left")])


def query(client: V2Client, outputs: tuple[str, ...], x: F32, batch: int, what: str) -> SetScores:
    """Every image of x through the service, in batches; the answers per score."""
    parts: list[dict[str, np.ndarray]] = []
    with progress_bar(what, len(x)) as bar:
        for i in range(0, len(x), batch):
            tensors, threshold = client.infer_outputs(x[i : i + batch], ("label", *outputs))
            parts.append(tensors)
            bar.advance(len(tensors["label"]))
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    out = SetScores(what, "", refused=cat["label"] == NOT_SURE, threshold=threshold)
    out.scores = {k: cat[k].astype(np.float64) for k in outputs if k in SCORE_NAMES}
    return out


def latest_manifest(models_dir: Path, name: str) -> Manifest:
    """The manifest of the highest version in the repository (what the service serves)."""
    versions = sorted(
        (int(p.name) for p in (models_dir / name).glob("[0-9]*") if p.name.isdigit()), reverse=True
    )
    if not versions:
        raise FileNotFoundError(f"no versions of {name!r} in {models_dir}; pass --models-dir")
    return Manifest.load(models_dir / name / str(versions[0]) / MANIFEST_FILE)


def _images(manifest: Manifest, path: Path, n: int) -> F32:
    """A folder of images (class folders or not) or an .npz, as the model's input."""
    from training.heldout import load_heldout

    x = load_heldout(path, manifest.input_shape, manifest.resize).x
    return np.ascontiguousarray(x[:n] if n else x)


def evaluate_model(cfg: OodConfig, name: str) -> dict[str, Any]:
    """All sets through the service for one model; the metrics for every score and set."""
    manifest = latest_manifest(cfg.models_dir, name)
    dataset = manifest.training.dataset if manifest.training else "mnist"
    if cfg.id_data is not None:
        dataset = str(cfg.id_data)
    elif manifest.training is None and manifest.architecture.startswith("imported"):
        raise ValueError(f"{name} was imported: give its in-distribution images with --id-data")
    client = V2Client(cfg.url, name, timeout_s=cfg.timeout_s, api_key=cfg.api_key)
    try:
        client.wait_ready()
        served = {o["name"] for o in client.metadata()["outputs"]}
        scores = tuple(s for s in SCORE_NAMES if s in served)
        rng = np.random.default_rng(cfg.seed)
        if cfg.id_data is not None:
            x_id = _images(manifest, cfg.id_data, cfg.n)
        elif dataset == "synthetic":  # the tiny test models: no second data set exists
            x_id = data_mod.synthetic(cfg.n or 256, seed=cfg.seed + 2).x.numpy()
        else:
            x_id = load_test_images(dataset, cfg.data_dir, cfg.n)
        id_set = query(client, scores, x_id, cfg.batch_size, f"{name} ID {dataset}")
        sets: list[SetScores] = []
        ood = cfg.ood or ((COUNTERPART[dataset],) if dataset in COUNTERPART else ())
        for ds in ood:
            folder = Path(ds).exists()  # a folder of images or an .npz, not a data set name
            x = _images(manifest, Path(ds), cfg.n) if folder else load_test_images(
                ds, cfg.data_dir, cfg.n)  # fmt: skip
            s = query(client, scores, x, cfg.batch_size, f"{name} OOD {ds}")
            s.name, s.description = ds, f"images in {ds}" if folder else f"{ds} test set"
            sets.append(s)
        for kind in cfg.shifts:
            s = query(client, scores, shifted(kind, x_id, rng), cfg.batch_size, f"{name} {kind}")
            s.name, s.description = kind, SHIFT_TEXT[kind]
            sets.append(s)
    finally:
        client.close()
    return summarise(manifest, dataset, id_set, sets)


def summarise(
    manifest: Manifest, dataset: str, id_set: SetScores, sets: list[SetScores]
) -> dict[str, Any]:
    """The JSON record of one model: T per score, ID refuse rates, and per OOD set and score
    the refuse rate at T, AUROC and FPR@95."""
    thresholds = {**manifest.score_thresholds, manifest.score: id_set.threshold}
    scores = [s for s in id_set.scores if s in thresholds]
    # The service's decisions must be the served score against the served T (float32 values
    # on the wire can tie differently at T itself: count, don't fail).
    served = id_set.scores[manifest.score]
    differ = int((~accept(served, id_set.threshold) != id_set.refused).sum())
    if differ:
        log.warning("%d ID decisions differ from score < T on the returned scores", differ)
    rows = []
    for s in sets:
        for score in scores:
            auroc, fpr95 = roc_metrics(id_set.scores[score], s.scores[score])
            refused = (
                s.refused
                if score == manifest.score
                else ~accept(s.scores[score], thresholds[score])
            )
            rows.append({"set": s.name, "score": score, "n": int(refused.size),
                         "refuse_rate": float(refused.mean()), "auroc": auroc,
                         "fpr_at_95_tpr": fpr95})  # fmt: skip
    id_refuse = {
        score: float(
            (id_set.refused if score == manifest.score else
             ~accept(id_set.scores[score], thresholds[score])).mean()
        )
        for score in scores
    }  # fmt: skip
    return {
        "model": manifest.name,
        "version": manifest.version,
        "objective": manifest.objective,
        "served_score": manifest.score,
        "threshold_rule": manifest.threshold_rule,
        "served_threshold": id_set.threshold,
        "thresholds": {s: thresholds[s] for s in scores},
        "in_distribution": {
            "set": dataset,
            "n": int(id_set.refused.size),
            "refuse_rate": id_refuse,
        },
        "sets": {s.name: s.description for s in sets},
        "rows": rows,
    }


def run(cfg: OodConfig) -> dict[str, Any]:
    """Evaluate every model and write ood.json, tables.md and ood.png into out_dir."""
    from training.ood_report import write_report

    report = {
        "run": run_record(),
        "protocol": "ID = the model's test set, positive class; higher score = more ID; "
        "FPR@95 = share of OOD accepted at the T that accepts 95% of ID; refuse rate at the "
        "served T (served score) or the manifest's score_thresholds (others); live service",
        "models": [evaluate_model(cfg, m) for m in cfg.models],
    }
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "ood.json").write_text(json.dumps(report, indent=2) + "\n")
    write_report(report, cfg.out_dir)
    return report
