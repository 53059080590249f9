"""Certified training: the schedules' values, a dry run through the CLI, resume, and that the
certificates of the trained network stand against PGD."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from notsure.cli import app
from training.adversarial import linf_pgd
from training.certify.bounds import ibp
from training.certify.schedule import Schedule
from training.certify.train import CertifyTrainConfig, train
from training.data import run_splits
from training.nets import build_net


def test_linear_ramp_and_kappa_by_hand() -> None:
    s = Schedule(eps=0.4, warmup_steps=2000, ramp_steps=10_000, kappa_final=0.5, shape="linear")
    assert [s.eps_at(t) for t in (0, 1999, 2000)] == [0.0, 0.0, 0.0]
    assert s.eps_at(7000) == pytest.approx(0.2)
    assert s.eps_at(12_000) == s.eps_at(60_000) == pytest.approx(0.4)
    assert [s.kappa_at(t) for t in (0, 7000, 12_000)] == pytest.approx([1.0, 0.75, 0.5])


def test_smoothed_ramp_is_continuous_monotone_and_ends_at_eps() -> None:
    s = Schedule(eps=0.4, warmup_steps=100, ramp_steps=1000, shape="smoothed")
    values = [s.eps_at(t) for t in range(0, 1300)]
    assert values[100] == 0.0 and values[1100] == pytest.approx(0.4)
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert max(abs(b - a) for a, b in itertools.pairwise(values)) < 0.4 / 1000 * 1.5
    # Polynomial start: at a tenth of the way to the mid point, (1/10)^4 of the mid value.
    mid = 100 + 250
    assert s.eps_at(100 + 25) == pytest.approx(s.eps_at(mid) * 1e-4, rel=1e-6)


def test_no_ramp_means_full_eps_from_the_start() -> None:
    s = Schedule(eps=0.3, warmup_steps=0, ramp_steps=0)
    assert s.eps_at(0) == 0.3 and s.kappa_at(0) == pytest.approx(0.5)


def test_dry_run_cli_logs_epochs_and_keeps_the_best(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["certify", "train", "--dry-run", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "kept epoch" in result.output
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(records) == 10  # 40 steps, 4 an epoch
    assert all(0 <= r["val_verified"] <= r["val_clean"] <= 1 for r in records)
    assert [r["eps"] for r in records][-1] == pytest.approx(0.1)
    best = max(records, key=lambda r: (r["val_verified"], r["val_clean"]))
    summary = json.loads((out / "result.json").read_text())
    assert summary["best"]["step"] == best["step"]
    assert summary["best"]["val_verified"] > 0, "the dry run certifies nothing: a broken loop"
    # The kept weights are the best epoch's, in the file `notsure export` reads.
    kept = load_file(str(out / "weights.safetensors"))
    assert all(torch.equal(kept[k], v) for k, v in load_file(str(out / "best.safetensors")).items())
    assert json.loads((out / "train_config.json").read_text())["arch"] == "mlp"


def test_resume_continues_the_same_run(tmp_path: Path) -> None:
    cfg = CertifyTrainConfig.tiny(steps=16, out_dir=tmp_path / "straight")
    straight = train(cfg)
    split = replace(cfg, out_dir=tmp_path / "split", stop_after=6)
    first = train(split)
    assert not first.finished and first.steps == 6
    assert not (tmp_path / "split" / "result.json").exists()
    second = train(replace(split, stop_after=0))
    assert second.finished and second.steps == 16
    a = load_file(str(tmp_path / "straight" / "weights.safetensors"))
    b = load_file(str(tmp_path / "split" / "weights.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert straight.best["step"] == second.best["step"]


def test_trained_certificates_stand_against_pgd(tmp_path: Path) -> None:
    cfg = CertifyTrainConfig.tiny(out_dir=tmp_path / "run")
    train(cfg)
    splits = run_splits(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.seed, True)
    net = build_net(cfg.arch, splits.test.input_shape, 10)
    net.load_state_dict(load_file(str(cfg.out_dir / "weights.safetensors")))
    net.eval()
    x, y = splits.test.x, splits.test.y
    with torch.no_grad():
        cert = ibp(net, x, cfg.eval_eps, cfg.objective).certified(y)
    assert int(cert.sum()) >= 5, "too few certified images for the check to mean anything"
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # restarts
        adv = linf_pgd(net, x[cert], y[cert], cfg.objective, cfg.eval_eps, 20, 0.02, True, g)
        assert float((adv - x[cert]).abs().max()) <= cfg.eval_eps + 1e-6
        with torch.no_grad():
            assert (net(adv).argmax(1) == y[cert]).all(), "PGD flipped a certified image"


def test_resnets_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="BatchNorm"):
        train(CertifyTrainConfig.tiny(arch="resnet8", out_dir=tmp_path))


def test_a_certified_run_exports_and_calibrates_like_any_other(tmp_path: Path) -> None:
    from service.manifest import MANIFEST_FILE, Manifest
    from training.calibrate import CalibrateConfig, calibrate
    from training.certify.graph import export_model
    from training.export import ExportConfig, export

    run = tmp_path / "run"
    train(CertifyTrainConfig.tiny(steps=8, out_dir=run))
    export(ExportConfig(run_dir=run, name="certified", models_dir=tmp_path / "models",
                        parity_samples=16))  # fmt: skip
    model = tmp_path / "models" / "certified" / "1"
    calibrate(CalibrateConfig(model_dir=model))
    manifest = Manifest.load(model / MANIFEST_FILE)
    assert manifest.architecture == "mlp" and manifest.objective == "ce"
    result = json.loads((run / "result.json").read_text())
    sch, best = result["config"]["schedule"], result["best"]
    info = manifest.training
    assert info is not None and info.adversarial.startswith(f"ibp eps {sch['eps']:g}, ")
    assert info.kept.startswith(f"step {best['step']} (epoch {best['epoch']:.1f}): best held-out "
                                f"IBP-verified accuracy {best['val_verified']:.1%}")  # fmt: skip
    assert "CPU cores" in info.hardware
    path, worst = export_model(model, parity_images=8)
    assert path.exists() and worst < 1e-5
