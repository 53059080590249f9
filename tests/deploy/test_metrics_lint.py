"""`promtool check metrics` (Prometheus' own linter) has nothing to say about a live /metrics,
with one worker and with two (prometheus_client's multiprocess mode), after real traffic."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.conftest import ROOT, ServiceProcess, tool

MODEL = "mnist-resnet32-rce"


def traffic(url: str) -> None:
    """Accepted (a blank frame: "1") and NOT SURE (noise) answers, and a client error."""
    x = np.concatenate([np.zeros((2, 28, 28)), np.random.default_rng(0).random((6, 28, 28))])
    for i in range(4):
        r = httpx.post(f"{url}/v1/models/{MODEL}/predict",
                       json={"instances": x[2 * i : 2 * i + 2].tolist()}, timeout=30)  # fmt: skip
        assert r.status_code == 200, r.text
    bad = httpx.post(f"{url}/v1/models/{MODEL}/predict", json={"instances": [[[2.0]]]}, timeout=30)
    assert bad.status_code == 422


@pytest.mark.parametrize("workers", [1, 2])
def test_promtool_finds_nothing_to_fix(workers: int, tmp_path: Path) -> None:
    env = {"NOTSURE_MODEL_REPOSITORY": str(ROOT / "models"), "NOTSURE_MODELS": MODEL,
           "NOTSURE_DEVICE": "cpu", "NOTSURE_WORKERS": str(workers),
           "NOTSURE_RECORD_RATE": "1", "NOTSURE_RECORD_DIR": str(tmp_path / "records"),
           "NOTSURE_MONITOR_INTERVAL_S": "0.2"}  # fmt: skip
    with ServiceProcess(tmp_path, env) as service:
        texts = []
        # With two workers the kernel spreads connections over both: a few scrapes reach each.
        for _ in range(3 * workers):
            traffic(service.url)
            texts.append(httpx.get(f"{service.url}/metrics", timeout=10).text)
    for text in texts:
        r = subprocess.run([tool("promtool"), "check", "metrics"], input=text,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr
    families = {f.name: f for f in text_string_to_metric_families(texts[-1])}
    # (With workers, a series that was never set, e.g. no request shed yet, is not listed.)
    want = ("notsure_build_info", "notsure_threshold", "notsure_calibrated_refuse_rate",
            "notsure_window_images", "notsure_records_written", "notsure_j_score",
            "process_resident_memory_bytes", "process_cpu_seconds", "python_info")  # fmt: skip
    for name in want:
        assert name in families, name
    pids = {s.labels.get("pid") for s in families["process_resident_memory_bytes"].samples}
    # One process's metrics unlabelled; with workers, one series per worker, labelled pid.
    assert len(pids) == workers and (None in pids) == (workers == 1)
    (build,) = families["notsure_build_info"].samples
    assert build.value == 1 and set(build.labels) == {"version", "python", "onnxruntime"}
