"""Transfer check on the tiny models: its counts are what the service decides on the images."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from service.scoring import score_logits
from training.audit import plans
from training.audit.subject import AuditConfig, Models
from training.audit.transfer import cached_craft

MODELS = ("tiny-rce", "tiny-ce")


@pytest.fixture
def cfg(model_repo: Path, tmp_path: Path) -> AuditConfig:
    return AuditConfig(
        plan="headline", models=MODELS, models_dir=model_repo, work_dir=tmp_path / "work",
        out_json=tmp_path / "adaptive.json", chunk=8, dry_run=True,
    )  # fmt: skip


@pytest.fixture
def models(cfg: AuditConfig) -> Models:
    return Models(cfg)


def test_transfer_rows_count_the_targets_served_wins(models: Models, cfg: AuditConfig) -> None:
    plans.run(cfg, models)  # the white-box wins the transfer is compared with
    plans.run(replace(cfg, plan="transfer"), models)
    rows = json.loads(cfg.out_json.with_name("checks.json").read_text())
    transfer = [r for r in rows if r["check"].startswith("transfer-from-")]
    # every source x eps x target
    assert {(r["check"], r["model"], r["eps"]) for r in transfer} == {
        (f"transfer-from-{s}", t, e) for s in MODELS for t in MODELS for e in (0.1, 0.3)
    }
    for r in transfer:
        source, target = (
            models[r["check"].removeprefix("transfer-from-")],
            models[r["model"]],
        )
        adv = cached_craft(cfg, source, r["eps"], r["n"], 3)
        x = source.data.x[: r["n"]].numpy()
        assert np.abs(adv - x).max() <= r["eps"] + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        # Independent recount: the target's ONNX graph and the service's scoring at its T.
        s = score_logits(target.onnx.run(adv), target.manifest.kernel.to_kernel())
        score = s.j_score if target.manifest.score == "j_score" else s.confidence
        y = target.data.y[: r["n"]].numpy()
        expected = ((s.label != y) & (score >= target.manifest.threshold)).mean()
        assert r["transfer_success"] == pytest.approx(expected)
        assert 0 <= r["transfer_only"] <= r["transfer_success"]
