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


@pytest.mark.parametrize("name", TINY_MODELS)
def test_onnx_features_are_the_networks_and_feed_the_kernel_set(
    model_repo: Path, name: str
) -> None:
    model_dir = model_repo / name / "1"
    net, manifest = load_torch_model(model_dir)
    x = data_mod.synthetic(16, seed=4).x
    with torch.no_grad():
        want = net.features(x).numpy()  # type: ignore[operator]
    logits, feats = OnnxModel(model_dir / MODEL_FILE, device="cpu").run_with_features(x.numpy())
    assert feats is not None and logits.shape == (16, 10)
    np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-5)
    kd = manifest.k_density
    assert kd is not None and kd.dim == want.shape[1]
    kset = np.load(model_dir / kd.file)
    assert kset.shape == (10, kd.per_class, kd.dim) == (10, 1000, want.shape[1])
    # The kernel set is training features: each vector is one the network produces.
    train = data_mod.run_splits("synthetic", Path("data"), 0, 0, True).train
    with torch.no_grad():
        f_train = net.features(train.x).numpy()  # type: ignore[operator]
    d = ((kset[3, :5, None, :] - f_train[None, :, :]) ** 2).sum(-1).min(axis=1)
    assert (d < 1e-6 * (1 + (f_train**2).sum(1).max())).all()


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
