"""load_torch_model rebuilds exactly the network the ONNX graph was exported from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.manifest import MANIFEST_FILE, MODEL_FILE, WEIGHTS_FILE, Manifest
from service.runtime import OnnxModel
from tests.conftest import TINY_MODELS
from training import data as data_mod
from training.losses import served_logits
from training.modelio import WeightsMismatch, load_torch_model


@pytest.mark.parametrize("name", TINY_MODELS)
def test_torch_model_matches_the_served_onnx_graph(model_repo: Path, name: str) -> None:
    model_dir = model_repo / name / "1"
    net, manifest = load_torch_model(model_dir)
    assert not net.training
    x = data_mod.synthetic(32, seed=9).x
    with torch.no_grad():
        torch_out = served_logits(manifest.objective, net(x)).numpy()
    onnx_out = OnnxModel(model_dir / MODEL_FILE, device="cpu").run(x.numpy())
    np.testing.assert_allclose(torch_out, onnx_out, rtol=1e-4, atol=1e-4)


def test_tampered_weights_are_refused(writable_repo: Path) -> None:
    model_dir = writable_repo / "tiny-rce" / "1"
    weights = model_dir / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsMismatch, match="sha256"):
        load_torch_model(model_dir)


def test_missing_checksum_or_file_is_refused(writable_repo: Path) -> None:
    model_dir = writable_repo / "tiny-ce" / "1"
    manifest = Manifest.load(model_dir / MANIFEST_FILE)
    manifest.model_copy(update={"weights_sha256": None}).save(model_dir / MANIFEST_FILE)
    with pytest.raises(WeightsMismatch, match="weights_sha256"):
        load_torch_model(model_dir)
    manifest.save(model_dir / MANIFEST_FILE)
    (model_dir / WEIGHTS_FILE).unlink()
    with pytest.raises(WeightsMismatch, match="missing"):
        load_torch_model(model_dir)
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_torch_model(writable_repo / "tiny-ce" / "7")
