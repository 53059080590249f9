"""`notsure calibrate`: kernel parameters (Eq. 5) from the training set, T from held-out data.

Runs the exported ONNX graph (what the service will run) over the training set for sigma, over
the held-out validation split to pick T for a target clean refuse rate, and over the test set
for the accuracy recorded in the manifest. Writes `manifest.json` next to the model.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    WEIGHTS_FILE,
    KernelParams,
    Manifest,
    TrainingInfo,
    sha256_file,
)
from service.runtime import OnnxModel
from service.scoring import (
    kernel_mu,
    kernel_sigma,
    non_me_from_log_probs,
    score_logits,
    threshold_for_refuse_rate,
)
from training import data as data_mod
from training.adversarial import AdversarialConfig
from training.export import PROVENANCE_FILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrateConfig:
    model_dir: Path  # models/<name>/<version>
    data_dir: Path = Path("data")
    target_clean_refuse: float = 0.05
    threshold: float | None = None  # set T directly instead of from the refuse rate
    eta: float = 1.0
    max_train_samples: int = 0  # 0: the whole training set


def calibrate(cfg: CalibrateConfig) -> Manifest:
    """Compute mu, sigma, T and the clean accuracy; write and return the manifest."""
    prov = json.loads((cfg.model_dir / PROVENANCE_FILE).read_text())
    tcfg, tres = prov["config"], prov["result"]
    splits = data_mod.run_splits(
        str(tcfg["dataset"]),
        cfg.data_dir,
        int(tcfg["val_size"]),
        int(tcfg["seed"]),
        bool(tcfg["dry_run"]),
    )
    model = OnnxModel(cfg.model_dir / MODEL_FILE, device="auto")
    num_classes = len(splits.train.classes)

    train_x = splits.train.x.numpy()
    if cfg.max_train_samples:
        train_x = train_x[: cfg.max_train_samples]
    # Eq. (5): mu = log(L-1); sigma^2 = mean over the training set of (nonME - mu)^2.
    mu = kernel_mu(num_classes)
    sigma = kernel_sigma(non_me_from_log_probs(model.run_batched(train_x)), mu)
    kernel = KernelParams(mu=mu, sigma=sigma, eta=cfg.eta)

    val = score_logits(model.run_batched(splits.val.x.numpy()), kernel.to_kernel(), 0.0)
    if cfg.threshold is not None:
        threshold, rule = cfg.threshold, "set by hand"
    else:
        threshold = threshold_for_refuse_rate(val.j_score, cfg.target_clean_refuse)
        rule = (
            f"refuses {cfg.target_clean_refuse:.1%} of {len(splits.val)} held-out clean "
            "training images"
        )

    test = score_logits(model.run_batched(splits.test.x.numpy()), kernel.to_kernel(), threshold)
    y = splits.test.y.numpy()
    correct = test.label == y
    accepted = test.accepted
    metrics = {
        "clean_test_accuracy": float(correct.mean()),
        "val_accuracy": float((val.label == splits.val.y.numpy()).mean())
        if len(splits.val)
        else 0.0,
        "test_refuse_rate": float(1.0 - accepted.mean()),
        "test_accuracy_of_accepted": float(correct[accepted].mean()) if accepted.any() else 0.0,
        "test_mean_j_score": float(test.j_score.mean()),
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
        threshold=float(np.clip(threshold, 0.0, 1.0)),
        threshold_rule=rule,
        metrics=metrics,
        training=TrainingInfo(
            dataset=tcfg["dataset"],
            train_samples=int(tres.get("train_samples", len(splits.train))),
            steps=int(tres["steps"]),
            batch_size=int(tcfg["batch_size"]),
            optimizer=f"{tcfg['optimizer']} lr {tcfg['lr']} momentum {tcfg['momentum']} "
            f"wd {tcfg['weight_decay']}",
            wall_time_s=float(tres["wall_time_s"]),
            seed=int(tcfg["seed"]),
            adversarial=AdversarialConfig(**tcfg.get("adversarial", {})).describe(),
        ),
        sha256=sha256_file(model_path),
        weights_sha256=sha256_file(weights) if weights.exists() else None,
        command=shlex.join(["notsure", *sys.argv[1:]]) if sys.argv else "",
    )
    manifest.save(cfg.model_dir / MANIFEST_FILE)
    log.info(
        "calibrated %s: mu %.4f sigma %.4f T %.4f, test accuracy %.4f, refuse %.2f%%",
        cfg.model_dir,
        mu,
        sigma,
        manifest.threshold,
        metrics["clean_test_accuracy"],
        100 * metrics["test_refuse_rate"],
    )
    return manifest
