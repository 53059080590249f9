"""The model-control benchmark's dry run, end to end: a live `notsure serve` under a closed loop
while a new version is copied in, loaded by the API and found by polling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.model_control import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_new_version_arrives_under_load_without_a_failed_request(
    model_repo: Path, tmp_path: Path
) -> None:
    out = tmp_path / "control"
    argv = ["--dry-run", "--model", "tiny-rce", "--repo", str(model_repo), "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert [m["mode"] for m in result["modes"]] == ["explicit", "poll"]
    for m in result["modes"]:
        assert m["requests"] > 0 and m["failed"] == 0 and m["by_status"] == {"200": m["requests"]}
        # Both versions answered: version 1 before the copy, version 2 after it.
        assert m["by_version"]["1"] > 0 and m["by_version"]["2"] > 0
        assert m["first_new_answer_s"] is not None and m["first_new_answer_s"] >= 0
        states = {(e["name"], e["version"]): e["state"] for e in m["index_after"]}
        assert states == {("tiny-rce", "1"): "READY", ("tiny-rce", "2"): "READY"}
    explicit = result["modes"][0]
    assert explicit["load_status"] == 200 and explicit["load_call_s"] > 0
    assert result["date"] in out.with_suffix(".md").read_text()
