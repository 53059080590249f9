"""Execution-provider selection (the GPU path is tested by its logic: no GPU here)."""

from __future__ import annotations

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


@pytest.mark.parametrize(
    ("cores", "env", "narrow", "wide"),
    [
        (2, {}, 1, 2),  # two slots of one thread; a lone batch takes both cores
        (8, {}, 4, 8),
        (8, {"inference_threads": 1}, 8, 0),  # one slot already has every core
        (1, {}, 1, 0),  # nothing to widen on one core
        (8, {"lone_batch_all_cores": False}, 4, 0),
        (8, {"intra_op_threads": 2}, 2, 0),  # an explicit thread count is respected
    ],
)
def test_thread_split(
    monkeypatch: pytest.MonkeyPatch, cores: int, env: dict[str, object], narrow: int, wide: int
) -> None:
    from service import config

    monkeypatch.setattr(config.os, "cpu_count", lambda: cores)
    s = config.Settings(**env)  # type: ignore[arg-type]
    assert (s.intra_threads(), s.lone_batch_threads()) == (narrow, wide)
