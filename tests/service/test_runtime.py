"""Execution-provider selection (the GPU path is tested by its logic: no GPU here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.manifest import MODEL_FILE
from service.runtime import CPU, CUDA, OnnxModel, ProviderUnavailable, select_providers

BOTH = [CUDA, CPU]


@pytest.mark.parametrize(
    ("device", "available", "driver", "want"),
    [
        ("auto", BOTH, True, [CUDA, CPU]),
        ("auto", BOTH, False, [CPU]),  # onnxruntime-gpu on a host without a driver
        ("auto", [CPU], True, [CPU]),
        ("cuda", BOTH, True, [CUDA, CPU]),
        ("cpu", BOTH, True, [CPU]),
    ],
)
def test_select_providers(device: str, available: list[str], driver: bool, want: list[str]) -> None:
    assert select_providers(device, available, driver) == want  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("available", "driver", "needle"),
    [
        (BOTH, False, "no NVIDIA driver"),
        ([CPU], True, "offers only CPUExecutionProvider"),
    ],
)
def test_forcing_cuda_without_it_says_why(available: list[str], driver: bool, needle: str) -> None:
    with pytest.raises(ProviderUnavailable, match=needle):
        select_providers("cuda", available, driver)


def test_cpu_session_reports_its_provider_and_signature(model_repo: Path) -> None:
    m = OnnxModel(model_repo / "tiny-rce" / "1" / MODEL_FILE, device="cpu")
    assert m.provider == CPU
    assert m.signature.input_name == "input" and m.signature.output_name == "logits"
    assert list(m.signature.input_shape[1:]) == [1, 28, 28]
    # Neither memory patterns nor the CPU arena: both keep memory for every batch shape and
    # overlap the traffic produces (docs/reliability.md, the soak's memory).
    opts = m.session.get_session_options()
    assert not opts.enable_mem_pattern and not opts.enable_cpu_mem_arena


@pytest.mark.parametrize(
    ("cores", "env", "narrow", "lone"),
    [
        (2, {}, 1, 2),  # two slots of one thread; a lone batch takes both cores
        (8, {}, 4, 8),
        (8, {"inference_threads": 1}, 8, 0),  # one slot already has every core
        (1, {}, 1, 0),  # one core: a lone batch has nothing more to take
        (8, {"lone_batch_all_cores": False}, 4, 0),
        (8, {"intra_op_threads": 2}, 2, 0),  # an explicit thread count is respected
    ],
)
def test_thread_split(
    monkeypatch: pytest.MonkeyPatch, cores: int, env: dict[str, object], narrow: int, lone: int
) -> None:
    from service import config

    monkeypatch.setattr(config.os, "cpu_count", lambda: cores)
    s = config.Settings(**env)  # type: ignore[arg-type]
    assert (s.intra_threads(), s.lone_batch_threads()) == (narrow, lone)


def test_started_service_runs_numpy_blas_on_one_thread(model_repo: Path) -> None:
    """In a fresh process (the limit is process-wide): BLAS has several threads on a
    multi-core host until the app starts, then one."""
    script = f"""
import json, os
from threadpoolctl import threadpool_info
from fastapi.testclient import TestClient
from service.config import Settings
from service.main import create_app

def blas() -> list[int]:
    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

before = blas()
with TestClient(create_app(Settings(model_repository={str(model_repo)!r}))) as client:
    assert client.get("/v2/health/ready").status_code == 200
    print(json.dumps({{"before": before, "after": blas()}}))
"""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2"}  # as on a 2-core host, whatever this one is
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["before"] and all(n == 2 for n in seen["before"])
    assert seen["after"] == [1] * len(seen["before"])
