"""`notsure audit`: a dry run end to end from `AuditConfig.tiny()`, the options given replace
only their fields, and an unknown plan is refused with the plans there are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from notsure.cli import app


def test_dry_run_end_to_end(tmp_path: Path) -> None:
    work = tmp_path / "audit"
    result = CliRunner().invoke(
        app, ["audit", "--dry-run", "--work-dir", str(work), "--chunk", "4"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((work / "adaptive.json").read_text())
    assert {r["model"] for r in rows} == {"tiny-rce", "tiny-ce"}
    assert {"lagrangian", "none"} <= {r["attack"] for r in rows}
    assert f"rows: {work / 'adaptive.json'}" in result.output
    assert (work / "dry-run-models" / "tiny-rce" / "1" / "manifest.json").exists()


def test_options_replace_only_their_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from training.audit import plans
    from training.audit.subject import AuditConfig

    seen: list[AuditConfig] = []
    monkeypatch.setattr(plans, "run", lambda cfg: seen.append(cfg) or [])
    for args in (["audit"], ["audit", "--plan", "checks", "--eps", "0.1", "0.3"],
                 ["audit", "--dry-run", "--work-dir", str(tmp_path)],
                 ["audit", "--dry-run", "--json", str(tmp_path / "rows.json")]):  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    assert seen[0] == AuditConfig()
    assert seen[1] == AuditConfig(plan="checks", eps=(0.1, 0.3))
    assert seen[2] == AuditConfig.tiny(tmp_path)
    assert seen[2].out_json == tmp_path / "adaptive.json"  # never the measured rows
    assert seen[3] == AuditConfig.tiny(out_json=tmp_path / "rows.json")


def test_an_unknown_plan_is_refused_with_the_plans_there_are(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["audit", "--dry-run", "--plan", "all", "--work-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "unknown plan" in result.output and "worst-case" in result.output
    assert not any(tmp_path.iterdir())  # refused before anything is built
