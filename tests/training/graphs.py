"""Tiny ONNX classifiers built node by node, standing in for models trained elsewhere: each has
weights known to the test, so its expected outputs are computed here in numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

Dim = int | str


def linear_classifier(
    path: Path,
    dims: tuple[Dim, ...],
    classes: int,
    *,
    seed: int = 0,
    softmax: bool = False,
    nan: bool = False,
    pool: bool = False,
) -> npt.NDArray[np.float32]:
    """input (dims) -> [GlobalAveragePool] -> Flatten -> MatMul W -> (B, classes) logits, or
    probabilities (softmax), or NaN (nan); returns W, (features, classes)."""
    feats = dims[1] if pool else int(np.prod([d for d in dims[1:] if isinstance(d, int)]))
    assert isinstance(feats, int)
    w = np.random.default_rng(seed).normal(0, 1, (feats, classes)).astype(np.float32)
    nodes, x = [], "image"
    if pool:
        nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"]))
        x = "pooled"
    if len(dims) == 4:
        nodes.append(helper.make_node("Flatten", [x], ["flat"]))
        x = "flat"
    nodes.append(helper.make_node("MatMul", [x, "w"], ["z"]))
    out = "z"
    if softmax:
        nodes.append(helper.make_node("Softmax", [out], ["p"], axis=1))
        out = "p"
    if nan:  # log of a negative number
        nodes.append(helper.make_node("Abs", [out], ["a"]))
        nodes.append(helper.make_node("Neg", ["a"], ["n"]))
        nodes.append(helper.make_node("Log", ["n"], ["nan"]))
        out = "nan"
    nodes.append(helper.make_node("Identity", [out], ["scores"]))
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [dims[0], classes])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return w


def not_a_classifier(path: Path) -> None:
    """A graph from a 1-D float vector to a 1-D float vector."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["v"], ["r"])],
        "relu",
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, ["n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))


def softmax(z: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    out: npt.NDArray[np.float64] = e / e.sum(axis=1, keepdims=True)
    return out
