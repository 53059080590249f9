"""`notsure train --dry-run` -> `export` -> `calibrate` -> `serve`, end to end through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from notsure.cli import app
from service.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, sha256_file


def test_train_export_calibrate_dry_run(tmp_path: Path) -> None:
    runner = CliRunner()
    run, models = tmp_path / "run", tmp_path / "models"
    r = runner.invoke(
        app,
        [
            "train",
            "--dry-run",
            "--arch",
            "resnet8",
            "--objective",
            "ce",
            "--out",
            str(run),
            "--threads",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 20 and (run / "weights.safetensors").exists()
    log_lines = (run / "train_log.jsonl").read_text().splitlines()
    assert json.loads(log_lines[-1])["step"] == 20

    r = runner.invoke(app, ["export", str(run), "--name", "dry-ce", "--models-dir", str(models)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app, ["calibrate", str(models / "dry-ce" / "1"), "--target-clean-refuse", "0.1"]
    )
    assert r.exit_code == 0, r.output
    m = Manifest.load(models / "dry-ce" / "1" / MANIFEST_FILE)
    assert m.objective == "ce" and m.output == "logits" and m.training is not None
    assert m.training.dataset == "synthetic" and m.training.steps == 20
    assert m.sha256 == sha256_file(models / "dry-ce" / "1" / MODEL_FILE)
    assert np.isclose(m.kernel.mu, np.log(9))
    assert 0.05 <= m.metrics["test_refuse_rate"] <= 0.2  # ~10% of clean images refused
    # The held-out distribution T was chosen on is kept for every score T was computed for.
    assert set(m.score_references) == set(m.score_thresholds)
    assert m.reference is not None and m.reference.score == m.score
    assert m.reference.refuse_rate == pytest.approx(0.1, abs=0.02)
    assert m.reference.refuse_rate_at(m.threshold) == pytest.approx(
        m.reference.refuse_rate, abs=0.01
    )


def test_resume_continues_from_the_checkpoint(tmp_path: Path) -> None:
    from training.train import TrainConfig, train

    cfg = TrainConfig(
        dataset="synthetic",
        arch="mlp",
        steps=10,
        batch_size=16,
        eval_every=5,
        checkpoint_every=5,
        out_dir=tmp_path,
        dry_run=True,
    )
    first = train(cfg)
    assert first.steps == 10
    longer = TrainConfig(**{**cfg.__dict__, "steps": 14})
    second = train(longer)
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()
    ]
    assert second.steps == 14
    assert steps[-1] == 14 and steps.count(5) == 1  # resumed at 10, did not start over


def test_export_parity_is_checked(tmp_path: Path) -> None:
    import pytest

    from training import export as export_mod
    from training.train import TrainConfig, train

    run = tmp_path / "run"
    train(
        TrainConfig(
            dataset="synthetic",
            arch="mlp",
            steps=5,
            batch_size=16,
            eval_every=5,
            out_dir=run,
            dry_run=True,
        )
    )
    res = export_mod.export(
        export_mod.ExportConfig(run_dir=run, name="m", models_dir=tmp_path / "models")
    )
    assert res.max_prob_diff <= export_mod.PARITY_TOLERANCE
    # A graph that disagrees with PyTorch must be refused.
    real = export_mod.onnx_logits
    export_mod.onnx_logits = lambda path, x: real(path, x) + np.eye(1, 10, 0, dtype=np.float32)  # type: ignore[assignment]
    try:
        with pytest.raises(RuntimeError, match="parity failed"):
            export_mod.export(
                export_mod.ExportConfig(
                    run_dir=run, name="m", version=2, models_dir=tmp_path / "models"
                )
            )
    finally:
        export_mod.onnx_logits = real
