"""The tiny model repository: a calibrated RCE and CE ResNet-8 on the synthetic set.

One builder for the test suite's fixture and for every command's --dry-run, so both exercise
the same train -> export -> calibrate path as the bundled models, in a few seconds.
"""

from __future__ import annotations

from pathlib import Path

from service.manifest import MANIFEST_FILE

TINY_MODELS = ("tiny-rce", "tiny-ce")


def tiny_repo(root: Path, work: Path, threads: int = 0) -> Path:
    """Build models/tiny-rce/1 and tiny-ce/1 under root (training runs under work); versions
    already there are kept, so a second call costs nothing. Returns root."""
    from training.calibrate import CalibrateConfig, calibrate
    from training.export import ExportConfig, export
    from training.train import TrainConfig, train

    for name in TINY_MODELS:
        if (root / name / "1" / MANIFEST_FILE).exists():
            continue
        run = work / name
        cfg = TrainConfig(
            dataset="synthetic",
            arch="resnet8",
            objective="rce" if name.endswith("rce") else "ce",
            steps=60,
            batch_size=32,
            optimizer="adam",
            lr=3e-3,
            weight_decay=0.0,
            eval_every=60,
            checkpoint_every=10_000,
            out_dir=run,
            dry_run=True,
            threads=threads,
        )
        train(cfg)
        export(ExportConfig(run_dir=run, name=name, models_dir=root, parity_samples=64))
        calibrate(CalibrateConfig(model_dir=root / name / "1"))
    return root
