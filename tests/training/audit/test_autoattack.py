"""AutoAttack in the audit: it attacks the served logits (-Z for RCE), its robust accuracy is
the service's argmax on its images, and the plan's rows carry date and machine and resume."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from service.scoring import Kernel, score_logits
from training import data as data_mod
from training.audit import plans
from training.audit.autoattack import autoattack_images, autoattack_json, autoattack_net
from training.audit.subject import AuditConfig, Models
from training.modelio import load_torch_model


def test_the_net_attacked_is_the_served_one_minus_z_for_rce() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        z = net(x)
        torch.testing.assert_close(autoattack_net(net, "rce")(x), -z)
        torch.testing.assert_close(autoattack_net(net, "ce")(x), z)
    assert not autoattack_net(net, "rce").training  # AutoAttack needs eval mode (batch norm)


def _served_accuracy(net: nn.Module, kernel: Kernel, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of `service.scoring`'s label on the RCE net's served logits -Z."""
    with torch.no_grad():
        s = score_logits((-net(x)).numpy(), kernel)
    return float((s.label == y.numpy()).mean())


def test_autoattack_on_rce_needs_the_minus_sign(model_repo: Path) -> None:
    """Given the raw logits Z of an RCE net, AutoAttack takes the served-right images for
    already fooled (argmax Z is the least likely served class) and returns them untouched;
    given -Z, it fools the service."""
    net, m = load_torch_model(model_repo / "tiny-rce" / "1")
    ds = data_mod.synthetic(8, seed=5)
    kernel = m.kernel.to_kernel()
    clean = _served_accuracy(net, kernel, ds.x, ds.y)
    assert clean == 1.0
    right = autoattack_images(net, "rce", ds.x, ds.y, 0.3, m.num_classes)
    wrong = autoattack_images(net, "ce", ds.x, ds.y, 0.3, m.num_classes)  # Z as if served
    assert (right - ds.x).abs().max() <= 0.3 + 1e-6 and right.min() >= 0 and right.max() <= 1
    assert _served_accuracy(net, kernel, right, ds.y) < 0.5
    torch.testing.assert_close(wrong, ds.x)
    assert _served_accuracy(net, kernel, wrong, ds.y) == clean


@pytest.fixture
def cfg(model_repo: Path, tmp_path: Path) -> AuditConfig:
    return AuditConfig(
        plan="autoattack",
        models=("tiny-rce", "tiny-ce"),
        models_dir=model_repo,
        work_dir=tmp_path / "work",
        out_json=tmp_path / "adaptive.json",
        chunk=3,
        dry_run=True,
        eps=(0.05,),
    )


def test_plan_rows_are_the_served_argmax_with_date_and_machine_and_resume(
    cfg: AuditConfig,
) -> None:
    models = Models(cfg)
    rows = plans.run(cfg, models)
    assert json.loads(autoattack_json(cfg).read_text()) == rows
    assert not cfg.out_json.exists()  # the audit's rows are not touched
    assert {r["model"] for r in rows} == {"tiny-rce", "tiny-ce"}
    for r in rows:
        assert (r["attack"], r["eps"], r["n"], r["version"]) == ("autoattack", 0.05, 8, "standard")
        assert set(r["run"]) == {"date", "machine"}  # type: ignore[arg-type]
        assert r["max_linf"] <= 0.05 + 1e-6  # type: ignore[operator]
        # Recomputed from the saved images' served labels, independent of the row builder.
        model = models[str(r["model"])]
        folder = next((cfg.work_dir / model.name).glob("autoattack-eps0.05-n8-*"))
        robust = np.concatenate([np.load(f)["robust"] for f in sorted(folder.glob("chunk-*.npz"))])
        assert r["robust_accuracy"] == round(float(robust.mean()), 4)
        assert r["robust_accuracy"] <= r["clean_accuracy"]  # type: ignore[operator]
    before = {p: p.stat().st_mtime_ns for p in cfg.work_dir.rglob("chunk-*.npz")}
    assert len(before) == 2 * 3  # 8 images in chunks of 3, per model
    assert plans.run(cfg, models) == rows  # a second run attacks nothing again
    assert {p: p.stat().st_mtime_ns for p in cfg.work_dir.rglob("chunk-*.npz")} == before
    # Another budget adds its rows beside these.
    more = plans.run(replace(cfg, eps=(0.1,)), models)
    assert {r["eps"] for r in more} == {0.05, 0.1}
