"""`notsure validate ood` end to end against a live server, and a bad option named."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import LiveServer


def test_cli_end_to_end(live_server: LiveServer, model_repo: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from notsure.cli import app

    args = ["validate", "ood", "--model", "tiny-rce", "--shift", "noise,blur", "--n", "32",
            "--url", live_server.url, "--models-dir", str(model_repo),
            "--out", str(tmp_path)]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "tiny-rce" in r.output and "blur" in r.output and "AUROC" in r.output
    rows = json.loads((tmp_path / "ood.json").read_text())["models"][0]["rows"]
    assert {r["set"] for r in rows} == {"noise", "blur"} and {r["n"] for r in rows} == {32}
    bad = CliRunner().invoke(app, ["validate", "ood", "--shift", "sideways"])
    assert bad.exit_code != 0 and "noise" in bad.output
