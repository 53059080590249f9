"""`workers`: several server processes on one port, every one answering, metrics added up."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.serve_process import ServeProcess
from training.data import synthetic

RCE = "tiny-rce"


def _predictions_total(text: str) -> float:
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "notsure_predictions_total" and s.labels["model"] == RCE
    )


def test_two_workers_share_the_port_and_both_answer(model_repo: Path, tmp_path: Path) -> None:
    settings = {"NOTSURE_WORKERS": "2", "NOTSURE_MODELS": RCE, "NOTSURE_INFERENCE_THREADS": "1"}
    with ServeProcess(model_repo, tmp_path / "serve.log", settings) as server:
        # Each process makes request ids with a random prefix of its own (16 hex digits); a new
        # connection goes to either process, so both prefixes turn up when both answer.
        prefixes: set[str] = set()
        deadline = time.monotonic() + 60  # the second worker may still be loading its models
        while len(prefixes) < 2 and time.monotonic() < deadline:
            r = httpx.get(f"{server.url}/v2/health/ready", timeout=10)  # a fresh connection
            if r.status_code == 200:
                prefixes.add(r.headers["x-request-id"][:16])
        assert len(prefixes) == 2, server.log()[-2000:]
        pixels = (synthetic(3, seed=1).x.numpy()[:, 0] * 255).round().astype(int).tolist()
        for _ in range(8):
            r = httpx.post(f"{server.url}/v1/models/{RCE}/predict", json={"instances": pixels})
            assert r.status_code == 200, r.text
        # Whichever worker answers /metrics, it counts the images both answered.
        for _ in range(6):
            text = httpx.get(f"{server.url}/metrics", timeout=10).text
            assert _predictions_total(text) == 8 * 3
        assert server.terminate(timeout_s=60) == 0, server.log()[-2000:]
