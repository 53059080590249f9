"""`notsure attack` flag parsing: --eps takes several values, lists may be comma-separated."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from notsure.attack_cli import DEFAULT_EPS, _eps, _split
from notsure.cli import app


def test_eps_values_after_the_flag_are_collected() -> None:
    assert _eps([0.05], ["0.1", "0.2", "0.3"]) == (0.05, 0.1, 0.2, 0.3)
    assert _eps(None, []) == DEFAULT_EPS
    with pytest.raises(typer.BadParameter, match="only eps values"):
        _eps([0.1], ["mnist"])


def test_lists_split_on_commas_and_repeats() -> None:
    assert _split(["a,b", " c "], ("z",)) == ("a", "b", "c")
    assert _split(None, ("z",)) == ("z",)


def test_the_command_is_registered_and_rejects_a_bad_cost(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["attack", "--cost", "mse", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "ce and/or rce" in result.output
    assert not any(tmp_path.iterdir())
