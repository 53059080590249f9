"""`notsure calibrate`: kernel parameters (Eq. 5) from the training set, T from held-out data.

Runs the exported ONNX graph (what the service will run) over the training set for sigma and
the K-density kernel set, over the held-out validation split to pick T for the model's score
(a clean refuse rate, optionally with a guarantee, or a selective risk, see
`training.guarantees`), and over the test set for the accuracy recorded in the manifest. Writes
`manifest.json` (and `kernel_set.npy`) next to the model.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from service.kdensity import DEFAULT_SIGMA2, KernelSet, build_kernel_set
from service.manifest import (
    KERNEL_SET_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    WEIGHTS_FILE,
    Guarantee,
    KDensityParams,
    KernelParams,
    Manifest,
    ScoreReference,
    TrainingInfo,
    sha256_file,
)
from service.runtime import OnnxModel
from service.scoring import (
    SCORE_NAMES,
    ScoreName,
    accept,
    default_score,
    kernel_mu,
    kernel_sigma,
    non_me_from_log_probs,
    score_logits,
    threshold_for_refuse_rate,
)
from training import data as data_mod
from training.adversarial import AdversarialConfig
from training.export import PROVENANCE_FILE
from training.guarantees import NoThreshold, clean_refuse_threshold, selective_risk_threshold

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrateConfig:
    model_dir: Path  # models/<name>/<version>
    data_dir: Path = Path("data")
    score: ScoreName | None = None  # None: j_score for RCE models, confidence for CE models
    target_clean_refuse: float = 0.05
    # With a confidence, T refuses at most target_clean_refuse of clean images with that
    # probability (exact binomial bound); without, T refuses that share of the held-out images.
    confidence: float | None = None
    target_risk: float | None = None  # SGR: error rate among accepted <= this, w.p. confidence
    threshold: float | None = None  # set T directly instead of from a rule
    eta: float = 1.0
    kd_sigma2: float | None = None  # None: the official value for the objective
    kd_per_class: int = 1000
    max_train_samples: int = 0  # 0: the whole training set

    @property
    def risk_confidence(self) -> float:
        return 0.95 if self.confidence is None else self.confidence


@dataclass(frozen=True)
class Outputs:
    """The graph's outputs on a data split."""

    logits: npt.NDArray[np.float32]  # (N, L)
    features: npt.NDArray[np.float32] | None  # (N, D), when the graph has them


def run_all(model: OnnxModel, x: npt.NDArray[np.float32], batch: int = 1000) -> Outputs:
    """Logits and features of a large array, in chunks of `batch` images."""
    parts = [model.run_with_features(np.ascontiguousarray(x[i : i + batch]))
             for i in range(0, len(x), batch)]  # fmt: skip
    logits = np.concatenate([p[0] for p in parts])
    feats = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])  # type: ignore[misc]
    return Outputs(logits, feats)


def build_k_density(
    cfg: CalibrateConfig, train: Outputs, labels: npt.NDArray[np.int64], objective: str
) -> tuple[KernelSet, KDensityParams] | None:
    """Kernel set from correctly classified training images; written next to the model."""
    if train.features is None:
        return None
    right = train.logits.argmax(axis=1) == labels
    # A class the network never gets right (a barely trained model) uses all its images.
    never = np.setdiff1d(np.arange(train.logits.shape[1]), labels[right])
    right |= np.isin(labels, never)
    sigma2 = cfg.kd_sigma2 or DEFAULT_SIGMA2[objective]
    kset = build_kernel_set(
        train.features[right], labels[right], train.logits.shape[1], cfg.kd_per_class, sigma2
    )
    path = cfg.model_dir / KERNEL_SET_FILE
    np.save(path, kset.features, allow_pickle=False)
    params = KDensityParams(
        sha256=sha256_file(path), sigma2=sigma2, per_class=cfg.kd_per_class, dim=kset.dim
    )
    return kset, params


def pick_threshold(
    cfg: CalibrateConfig, values: npt.NDArray[np.float64], correct: npt.NDArray[np.bool_]
) -> tuple[float, str, Guarantee | None]:
    """T for one score on the held-out images, by the configured rule; NoThreshold when the
    rule cannot be met."""
    n = int(values.size)
    if cfg.target_risk is not None:
        sr = selective_risk_threshold(values, correct, cfg.target_risk, cfg.risk_confidence)
        rule = (
            f"error rate among accepted <= {cfg.target_risk:.2%} with {cfg.risk_confidence:.0%} "
            f"confidence (SGR, bound {sr.bound:.4f}) on {n} held-out images; there "
            f"coverage {sr.coverage:.2%}, risk {sr.risk:.2%}"
        )
        g = Guarantee(rule="selective_risk", target=cfg.target_risk,
                      confidence=cfg.risk_confidence, n=n, bound=sr.bound)  # fmt: skip
        return sr.threshold, rule, g
    a = cfg.target_clean_refuse
    if cfg.confidence is not None:
        t = clean_refuse_threshold(values, a, cfg.confidence)
        rule = (
            f"clean refuse rate <= {a:.1%} with {cfg.confidence:.0%} confidence (exact "
            f"binomial bound) on {n} held-out clean training images; there it refuses "
            f"{float((values < t).mean()):.2%}"
        )
        return t, rule, Guarantee(rule="clean_refuse", target=a, confidence=cfg.confidence, n=n)
    t = threshold_for_refuse_rate(values, a)
    return t, f"refuses {a:.1%} of {n} held-out clean training images", None


def training_info(tcfg: dict[str, Any], tres: dict[str, Any], n_train: int) -> TrainingInfo:
    """The manifest's record of how the weights were made, from a run's config and result
    (`notsure train` or `notsure certify train`)."""
    samples = int(tres.get("train_samples", n_train))
    steps, batch = int(tres["steps"]), int(tcfg["batch_size"])
    if "schedule" in tcfg:  # certified training: the bound, not an attack
        sch = tcfg["schedule"]
        recipe = (
            f"ibp eps {sch['eps']:g}, {sch['warmup_steps']} steps at eps 0, {sch['shape']} ramp "
            f"over {sch['ramp_steps']} steps, kappa 1 -> {sch['kappa_final']:g}"
        )
    else:
        recipe = AdversarialConfig(**tcfg.get("adversarial", {})).describe()
    kept = ""
    best = tres.get("kept") or tres.get("best")
    if best and "why" in best:  # `notsure train --keep best`
        kept = f"step {int(best['step'])} (epoch {best['epoch']:.1f}): {best['why']}"
    elif best and "val_verified" in best:  # `notsure certify train`
        kept = (
            f"step {int(best['step'])} (epoch {best['epoch']:.1f}): best held-out IBP-verified "
            f"accuracy {best['val_verified']:.1%} at eps {best['eval_eps']:g} (clean "
            f"{best['val_clean']:.1%})"
        )
    return TrainingInfo(
        dataset=tcfg["dataset"],
        train_samples=samples,
        steps=steps,
        batch_size=batch,
        optimizer=f"{tcfg['optimizer']} lr {tcfg['lr']} momentum {tcfg['momentum']} "
        f"wd {tcfg['weight_decay']}",
        wall_time_s=float(tres["wall_time_s"]),
        seed=int(tcfg["seed"]),
        adversarial=recipe,
        epochs=round(steps * batch / samples, 2) if samples else 0.0,
        hardware=str(tres.get("hardware", "")),
        kept=kept,
    )


def calibrate(cfg: CalibrateConfig) -> Manifest:
    """Compute mu, sigma, the kernel set, T and the clean accuracy; write the manifest."""
    prov = json.loads((cfg.model_dir / PROVENANCE_FILE).read_text())
    tcfg, tres = prov["config"], prov["result"]
    objective = str(tcfg["objective"])
    score: ScoreName = cfg.score or default_score(objective)
    splits = data_mod.run_splits(
        str(tcfg["dataset"]),
        cfg.data_dir,
        int(tcfg["val_size"]),
        int(tcfg["seed"]),
        bool(tcfg["dry_run"]),
    )
    model = OnnxModel(cfg.model_dir / MODEL_FILE, device="auto")
    num_classes = len(splits.train.classes)
    if score == "k_density" and model.signature.features_name is None:
        raise ValueError(
            f"{cfg.model_dir / MODEL_FILE} has no features output, so it cannot be scored with "
            "k_density; re-export it with `notsure export` or choose another --score"
        )

    n_train = cfg.max_train_samples or len(splits.train)
    train = run_all(model, splits.train.x.numpy()[:n_train])
    # Eq. (5): mu = log(L-1); sigma^2 = mean over the training set of (nonME - mu)^2.
    mu = kernel_mu(num_classes)
    sigma = kernel_sigma(non_me_from_log_probs(train.logits), mu)
    kernel = KernelParams(mu=mu, sigma=sigma, eta=cfg.eta)
    kd = build_k_density(cfg, train, splits.train.y.numpy()[:n_train], objective)
    kset = kd[0] if kd else None

    v = run_all(model, splits.val.x.numpy())
    val = score_logits(v.logits, kernel.to_kernel(), score, v.features, kset)
    val_correct = val.label == splits.val.y.numpy()
    available = [s for s in SCORE_NAMES if s != "k_density" or kset is not None]
    thresholds: dict[ScoreName, float] = {}
    for name in available:  # the same rule for every score, for comparisons
        try:
            thresholds[name] = pick_threshold(cfg, val.named(name), val_correct)[0]
        except NoThreshold as exc:
            log.warning("no threshold for %s: %s", name, exc)
    if cfg.threshold is not None:
        threshold, rule, guarantee = cfg.threshold, "set by hand", None
        thresholds[score] = threshold
    else:
        threshold, rule, guarantee = pick_threshold(cfg, val.named(score), val_correct)

    t_out = run_all(model, splits.test.x.numpy())
    test = score_logits(t_out.logits, kernel.to_kernel(), score, t_out.features, kset)
    y = splits.test.y.numpy()
    correct = test.label == y
    accepted = accept(test.score, threshold)
    metrics = {
        "clean_test_accuracy": float(correct.mean()),
        "val_accuracy": float((val.label == splits.val.y.numpy()).mean())
        if len(splits.val)
        else 0.0,
        "test_refuse_rate": float(1.0 - accepted.mean()),
        "test_accuracy_of_accepted": float(correct[accepted].mean()) if accepted.any() else 0.0,
        "test_mean_j_score": float(test.j_score.mean()),
        f"test_mean_{score}": float(test.score.mean()),
        "test_samples": float(len(y)),
    }
    model_path = cfg.model_dir / MODEL_FILE
    weights = cfg.model_dir / WEIGHTS_FILE
    manifest = Manifest(
        name=cfg.model_dir.parent.name,
        version=int(cfg.model_dir.name),
        classes=list(splits.train.classes),
        input_shape=splits.train.input_shape,
        objective=tcfg["objective"],
        output="neg_logits" if tcfg["objective"] == "rce" else "logits",
        architecture=tcfg["arch"],
        kernel=kernel,
        score=score,
        threshold=float(threshold),
        threshold_rule=rule,
        guarantee=guarantee,
        score_thresholds=thresholds,
        score_references={
            name: ScoreReference.from_scores(name, val.named(name), t)
            for name, t in thresholds.items()
        }
        if len(splits.val)
        else {},
        k_density=kd[1] if kd else None,
        metrics=metrics,
        training=training_info(tcfg, tres, len(splits.train)),
        sha256=sha256_file(model_path),
        weights_sha256=sha256_file(weights) if weights.exists() else None,
        command=shlex.join(["notsure", *sys.argv[1:]]) if sys.argv else "",
    )
    manifest.save(cfg.model_dir / MANIFEST_FILE)
    log.info(
        "calibrated %s: mu %.4f sigma %.4f, %s >= %.4g, test accuracy %.4f, refuse %.2f%%",
        cfg.model_dir,
        mu,
        sigma,
        score,
        manifest.threshold,
        metrics["clean_test_accuracy"],
        100 * metrics["test_refuse_rate"],
    )
    return manifest
