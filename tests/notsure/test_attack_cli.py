"""`notsure attack`, the classic validator: defaults from its config, a dry run from
`AttackRunConfig.tiny()`, errors that name the fix, and a run over gRPC."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from notsure.attack_cli import register
from notsure.cli import app
from service.config import Settings
from tests.conftest import LiveServer

RCE = "tiny-rce"
KEY = "k3y"


def test_the_command_is_registered_and_rejects_a_bad_cost(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["attack", "--cost", "mse", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "ce and/or rce" in result.output
    assert not any(tmp_path.iterdir())


def test_defaults_come_from_the_config_dataclass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Options not given leave the dataclass defaults; given ones replace only their field; a
    dry run starts from `AttackRunConfig.tiny()`."""
    from training.validator import run as attack_run
    from training.validator import summary as attack_summary
    from training.validator.run import AttackRunConfig

    seen: list[AttackRunConfig] = []
    monkeypatch.setattr(attack_run, "run", lambda cfg: seen.append(cfg))
    monkeypatch.setattr(attack_summary, "write_report", lambda run, out: {"models": []})
    for args in (["attack"], ["attack", "--n", "7", "--eps", "0.1", "0.2"],
                 ["attack", "--dry-run"], ["attack", "--dry-run", "--n", "5"]):  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    assert seen[0] == AttackRunConfig()
    assert seen[1] == AttackRunConfig(n=7, eps=(0.1, 0.2))
    assert seen[2] == AttackRunConfig.tiny()
    assert seen[2].dry_run and seen[2].offline and seen[2].models == ("tiny-rce", "tiny-ce")
    assert seen[3] == AttackRunConfig.tiny(n=5)


def test_no_adaptive_switch_is_left_on_the_classic_command() -> None:
    result = CliRunner().invoke(app, ["attack", "--adaptive"])
    assert result.exit_code == 2 and "No such option" in result.output


@pytest.fixture(scope="module")
def server(model_repo: Path) -> Iterator[LiveServer]:
    with LiveServer(Settings(model_repository=model_repo, api_keys=[KEY])) as s:
        yield s


@pytest.mark.slow
def test_attack_cli_over_grpc(server: LiveServer, model_repo: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    out = tmp_path / "grpc"
    args = ["attack", "--model", RCE, "--models-dir", str(model_repo), "--protocol", "grpc",
            "--url", f"grpc://{server.grpc_target}", "--api-key", KEY, "--eps", "0.1",
            "--n", "16", "--batch-size", "8", "--out", str(out), "--cache-dir",
            str(out / "cache"), "--threads", "1", "--timeout", "30"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((out / "report.json").read_text())
    assert report["source"] == f"grpc://{server.grpc_target}"
    attack = report["models"][0]["attacks"]["ce@0.1"]["at_manifest_T"]
    assert attack["service_decision_mismatches"] == 0
    bad = CliRunner().invoke(app, ["attack", "--protocol", "carrier-pigeon"])
    assert bad.exit_code != 0 and "use http or grpc" in bad.output
