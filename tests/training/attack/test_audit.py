"""The audit runner end to end on the tiny models: rows, worst case, resume, served wins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.scoring import score_logits
from training.attack import audit
from training.attack.plan import all_jobs, plan_jobs

MODELS = ("tiny-rce", "tiny-ce")
KEYS = {"model", "score", "attack", "eps", "n", "steps", "restarts", "attack_success", "handled"}


@pytest.fixture
def cfg(model_repo: Path, tmp_path: Path) -> audit.AuditConfig:
    return audit.AuditConfig(
        plan="headline",
        models=MODELS,
        models_dir=model_repo,
        work_dir=tmp_path / "work",
        out_json=tmp_path / "adaptive.json",
        chunk=3,
        dry_run=True,
    )


def _chunk_files(cfg: audit.AuditConfig) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in cfg.work_dir.rglob("chunk-*.npz")}


def test_headline_rows_worst_case_and_resume(cfg: audit.AuditConfig) -> None:
    rows = audit.run(cfg)
    assert json.loads(cfg.out_json.read_text()) == rows
    for r in rows:
        assert set(r) >= KEYS
        assert 0.0 <= r["attack_success"] <= 1.0
        assert r["handled"] == pytest.approx(1 - r["attack_success"])
    attacked = [r for r in rows if r["attack"] == "lagrangian"]
    assert {(r["model"], r["eps"]) for r in attacked} == {
        (m, e) for m in MODELS for e in (0.05, 0.1, 0.2, 0.3)
    }
    clean = [r for r in rows if r["attack"] == "none"]
    assert {r["model"] for r in clean} == set(MODELS)
    before = _chunk_files(cfg)
    assert before
    # A second run finds every chunk and attacks nothing again.
    assert audit.run(cfg) == rows
    assert _chunk_files(cfg) == before


def test_resume_after_a_lost_chunk_redoes_only_that_chunk(cfg: audit.AuditConfig) -> None:
    audit.run(cfg)
    before = _chunk_files(cfg)
    lost = sorted(before)[1]
    lost.unlink()
    audit.run(cfg)
    after = _chunk_files(cfg)
    assert set(after) == set(before)
    assert [p for p in after if after[p] != before[p]] == [lost]


def test_saved_wins_are_what_the_service_scoring_decides(cfg: audit.AuditConfig) -> None:
    audit.run(cfg)
    job = plan_jobs("headline", MODELS, dry_run=True)[0]
    model = audit._MODELS[job.model]
    saved = audit.load_chunks(audit.job_dir(cfg, model, job))
    assert saved is not None
    logits = model.onnx.run(saved["adv"])
    s = score_logits(logits, model.manifest.kernel.to_kernel())
    y = model.data.y[: len(saved["idx"])].numpy()
    np.testing.assert_array_equal(
        saved["served_won"], (s.label != y) & (s.score >= model.manifest.threshold)
    )
    eps = job.attack.eps
    assert (np.abs(saved["adv"] - model.data.x[: len(y)].numpy()) <= eps + 1e-6).all()


def test_worst_case_counts_an_image_won_by_any_attack(cfg: audit.AuditConfig) -> None:
    audit.run(cfg)
    rows = audit.run(audit.AuditConfig(**{**cfg.__dict__, "plan": "secondary"}))
    for wc in (r for r in rows if r["attack"] == "worst-case"):
        same = [
            r
            for r in rows
            if r["attack"] not in ("worst-case", "none", "cw-l2")
            and all(r[k] == wc[k] for k in ("model", "score", "eps", "clean_refusal"))
            and r["n"] == wc["n"]
        ]
        assert same
        assert wc["attack_success"] >= max(r["attack_success"] for r in same)


def test_plans_have_unique_jobs_and_keys() -> None:
    jobs = all_jobs(("a-rce", "a-ce"))
    assert len({j.key("sha") for j in jobs}) == len(jobs)
    assert len({(j.model, j.name) for j in jobs}) == len(jobs)  # a job's folder: <model>/<name>


def test_unknown_plan_is_refused(cfg: audit.AuditConfig) -> None:
    with pytest.raises(ValueError, match="unknown plan"):
        audit.run(audit.AuditConfig(**{**cfg.__dict__, "plan": "everything"}))
