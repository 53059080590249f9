"""`notsure repro`: configs from the dataclasses (`replace(Cfg(), **given)`), dry runs from
`Cfg.tiny()`, nothing outside the repository by default, and a dry run end to end."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from notsure.cli import app
from training.repro import bnn, cnn_pair, tsne
from training.repro.common import DRY_RUN_RUNS


def test_no_default_points_outside_the_repository() -> None:
    for cfg in (cnn_pair.CnnPairConfig(), bnn.BnnConfig(), tsne.TsneConfig()):
        assert not Path(cfg.data_dir).is_absolute() and ".." not in Path(cfg.data_dir).parts


def test_options_replace_only_their_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []
    empty = {"models": {}}
    monkeypatch.setattr(cnn_pair, "run", lambda cfg, out, name: seen.append(cfg) or empty)
    monkeypatch.setattr(bnn, "run", lambda cfg, out: seen.append(cfg) or empty)
    runs = [
        ["repro", "table4"],
        ["repro", "table4", "--steps", "10", "--eps", "0.2"],
        ["repro", "table4", "--dry-run"],
        ["repro", "fashion", "--seed", "3"],
        ["repro", "bnn", "--burn-in", "5", "--seed", "2"],
        ["repro", "bnn", "--dry-run"],
    ]
    for args in runs:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    pair = cnn_pair.CnnPairConfig()
    assert seen[0] == pair
    assert seen[1] == replace(pair, steps=10, eps=(0.2,))
    assert seen[2] == cnn_pair.CnnPairConfig.tiny() and seen[2].runs_dir == DRY_RUN_RUNS  # type: ignore[attr-defined]
    assert seen[3] == replace(pair, dataset="fashion-mnist", seed=3)
    b = bnn.BnnConfig()
    assert seen[4] == replace(b, seed=2, sampler=replace(b.sampler, burn_in=5, seed=2))
    assert seen[5] == bnn.BnnConfig.tiny()


def test_cli_repro_dry_run_writes_outside_docs(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["repro", "table4", "--dry-run", "--out-dir", str(tmp_path / "o"),
         "--runs-dir", str(tmp_path / "runs"), "--eps", "0.2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "table4 rce: test accuracy" in result.output
    assert (tmp_path / "o" / "table4.json").exists()
    assert (tmp_path / "o" / "reproduction.md").exists()
