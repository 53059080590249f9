"""ModelIO: normalisation, probability outputs, fixed batches and the graph checks, on tiny
graphs whose answers are computed here in numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.preprocess import GraphMismatch, ModelIO, check_input, padded_chunks
from service.runtime import OnnxModel
from tests.training.graphs import linear_classifier, softmax


def test_padded_chunks() -> None:
    x = np.arange(5, dtype=np.float32)[:, None]
    chunks = padded_chunks(x, 2)
    assert [c[:, 0].tolist() for c in chunks] == [[0, 1], [2, 3], [4, 0]]


def test_fixed_batch_of_four_runs_any_batch(tmp_path: Path) -> None:
    w = linear_classifier(tmp_path / "m.onnx", (4, 1, 3, 3), 3)
    io = ModelIO(shape=(1, 3, 3), batch_size=4)
    model = OnnxModel(tmp_path / "m.onnx", device="cpu", io=io)
    x = np.random.default_rng(0).random((6, 1, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(model.run(x), x.reshape(6, 9) @ w, rtol=1e-5)  # 4 + 2 padded


def test_normalisation_and_probabilities(tmp_path: Path) -> None:
    w = linear_classifier(tmp_path / "m.onnx", ("b", 3, 2, 2), 4, softmax=True)
    mean, std = np.array([0.1, 0.2, 0.3], np.float32), np.array([0.5, 0.25, 2.0], np.float32)
    io = ModelIO(shape=(3, 2, 2), mean=mean.reshape(1, 3, 1, 1), std=std.reshape(1, 3, 1, 1),
                 probabilities=True)  # fmt: skip
    x = np.random.default_rng(1).random((5, 3, 2, 2)).astype(np.float32)
    p = softmax(((x - mean[:, None, None]) / std[:, None, None]).reshape(5, 12) @ w)
    out = OnnxModel(tmp_path / "m.onnx", device="cpu", io=io).run(x)
    np.testing.assert_allclose(out, np.log(p), rtol=1e-4)  # log p: softmax(log p) = p
    assert np.isfinite(io.softmax_input(np.array([[0.0, 1.0]], np.float32))).all()


@pytest.mark.parametrize(
    ("dims", "io", "message"),
    [
        ((1, 1, 4, 4), ModelIO(shape=(1, 4, 4)), "fixed batch of 1 but the manifest says"),
        (("b", 1, 4, 4), ModelIO(shape=(1, 4, 4), batch_size=1), "dynamic batch axis"),
        (("b", 1, 4, 4), ModelIO(shape=(1, 5, 4)), "does not match the manifest's input_shape"),
        (("b", 17), ModelIO(shape=(1, 4, 4)), "rows of 17 values"),
        (("b", 1, 4), ModelIO(shape=(1, 4, 4)), "takes \\[batch, channels, height, width\\]"),
    ],
)
def test_graph_checks_name_the_fix(dims: tuple[object, ...], io: ModelIO, message: str) -> None:
    with pytest.raises(GraphMismatch, match=message):
        check_input(io, "image", dims, "tensor(float)")  # type: ignore[arg-type]
    assert check_input(ModelIO(shape=(1, 4, 4)), "x", ("b", 16), "tensor(float)").flat
    with pytest.raises(GraphMismatch, match="not float32"):
        check_input(io, "image", dims, "tensor(double)")  # type: ignore[arg-type]
