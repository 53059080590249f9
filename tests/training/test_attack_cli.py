"""`notsure attack` flag parsing: --eps takes several values, lists may be comma-separated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from notsure.attack_cli import _eps, _split
from notsure.cli import app


def test_eps_values_after_the_flag_are_collected() -> None:
    assert _eps([0.05], ["0.1", "0.2", "0.3"]) == (0.05, 0.1, 0.2, 0.3)
    assert _eps(None, []) is None  # the config's default applies
    with pytest.raises(typer.BadParameter, match="only eps values"):
        _eps([0.1], ["mnist"])


def test_lists_split_on_commas_and_repeats() -> None:
    assert _split(["a,b", " c "]) == ("a", "b", "c")
    assert _split(None) is None


def test_the_command_is_registered_and_rejects_a_bad_cost(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["attack", "--cost", "mse", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "ce and/or rce" in result.output
    assert not any(tmp_path.iterdir())


def test_defaults_come_from_the_config_dataclass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Options not given leave the dataclass defaults; given ones replace only their field."""
    from training.attack import run as attack_run
    from training.attack import summary as attack_summary
    from training.attack.run import AttackRunConfig

    seen: list[AttackRunConfig] = []
    monkeypatch.setattr(attack_run, "run", lambda cfg: seen.append(cfg))
    monkeypatch.setattr(attack_summary, "write_report", lambda run, out: {"models": []})
    assert CliRunner().invoke(app, ["attack"]).exit_code == 0
    assert CliRunner().invoke(app, ["attack", "--n", "7", "--eps", "0.1", "0.2"]).exit_code == 0
    assert seen[0] == AttackRunConfig()
    assert seen[1] == AttackRunConfig(n=7, eps=(0.1, 0.2))


def test_adaptive_dry_run_end_to_end(tmp_path: Path) -> None:
    work = tmp_path / "audit"
    result = CliRunner().invoke(
        app, ["attack", "--adaptive", "--dry-run", "--work-dir", str(work), "--chunk", "4"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((work / "adaptive.json").read_text())
    assert {r["model"] for r in rows} == {"tiny-rce", "tiny-ce"}
    assert {"lagrangian", "none"} <= {r["attack"] for r in rows}
    assert f"rows: {work / 'adaptive.json'}" in result.output


def test_adaptive_rejects_an_unknown_plan(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["attack", "--adaptive", "--dry-run", "--plan", "all", "--work-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "unknown plan" in result.output
