"""`notsure import`: put an ONNX image classifier that notsure did not train behind NOT SURE.

Reads the graph's input and output, works out the manifest (channels, size, fixed batch, which
output, class names) from the graph and the flags, runs the held-out images through the graph
exactly as the service will (the same `OnnxModel` and `ModelIO`), picks T by the rules of
docs/calibration.md, and writes `<repository>/<name>/<version>/{model.onnx, manifest.json}`.
Everything is written into a temporary folder beside it and renamed into place at the end, so
a failure leaves no half-written version for the service to find.
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from service.imaging import ResizeMode
from service.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    Guarantee,
    KernelParams,
    Manifest,
    Normalize,
    ScoreReference,
    sha256_file,
)
from service.preprocess import GraphMismatch, ModelIO, check_output
from service.runtime import OnnxModel
from service.scoring import (
    SCORE_NAMES,
    ScoreName,
    Scores,
    accept,
    default_score,
    kernel_mu,
    kernel_sigma,
    non_me_from_log_probs,
    score_logits,
)
from training.heldout import Heldout, HeldoutError, load_heldout
from training.import_graph import (
    GraphInfo,
    ImportConfig,
    ImportFailed,
    class_names,
    inspect_graph,
    model_io,
)
from training.progress import progress_bar

log = logging.getLogger(__name__)

# Share of the held-out images (at most KERNEL_MAX) that fix the kernel sigma of Eq. (5) when
# T is chosen on the J-score: T is then chosen on images the score was not fitted on.
KERNEL_SHARE, KERNEL_MAX = 0.2, 5000
# Images per graph run while scoring the held-out set.
CHUNK = 256
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # as the manifest's name field


@dataclass(frozen=True)
class ImportResult:
    manifest: Manifest
    model_dir: Path


def run_heldout(model: OnnxModel, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The vector fed to the softmax for every held-out image, with a progress bar."""
    parts = []
    with progress_bar("scoring held-out images", len(x)) as bar:
        for i in range(0, len(x), CHUNK):
            parts.append(model.run(np.ascontiguousarray(x[i : i + CHUNK])))
            bar.advance(min(CHUNK, len(x) - i))
    return np.concatenate(parts)


def _check_outputs(cfg: ImportConfig, model: OnnxModel, x: npt.NDArray[np.float32]) -> None:
    """NaN or outputs of the wrong kind on the held-out images: a wrong --mean/--std/--output."""
    raw = np.asarray(model.run_outputs([model.signature.output_name], x[:CHUNK])[0], np.float64)
    bad = int((~np.isfinite(raw)).any(axis=1).sum())
    if bad:
        raise ImportFailed(
            f"the model gives NaN or infinite outputs for {bad} of the first {len(raw)} held-out "
            "images; check --mean/--std (pixels are scaled to [0, 1] first) and that the graph "
            "runs in onnxruntime as it does where it was trained"
        )
    sums = raw.sum(axis=1)
    is_prob = bool((raw >= 0).all() and (raw <= 1).all() and np.allclose(sums, 1.0, atol=1e-3))
    if cfg.output == "probabilities" and not is_prob:
        raise ImportFailed(
            f"--output probabilities, but the outputs are not probabilities (row sums "
            f"{sums.min():.3g} to {sums.max():.3g}); use --output logits or neg_logits"
        )
    if cfg.output != "probabilities" and is_prob:
        log.warning("the outputs look like probabilities (rows sum to 1): --output probabilities?")


def _kernel(logits: npt.NDArray[np.float32], classes: int) -> KernelParams:
    """Eq. (5): mu = log(L-1), sigma from the non-ME of these images."""
    mu = kernel_mu(classes)
    sigma = kernel_sigma(non_me_from_log_probs(logits), mu) if len(logits) else mu
    # Two classes: the non-ME is always 0 = mu, sigma 0; any sigma then gives J = confidence.
    return KernelParams(mu=mu, sigma=max(sigma, 1e-6))


def _available(cfg: ImportConfig) -> list[ScoreName]:
    # Energy of log-probabilities is log(sum p) = 0 for every image: it says nothing.
    bad = {"k_density", "energy"} if cfg.output == "probabilities" else {"k_density"}
    return [s for s in SCORE_NAMES if s not in bad]


def choose_threshold(
    cfg: ImportConfig, scores: Scores, y: npt.NDArray[np.int64] | None, score: ScoreName
) -> tuple[float, str, Guarantee | None, dict[ScoreName, float]]:
    """T for the served score and, by the same rule, for every other score."""
    from training.calibrate import CalibrateConfig, pick_threshold
    from training.guarantees import NoThreshold

    if y is None and cfg.target_risk is not None:
        raise ImportFailed(
            "--target-risk needs labelled held-out data (class folders, or 'y' in the .npz); "
            "without labels use --target-clean-refuse"
        )
    rule_cfg = CalibrateConfig(
        model_dir=cfg.model,
        target_clean_refuse=cfg.target_clean_refuse,
        confidence=cfg.confidence,
        target_risk=cfg.target_risk,
    )
    correct = (scores.label == y) if y is not None else np.ones(len(scores), bool)
    thresholds: dict[ScoreName, float] = {}
    for name in _available(cfg):
        try:
            thresholds[name] = pick_threshold(rule_cfg, scores.named(name), correct)[0]
        except NoThreshold as exc:
            log.warning("no threshold for %s: %s", name, exc)
    try:
        t, rule, guarantee = pick_threshold(rule_cfg, scores.named(score), correct)
    except NoThreshold as exc:
        raise ImportFailed(str(exc)) from exc
    return t, rule.replace("clean training images", "images"), guarantee, thresholds


def _next_version(folder: Path) -> int:
    found = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return max(found, default=0) + 1


def import_model(cfg: ImportConfig) -> ImportResult:
    """Check, calibrate and write one imported model version; ImportFailed says what to fix."""
    if not cfg.model.is_file():
        raise ImportFailed(f"{cfg.model} does not exist; give the path of an .onnx file")
    if not NAME.fullmatch(cfg.name):
        raise ImportFailed(
            f"--name {cfg.name!r}: use 1-64 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if cfg.data is None and cfg.threshold is None:
        raise ImportFailed("give --data HELDOUT to calibrate T, or set it with --threshold")
    if cfg.score is not None and cfg.score not in _available(cfg):
        raise ImportFailed(
            f"--score {cfg.score} is not available for this model; use one of "
            + ", ".join(_available(cfg))
        )
    graph = inspect_graph(cfg)
    io = model_io(cfg, graph)
    resize: ResizeMode = cfg.resize or "stretch"
    try:
        held = None if cfg.data is None else load_heldout(cfg.data, io.shape, resize)
    except HeldoutError as exc:
        raise ImportFailed(str(exc)) from exc

    cfg.repository.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".import-{cfg.name}-", dir=cfg.repository))
    folder = cfg.repository / cfg.name
    new_folder = not folder.exists()
    try:
        manifest = _build(cfg, graph, io, held, tmp, resize)
        target = folder / str(manifest.version)
        folder.mkdir(exist_ok=True)
        tmp.rename(target)  # atomic on one file system; fails if the version appeared
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if new_folder and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise
    log.info("imported %s as %s", cfg.model, target)
    return ImportResult(manifest, target)


def _build(
    cfg: ImportConfig,
    graph: GraphInfo,
    io: ModelIO,
    held: Heldout | None,
    tmp: Path,
    resize: ResizeMode,
) -> Manifest:
    """Write model.onnx and manifest.json into tmp; returns the manifest."""
    shutil.copyfile(cfg.model, tmp / MODEL_FILE)
    try:
        model = OnnxModel(tmp / MODEL_FILE, device="cpu", io=io)
    except GraphMismatch as exc:
        raise ImportFailed(str(exc)) from exc
    count = graph.classes
    if count is None:  # symbolic in the graph: count the outputs of one image
        count = int(model.run(np.zeros((1, *io.shape), np.float32)).shape[1])
    classes = class_names(cfg, held, count)
    try:
        check_output(io, model.signature.output_name, model.signature.output_shape, len(classes))
    except GraphMismatch as exc:
        raise ImportFailed(str(exc)) from exc
    if count < 2:
        raise ImportFailed(f"the model has {count} output; a classifier needs at least 2 classes")

    objective = "rce" if cfg.output == "neg_logits" else "ce"
    score: ScoreName = cfg.score or default_score(objective)
    metrics: dict[str, float] = {}
    references: dict[ScoreName, ScoreReference] = {}
    guarantee: Guarantee | None = None
    thresholds: dict[ScoreName, float] = {}
    if held is not None:
        _check_outputs(cfg, model, held.x)
        logits = run_heldout(model, held.x)
        if held.y is not None and int(held.y.max()) >= count:
            raise ImportFailed(f"--data has label {int(held.y.max())}, the model {count} classes")
        # The J-score's sigma is fitted on a random share of the images and T chosen on the
        # rest, so that the T's guarantee holds for a score not fitted on its own images.
        order = np.random.default_rng(cfg.seed).permutation(len(logits))
        k = min(KERNEL_MAX, int(len(logits) * KERNEL_SHARE)) if score == "j_score" else 0
        fit, cal = order[:k] if k else order, order[k:]
        kernel = _kernel(logits[fit], count)
        s = score_logits(logits[cal], kernel.to_kernel(), score)
        y = None if held.y is None else held.y[cal]
        if cfg.threshold is None:
            threshold, rule, guarantee, thresholds = choose_threshold(cfg, s, y, score)
        else:
            threshold, rule = cfg.threshold, "set by hand"
        thresholds[score] = threshold
        references = {n: ScoreReference.from_scores(n, s.named(n), t)
                      for n, t in thresholds.items()}  # fmt: skip
        acc = accept(s.score, threshold)
        metrics = {"heldout_samples": float(len(cal)), "kernel_samples": float(len(fit)),
                   "heldout_refuse_rate": float(1.0 - acc.mean())}  # fmt: skip
        if y is not None:
            right = s.label == y
            metrics["heldout_accuracy"] = float(right.mean())
            metrics["heldout_accuracy_of_accepted"] = float(right[acc].mean()) if acc.any() else 0
    else:
        assert cfg.threshold is not None  # checked in import_model
        # No images to fit sigma on: mu itself, a wide kernel (J close to the confidence).
        kernel = _kernel(np.zeros((0, count), np.float32), count)
        threshold, rule = cfg.threshold, "set by hand, no held-out images"
    if cfg.threshold is not None:
        thresholds = {score: threshold}
        references = {n: r for n, r in references.items() if n == score}

    norm = None
    if cfg.mean is not None and cfg.std is not None:
        norm = Normalize(mean=list(cfg.mean), std=list(cfg.std))
    try:
        manifest = Manifest(
            name=cfg.name,
            version=_next_version(cfg.repository / cfg.name),
            classes=classes,
            input_shape=io.shape,
            objective=objective,
            output=cfg.output,
            architecture=f"imported {cfg.model.name}",
            kernel=kernel,
            score=score,
            threshold=float(threshold),
            threshold_rule=rule,
            guarantee=guarantee,
            score_thresholds=thresholds,
            score_references=references,
            metrics=metrics,
            sha256=sha256_file(tmp / MODEL_FILE),
            command=shlex.join(["notsure", *sys.argv[1:]]) if sys.argv else "",
            normalize=norm,
            resize=resize,
            resize_by_default=cfg.resize is not None,
            output_name=graph.output_name,
            batch_size=graph.batch_size,
            calibrated=cfg.threshold is None,
        )
    except ValueError as exc:  # pydantic's ValidationError: a name or T out of range
        raise ImportFailed(f"the manifest would be invalid: {exc}") from exc
    manifest.save(tmp / MANIFEST_FILE)
    return manifest
