"""The public RCE API (`training.rce`): the loss in a user's own loop, the export with negated
logits, and the import that serves such a model on the J-score."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from service.config import Settings
from service.main import create_app
from tests.training.graphs import softmax
from training.importer import ImportConfig, import_model
from training.rce import export_neg_logits, rce_loss


def test_rce_loss_by_hand() -> None:
    # Equal logits over 3 classes: every log p = -log 3, so the mean over the 2 others is log 3.
    assert rce_loss(torch.zeros(1, 3), torch.tensor([0])).item() == pytest.approx(math.log(3))
    # Z = (2, 0, 0), target 0: log p_other = -log(e^2 + 2), the loss is log(e^2 + 2).
    z = torch.tensor([[2.0, 0.0, 0.0]])
    assert rce_loss(z, torch.tensor([0])).item() == pytest.approx(math.log(math.e**2 + 2))


def _blocks(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, 6, 6): class k has rows 2k..2k+1 bright, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.rand((n, 1, 6, 6), generator=g) * 0.3
    for k in range(3):
        x[y == k, :, 2 * k : 2 * k + 2] += 0.7
    return x.clamp(0, 1), y


def test_own_loop_with_rce_loss_exports_and_imports_as_rce(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = _blocks(256, 0)
    for _ in range(60):
        loss = rce_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    path = export_neg_logits(net, tmp_path / "rce.onnx", input_shape=(1, 6, 6))
    xt, yt = _blocks(200, 1)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"image": xt.numpy()})[0]
    with torch.no_grad():
        z = net(xt).numpy()
    np.testing.assert_allclose(out, -z, atol=1e-5)
    assert (softmax(-z).argmax(1) == yt.numpy()).mean() > 0.9  # RCE predicts with softmax(-Z)

    np.savez(tmp_path / "held.npz", x=xt.numpy(), y=yt.numpy())
    repo = tmp_path / "models"
    m = import_model(ImportConfig(model=path, name="own-rce", data=tmp_path / "held.npz",
                                  output="neg_logits", repository=repo)).manifest  # fmt: skip
    assert (m.objective, m.output, m.score) == ("rce", "neg_logits", "j_score")
    # sigma on a fifth of the images, T on the other four fifths.
    assert (m.metrics["kernel_samples"], m.metrics["heldout_samples"]) == (40, 160)
    probe = xt[:4].numpy()
    with TestClient(create_app(Settings(model_repository=repo))) as c:
        preds = c.post("/v1/models/own-rce/predict", json={"instances": probe.tolist()}).json()
    want = softmax(-z[:4])
    got = [p["confidence"] for p in preds["predictions"]]
    np.testing.assert_allclose(got, want.max(axis=1), rtol=1e-5)
