"""The bound graph run by onnxruntime computes the torch bounds: every output, any batch size,
one radius per image; and `notsure certify export` / `eval` on a real exported model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from notsure.cli import app
from service.manifest import CERTIFY_FILE
from training.certify import graph
from training.certify.bounds import ibp
from training.certify.graph import ParityError, export_certify_graph, run_graph
from training.data import synthetic
from training.losses import Objective
from training.nets import build_net


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A CNN of the bundled shape (RCE: the served logits are -Z) and its bound graph."""
    torch.manual_seed(0)
    net = build_net("cnn", (1, 28, 28), 10).eval()
    path = tmp_path_factory.mktemp("graph") / CERTIFY_FILE
    export_certify_graph(net, "rce", (1, 28, 28), path)
    return net, path


@pytest.mark.parametrize("batch", [1, 5])
def test_graph_matches_torch(exported: tuple[torch.nn.Module, Path], batch: int) -> None:
    net, path = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input", "eps"]
    assert [o.name for o in sess.get_outputs()] == ["margins", "lower", "upper"]
    x = synthetic(batch, seed=4).x
    for eps in (0.0, 1e-3, 0.1):
        got = run_graph(sess, x.numpy(), eps)
        with torch.no_grad():
            want = ibp(net, x, eps, "rce")
        assert got.margins.shape == (batch, 10, 10)
        for name in ("margins", "lower", "upper"):
            ref = getattr(want, name).numpy()
            np.testing.assert_allclose(getattr(got, name), ref, rtol=1e-5,
                                       atol=1e-5 * max(1.0, float(np.abs(ref).max())))  # fmt: skip


def test_one_radius_per_image(exported: tuple[torch.nn.Module, Path]) -> None:
    net, path = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = synthetic(3, seed=6).x
    eps = np.array([0.0, 0.01, 0.2], np.float32)
    (margins,) = sess.run(["margins"], {"input": x.numpy(), "eps": eps})
    for i, e in enumerate(eps):
        with torch.no_grad():
            want = ibp(net, x[i : i + 1], float(e), "rce").margins[0].numpy()
        np.testing.assert_allclose(margins[i], want, rtol=1e-5,
                                   atol=1e-5 * max(1.0, float(np.abs(want).max())))  # fmt: skip
    # At eps 0 the bounds collapse onto the served logits -Z.
    (lower, upper) = sess.run(["lower", "upper"], {"input": x.numpy(), "eps": eps})
    with torch.no_grad():
        served = -net(x[:1]).numpy()
    np.testing.assert_allclose(lower[0], served[0], atol=1e-4)
    np.testing.assert_allclose(upper[0], served[0], atol=1e-4)


def test_a_failed_parity_check_leaves_no_graph(
    writable_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disagree(*args: object, **kwargs: object) -> float:
        raise ParityError("bounds differ")

    monkeypatch.setattr(graph, "check_parity", disagree)
    with pytest.raises(ParityError):
        graph.export_model(writable_repo / "tiny-ce" / "1")
    assert not (writable_repo / "tiny-ce" / "1" / CERTIFY_FILE).exists()


@pytest.mark.parametrize("objective", ["ce"])
def test_export_then_eval_cli_on_a_real_model(
    writable_repo: Path, tmp_path: Path, objective: Objective
) -> None:
    """The tiny repository's CE ResNet-8 (BatchNorm in eval mode): export, then the certified
    figures from onnxruntime and from torch agree exactly."""
    model = writable_repo / f"tiny-{objective}" / "1"
    runner = CliRunner()
    out = runner.invoke(app, ["certify", "export", str(model)])
    assert out.exit_code == 0, out.output
    assert (model / CERTIFY_FILE).exists() and "parity with torch" in out.output
    figures = {}
    for backend in ("onnx", "torch"):
        path = tmp_path / f"{backend}.json"
        args = ["certify", "eval", str(model), "--dry-run", "--backend", backend, "--eps", "0.01",
                "--eps", "0.1", "--out", str(path)]  # fmt: skip
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        report = json.loads(path.read_text())
        assert report["meta"]["date"] and "CPU" in report["meta"]["machine"]
        figures[backend] = [
            (r["eps"], r["certified_accuracy"], r["certified_handled"]) for r in report["results"]
        ]
    assert figures["onnx"] == figures["torch"]
    for _, certified, handled in figures["onnx"]:
        assert 0.0 <= certified <= handled <= 1.0  # certified images are handled too


def test_eval_without_a_graph_names_the_fix(writable_repo: Path) -> None:
    shutil.rmtree(writable_repo / "tiny-rce" / "1" / CERTIFY_FILE, ignore_errors=True)
    res = CliRunner().invoke(app, ["certify", "eval", str(writable_repo / "tiny-rce" / "1"),
                                   "--dry-run"])  # fmt: skip
    assert res.exit_code != 0
    assert "notsure certify export" in str(res.exception)
