"""The audit runner end to end on the tiny models: rows, worst case, resume, served wins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.scoring import score_logits, threshold_for_refuse_rate
from training.audit import plans, store
from training.audit.jobs import all_jobs, plan_jobs
from training.audit.subject import AuditConfig, Models

MODELS = ("tiny-rce", "tiny-ce")
KEYS = {"model", "score", "attack", "eps", "n", "steps", "restarts", "attack_success", "handled"}


@pytest.fixture
def cfg(model_repo: Path, tmp_path: Path) -> AuditConfig:
    return AuditConfig(
        plan="headline",
        models=MODELS,
        models_dir=model_repo,
        work_dir=tmp_path / "work",
        out_json=tmp_path / "adaptive.json",
        chunk=3,
        dry_run=True,
    )


@pytest.fixture
def models(cfg: AuditConfig) -> Models:
    """The tiny models, loaded once for every plan a test runs."""
    return Models(cfg)


def _chunk_files(cfg: AuditConfig) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in cfg.work_dir.rglob("chunk-*.npz")}


def test_headline_rows_worst_case_and_resume(models: Models, cfg: AuditConfig) -> None:
    rows = plans.run(cfg, models)
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
    assert plans.run(cfg, models) == rows
    assert _chunk_files(cfg) == before


def test_resume_after_a_lost_chunk_redoes_only_that_chunk(models: Models, cfg: AuditConfig) -> None:
    import shutil

    plans.run(cfg, models)
    before = _chunk_files(cfg)
    lost = sorted(before)[1]
    lost.unlink()
    plans.run(cfg, models)  # the kept results still hold that chunk's images: nothing to redo
    assert _chunk_files(cfg) == {p: t for p, t in before.items() if p != lost}
    shutil.rmtree(cfg.out_json.parent / "results")  # lost with them: that chunk is redone
    plans.run(cfg, models)
    after = _chunk_files(cfg)
    assert set(after) == set(before)
    assert [p for p in after if after[p] != before[p]] == [lost]


def test_a_fresh_checkout_resumes_from_the_kept_results(models: Models, cfg: AuditConfig) -> None:
    """The work folder (images) is not committed; the kept results beside the JSON rows are.
    Without the work folder nothing is attacked again and the rows stay the same."""
    import shutil

    rows = plans.run(cfg, models)
    kept = sorted((cfg.out_json.parent / "results").rglob("*.npz"))
    assert kept and all(store.IMAGES not in np.load(p).files for p in kept)
    shutil.rmtree(cfg.work_dir)
    cfg.out_json.unlink()  # the rows are written again: same figures, a new run stamp
    assert [_figures(r) for r in plans.run(cfg, models)] == [_figures(r) for r in rows]
    assert _chunk_files(cfg) == {}
    # A kept result and a chunk of the same job combine, image by image.
    job = plan_jobs("headline", MODELS, dry_run=True)[0]
    model = models[job.model]
    joined = store.load_job(cfg, model, job)
    assert joined is not None
    np.testing.assert_array_equal(joined["idx"], np.arange(job.n))


def test_rebuilding_rows_leaves_unchanged_kept_results_untouched(
    models: Models, cfg: AuditConfig
) -> None:
    """The kept results are committed: a run that adds nothing must not rewrite them (a zip
    written again differs in its timestamps, and every file would show up as changed)."""
    import time

    plans.run(cfg, models)
    kept = sorted((cfg.out_json.parent / "results").rglob("*.npz"))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in kept}
    time.sleep(2.1)  # zip timestamps have a resolution of two seconds
    plans.run(cfg, models)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in kept} == before


def test_a_cascade_waits_for_the_attacks_it_follows(models: Models, cfg: AuditConfig) -> None:
    """A cascade attacks only the images the headline attack did not win: before the headline
    has finished its images it attacks nothing (it would attack all of them)."""
    from dataclasses import replace

    worst = replace(cfg, plan="worst-case")
    plans.run(replace(cfg, eps=(0.3,)), models)  # the headline at eps 0.3 only
    plans.run(worst, models)
    made = {p.parent.name for p in cfg.work_dir.rglob("chunk-*.npz")}
    assert made and all("cascade" not in name for name in made if "eps0.1-" in name)
    assert any("cascade" in name for name in made if "eps0.3-" in name)
    assert all("eps0.3-" in name for name in made)  # --eps kept the headline to eps 0.3


def test_a_restarted_job_does_not_replace_a_row_over_more_images(tmp_path: Path) -> None:
    from training.audit.rows import merge_rows

    path = tmp_path / "rows.json"
    done = {**_row("m", "j", 0.1, 0.92, n=1000), "planned_n": 1000}
    first = merge_rows(path, [done])
    again = {**done, "n": 200, "attack_success": 0.95, "handled": 0.05}
    assert merge_rows(path, [again]) == first
    more = {**done, "attack_success": 0.93, "handled": 0.07}
    assert [_figures(r) for r in merge_rows(path, [more])] == [more]


def _figures(row: dict[str, object]) -> dict[str, object]:
    """A row without its run stamp (the date and machine of its run)."""
    return {k: v for k, v in row.items() if k != "run"}


def test_a_row_keeps_the_stamp_of_the_run_that_gave_its_figures(tmp_path: Path) -> None:
    from training.audit.rows import merge_rows

    path = tmp_path / "rows.json"
    row = _row("m", "j", 0.1, 0.5)
    [first] = merge_rows(path, [row])
    assert set(first["run"]) == {"date", "machine"}  # type: ignore[arg-type]
    stamped = {**first, "run": {"date": "2026-01-01T00:00:00Z", "machine": "elsewhere"}}
    path.write_text(json.dumps([stamped]))
    assert merge_rows(path, [row]) == [stamped]  # same figures: the earlier run's stamp
    [changed] = merge_rows(path, [{**row, "attack_success": 0.6, "handled": 0.4}])
    assert changed["run"] != stamped["run"] and changed["attack_success"] == 0.6


def test_saved_wins_are_what_the_service_scoring_decides(models: Models, cfg: AuditConfig) -> None:
    plans.run(cfg, models)
    job = plan_jobs("headline", MODELS, dry_run=True)[0]
    model = models[job.model]
    saved = store.load_chunks(store.job_dir(cfg, model, job))
    assert saved is not None
    logits = model.onnx.run(saved["adv"])
    s = score_logits(logits, model.manifest.kernel.to_kernel())
    y = model.data.y[: len(saved["idx"])].numpy()
    np.testing.assert_array_equal(
        saved["served_won"], (s.label != y) & (s.score >= model.manifest.threshold)
    )
    eps = job.attack.eps
    assert (np.abs(saved["adv"] - model.data.x[: len(y)].numpy()) <= eps + 1e-6).all()


def test_worst_case_counts_an_image_won_by_any_attack(models: Models, cfg: AuditConfig) -> None:
    plans.run(cfg, models)
    rows = plans.run(AuditConfig(**{**cfg.__dict__, "plan": "secondary"}), models)
    for wc in (r for r in rows if r["attack"] == "worst-case"):
        same = [
            r
            for r in rows
            if r["attack"] not in ("worst-case", "none", "cw-l2")
            and all(r[k] == wc[k] for k in ("model", "score", "eps", "norm", "clean_refusal"))
            and r["n"] == wc["n"]
        ]
        assert same, wc
        assert wc["attack_success"] >= max(r["attack_success"] for r in same)


def test_plans_have_unique_jobs_and_keys() -> None:
    jobs = all_jobs(("a-rce", "a-ce"))
    assert len({j.key("sha") for j in jobs}) == len(jobs)
    assert len({(j.model, j.name) for j in jobs}) == len(jobs)  # a job's folder: <model>/<name>


def test_unknown_plan_is_refused(models: Models, cfg: AuditConfig) -> None:
    with pytest.raises(ValueError, match="unknown plan"):
        plans.run(AuditConfig(**{**cfg.__dict__, "plan": "everything"}), models)


def test_jobs_at_the_served_t_attack_the_served_score() -> None:
    plain = all_jobs(("a-rce", "a-ce"))
    served = all_jobs(("a-rce", "a-ce"), served={"a-rce": "j", "a-ce": "confidence"})
    assert len(plain) == len(served)
    for before, after in zip(plain, served, strict=True):
        if before.model == "a-ce" and before.clean_refusal is None:
            assert after.score == "confidence" and after.attack == before.attack
        else:  # a model served on J, or a job at an explicit T, is attacked as the plan says
            assert after == before and after.key("sha") == before.key("sha")


def test_a_model_served_on_confidence_is_attacked_at_its_t_for_5_and_1_percent() -> None:
    """Attack success at the T for 5% and 1% clean refusals, on the score the CE model serves."""
    jobs = all_jobs(("a-ce",), served={"a-ce": "confidence"})
    for eps in (0.05, 0.1, 0.2, 0.3):
        at = {
            j.clean_refusal
            for j in jobs
            if j.score == "confidence" and j.attack.eps == eps and j.attack.attack == "lagrangian"
            and j.attack.norm == "linf" and j.attack.steps == 200
        }  # fmt: skip
        assert {None, 0.05, 0.01} <= at, eps


def _row(model: str, score: str, eps: float, success: float, n: int = 10) -> dict[str, object]:
    return {"model": model, "score": score, "attack": "lagrangian", "norm": "linf", "eps": eps,
            "clean_refusal": None, "n": n, "steps": 200, "restarts": 5,
            "attack_success": success, "handled": 1 - success}  # fmt: skip


def test_results_table_puts_the_served_score_first_and_names_an_earlier_one() -> None:
    from training.audit.figures import markdown

    rows = [_row("m-ce", "j", 0.1, 0.9), _row("m-ce", "confidence", 0.1, 0.25, n=20)]
    lines = [ln for ln in markdown(rows, {"m-ce": "confidence"}).splitlines() if "| m-ce" in ln]
    assert lines[0].startswith("| m-ce | confidence | 0.1 | - | 25.0% (n 20) |")
    assert lines[1].startswith("| m-ce | j (served before; T then) | 0.1 | - | 90.0% (n 10) |")


@pytest.mark.parametrize("attack", ["apgd", "square"])
def test_cascade_wins_are_what_the_service_decides(
    models: Models, cfg: AuditConfig, attack: str
) -> None:
    """The worst case's gradient-free and test-blind members (APGD-CE, Square) stay inside the
    budget, and their wins are the service's decisions on the images they saved."""
    plans.run(cfg, models)
    plans.run(AuditConfig(**{**cfg.__dict__, "plan": "worst-case"}), models)
    served = models.served()
    jobs = [j for j in plan_jobs("worst-case", MODELS, True, served) if j.attack.attack == attack]
    assert jobs
    attacked = 0
    for job in jobs:
        model = models[job.model]
        saved = store.load_chunks(store.job_dir(cfg, model, job))
        assert saved is not None
        x = model.data.x[: len(saved["idx"])].numpy()
        assert (np.abs(saved["adv"] - x) <= job.attack.eps + 1e-6).all()
        s = score_logits(model.onnx.run(saved["adv"]), model.manifest.kernel.to_kernel())
        score = s.j_score if served[job.model] == "j" else s.confidence
        y = model.data.y[: len(x)].numpy()
        want = (s.label != y) & (score >= model.manifest.threshold) & ~saved["skipped"]
        np.testing.assert_array_equal(saved["served_won"], want)
        attacked += int((~saved["skipped"]).sum())
    assert attacked  # some images were left to the cascade, so the comparison is not empty


def test_k_density_plan_rows_are_what_the_service_decides(models: Models, cfg: AuditConfig) -> None:
    kd_cfg = AuditConfig(**{**cfg.__dict__, "plan": "k-density"})
    rows = plans.run(kd_cfg, models)
    kd_rows = [r for r in rows if r["score"] == "k_density"]
    assert {r["attack"] for r in kd_rows} >= {"none", "lagrangian", "worst-case", "cw-l2"}
    assert {r["model"] for r in kd_rows} == set(MODELS)
    job = next(j for j in plan_jobs("k-density", MODELS, dry_run=True) if j.attack.eps == 0.3)
    model = models[job.model]
    assert model.kernel_set is not None
    saved = store.load_chunks(store.job_dir(kd_cfg, model, job))
    assert saved is not None
    # The service's decision on the saved images: the graph's features, the verified kernel
    # set, the T refusing 5% of the clean calibration images.
    logits, feats = model.onnx.run_with_features(saved["adv"])
    s = score_logits(logits, model.manifest.kernel.to_kernel(), "k_density", feats,
                     model.kernel_set)  # fmt: skip
    t = threshold_for_refuse_rate(model.served(model.calibration).named("k_density"), 0.05)
    assert saved["threshold"][0] == t
    y = model.data.y[: len(saved["idx"])].numpy()
    np.testing.assert_array_equal(saved["served_won"], (s.label != y) & (s.k_density >= t))


def test_whitebox_wins_are_the_worst_case_over_the_saved_attacks(
    models: Models, cfg: AuditConfig
) -> None:
    """What Square and transfer are compared with: per image, won by any white-box attack of
    the group (headline, cascades), the same union as the worst-case row."""
    from dataclasses import replace

    from training.audit.checks import whitebox_wins

    plans.run(cfg, models)
    rows = plans.run(replace(cfg, plan="worst-case"), models)
    for name in MODELS:
        served = models.served()[name]
        for eps in (0.1, 0.3):
            won = whitebox_wins(models, name, eps, 8)
            assert won is not None
            wc = next(r for r in rows if r["attack"] == "worst-case" and r["model"] == name
                      and r["score"] == served and r["eps"] == eps and r["norm"] == "linf"
                      and r["clean_refusal"] is None)  # fmt: skip
            assert wc["n"] == 8 and won.sum() == round(wc["attack_success"] * 8)
            head = next(j for j in plan_jobs("headline", (name,), True, models.served())
                        if j.attack.eps == eps)  # fmt: skip
            saved = store.load_job(cfg, models[name], head)
            assert saved is not None and not (saved["served_won"][:8] & ~won).any()
    assert whitebox_wins(models, MODELS[0], 0.1, 9) is None  # more images than the headline has


def test_whitebox_wins_leave_out_the_square_cascade(
    models: Models, cfg: AuditConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Square is what the white-box attacks are checked against: its own cascade's wins must
    not count on the white-box side (they would hide every image only Square wins)."""
    from dataclasses import replace

    from training.audit import checks
    from training.audit.checks import whitebox_wins

    plans.run(cfg, models)
    plans.run(replace(cfg, plan="worst-case"), models)
    name = MODELS[0]
    before = whitebox_wins(models, name, 0.3, 8)
    assert before is not None
    load = store.load_job

    def square_wins_everything(c, m, job):  # type: ignore[no-untyped-def]
        saved = load(c, m, job)
        if saved is not None and job.attack.attack == "square":
            saved = {**saved, "served_won": np.ones_like(saved["served_won"])}
        return saved

    monkeypatch.setattr(checks, "load_job", square_wins_everything)
    squares = [j for j in plan_jobs("worst-case", (name,), True, models.served())
               if j.attack.attack == "square" and j.attack.eps == 0.3]  # fmt: skip
    assert squares and checks.load_job(cfg, models[name], squares[0]) is not None
    after = whitebox_wins(models, name, 0.3, 8)
    assert after is not None
    np.testing.assert_array_equal(after, before)


def test_square_checks_the_served_score_and_k_density(models: Models, cfg: AuditConfig) -> None:
    """The gradient-free comparison runs against the served score and, for a model with a
    kernel set, against K-density at its audited T, each next to the white-box worst case."""
    import json
    from dataclasses import replace

    from training.audit.checks import run_checks

    plans.run(cfg, models)
    plans.run(replace(cfg, plan="k-density"), models)
    results = run_checks(models, n=8, square_n=8, queries=20)
    names = {(r.name, r.model, r.eps) for r in results}
    for m in MODELS:
        assert {("square-vs-whitebox", m, 0.1), ("square-vs-whitebox-k_density", m, 0.1),
                ("square-vs-whitebox-k_density", m, 0.3)} <= names  # fmt: skip
    for r in results:
        if r.name.startswith("square"):
            v = r.values
            assert 0 <= v["square_only"] <= v["square_success"] <= 1 and v["queries"] == 20
    saved = json.loads(cfg.out_json.with_name("checks.json").read_text())
    assert {(r["check"], r["model"], r["eps"]) for r in saved} >= names
