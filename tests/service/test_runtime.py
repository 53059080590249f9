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
