"""`notsure attack --adaptive`: run the audit's jobs resumably and write the result rows.

Each job attacks its images in chunks; every finished chunk is saved (`training.attack.store`:
the adversarial images, which images were won, the steps spent), so a killed run resumes at the
first missing chunk. The same results without the images are kept beside the JSON rows: a fresh
checkout resumes from them, and the worst case and the cascades read them, when the work folder
is gone. After each chunk the rows of every job are rebuilt from the
saved results and written to the JSON file. Wins are counted as the service
decides them: the saved images go through the ONNX graph and `service.scoring`, not through
the torch mirror the attack steered by.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from training.attack.adaptive import Result, l2_distance, pgd_batch
from training.attack.cw import cw_batch
from training.attack.plan import L2_BUDGETS, PLANS, THRESHOLDS, AuditJob, all_jobs, plan_jobs
from training.attack.score import served_kind, service_name
from training.attack.store import job_dir, keep_results, load_job, missing_ranges
from training.attack.subject import MODELS, AuditConfig, Model, load_model, served_scores
from training.progress import progress_bar

log = logging.getLogger(__name__)
EXTRA = (
    "checks",
    "transfer",
    "live",
    "figures",
)  # plans that attack nothing new: they check the saved results


def won_before(cfg: AuditConfig, model: Model, job: AuditJob) -> np.ndarray:
    """(n,) images that another job of the same group has won: every non-cascade job of every
    plan, and the cascade jobs listed before this one."""
    won = np.zeros(job.n, dtype=bool)
    everything = all_jobs(cfg.models, cfg.dry_run, served_scores())
    earlier = everything[: everything.index(job)] if job in everything else everything
    for other in everything:
        if other == job or other.group != job.group or (other.cascade and other not in earlier):
            continue
        saved = load_job(cfg, model, other)
        if saved is not None:
            m = min(job.n, len(saved["idx"]))
            won[saved["idx"][:m]] |= saved["served_won"][:m]
    return won


def attack_chunk(
    model: Model, job: AuditJob, lo: int, hi: int, skip: np.ndarray
) -> dict[str, np.ndarray]:
    """Attack images lo..hi-1 (except `skip`) and record what the served graph decides."""
    x, y = model.data.x[lo:hi], model.data.y[lo:hi]
    threshold = model.threshold(job.score, job.clean_refusal)
    threat = model.threat(job.score, threshold)
    todo = torch.from_numpy(~skip)
    res = Result(
        torch.zeros(hi - lo, dtype=torch.bool), x.clone(), torch.zeros(hi - lo, dtype=torch.long)
    )
    if todo.any():
        if job.attack.attack == "cw-l2":
            part = cw_batch(threat, x[todo], y[todo], job.attack)
        elif job.attack.attack == "apgd":
            from training.attack.apgd import apgd_batch

            part = apgd_batch(threat, x[todo], y[todo], job.attack)
        elif job.attack.attack == "square":
            from training.attack.square import square_batch

            part = square_batch(threat, x[todo], y[todo], job.attack)
        else:
            gen = torch.Generator().manual_seed(job.attack.seed * 100003 + lo)
            part = pgd_batch(threat, x[todo], y[todo], job.attack, gen)
        res.won[todo], res.adv[todo], res.spent[todo] = part.won, part.adv, part.spent
    adv = res.adv.numpy()
    s = model.served(adv)
    score = s.named(service_name(job.score))
    served_won = (s.label != y.numpy()) & (score >= threshold) & ~skip
    return {
        "idx": np.arange(lo, hi),
        "adv": adv.astype(np.float32),
        "torch_won": res.won.numpy(),
        "served_won": served_won,
        "spent": res.spent.numpy(),
        "skipped": skip,
        "l2": l2_distance(res.adv, x).numpy(),
        "linf": (res.adv - x).abs().flatten(1).amax(1).numpy(),
        "threshold": np.full(hi - lo, threshold),
    }


def headline_coverage(cfg: AuditConfig, model: Model, job: AuditJob) -> int:
    """How many of the first `job.n` images the group's own (non-cascade) jobs of at least
    `job.n` images have finished: a cascade attacks only what they left."""
    covered = 0
    for other in all_jobs(cfg.models, cfg.dry_run, served_scores()):
        if other.group != job.group or other.cascade or other.n < job.n:
            continue
        saved = load_job(cfg, model, other)
        if saved is not None:
            covered = max(covered, int((saved["idx"] < job.n).sum()))
    return covered


def run_job(cfg: AuditConfig, model: Model, job: AuditJob) -> None:
    if job.cascade and (covered := headline_coverage(cfg, model, job)) < job.n:
        log.warning(
            "%s %s skipped: the attacks it follows have finished %d of its %d images; run "
            "--plan headline first (a cascade attacks only the images they did not win)",
            model.name, job.name, covered, job.n,
        )  # fmt: skip
        return
    folder = job_dir(cfg, model, job)
    folder.mkdir(parents=True, exist_ok=True)
    keep_results(cfg, model, job)  # chunks saved by a run from before the results were kept
    ranges = missing_ranges(load_job(cfg, model, job), job.n, cfg.chunk)
    if not ranges:
        return
    skip_all = won_before(cfg, model, job) if job.cascade else np.zeros(job.n, dtype=bool)
    with progress_bar(f"{model.name} {job.name}", total=job.n) as bar:
        bar.advance(job.n - sum(hi - lo for lo, hi in ranges))
        for lo, hi in ranges:
            t0 = time.perf_counter()
            arrays = attack_chunk(model, job, lo, hi, skip_all[lo:hi])
            tmp = folder / f"chunk-{lo:05d}.tmp.npz"
            np.savez_compressed(tmp, **arrays)
            tmp.replace(folder / f"chunk-{lo:05d}.npz")
            keep_results(cfg, model, job)
            bar.advance(hi - lo)
            log.info(
                "%s %s images %d-%d: won %d/%d (torch %d), %.0f s",
                model.name,
                job.name,
                lo,
                hi - 1,
                arrays["served_won"].sum(),
                hi - lo - arrays["skipped"].sum(),
                arrays["torch_won"].sum(),
                time.perf_counter() - t0,
            )
            write_rows(cfg)


def effective(cfg: AuditConfig) -> AuditConfig:
    """Apply --dry-run: the tiny synthetic models (built once under work_dir), few images."""
    if not cfg.dry_run or cfg.models != AuditConfig.models:
        return cfg
    from training.tiny import tiny_repo

    root = tiny_repo(cfg.work_dir / "dry-run-models", cfg.work_dir / "dry-run-runs")
    return replace(cfg, models=("tiny-rce", "tiny-ce"), models_dir=root)


def run(cfg: AuditConfig) -> list[dict[str, object]]:
    """Run (or resume) the plan; returns the rows written to cfg.out_json."""
    cfg = effective(cfg)
    torch.set_num_threads(cfg.threads)
    if cfg.plan not in (*PLANS, *EXTRA):
        raise ValueError(f"unknown plan {cfg.plan!r}; use one of {', '.join((*PLANS, *EXTRA))}")
    for name in cfg.models:
        MODELS.setdefault(name, load_model(cfg, name))
    if cfg.plan == "checks":
        from training.attack.checks import run_checks

        run_checks(cfg)
        return write_rows(cfg)
    if cfg.plan == "transfer":
        from training.attack.transfer import run_transfer

        run_transfer(cfg)
        return write_rows(cfg)
    if cfg.plan == "live":
        from training.attack.live import live_check

        live_check(cfg, cfg.url)
        return write_rows(cfg)
    if cfg.plan == "figures":
        from training.attack.figures import write_figures

        rows = write_rows(cfg)
        write_figures(cfg, rows)
        return rows
    for job in plan_jobs(cfg.plan, cfg.models, cfg.dry_run, served_scores()):
        if cfg.eps is None or any(abs(job.attack.eps - e) < 1e-9 for e in cfg.eps):
            run_job(cfg, MODELS[job.model], job)
    return write_rows(cfg)


CLEAN = slice(0, 5000)  # clean accuracy and coverage: the images not used for thresholds


def clean_rows(model: Model, work_dir: Path) -> list[dict[str, object]]:
    """Clean accuracy, coverage and the clean wrong-and-accepted rate at every threshold."""
    path = work_dir / model.name / f"clean-{model.manifest.sha256[:12]}.npz"
    has_kd = model.kernel_set is not None
    # Files saved before K-density was audited lack it: score the clean images again.
    if not path.exists() or (has_kd and "k_density" not in np.load(path).files):
        s = model.served(model.data.x[CLEAN].numpy())
        path.parent.mkdir(parents=True, exist_ok=True)
        kd = {} if s.k_density is None else {"k_density": s.k_density}
        np.savez(path, label=s.label, j=s.j_score, confidence=s.confidence, **kd)
    saved = dict(np.load(path))
    y = model.data.y[CLEAN].numpy()
    right = saved["label"] == y
    rows: list[dict[str, object]] = []
    for score, refusal in THRESHOLDS:
        if refusal is None:  # the manifest's T is on the score the model is served on
            score = served_kind(model.manifest.score)
        if score == "confidence" and model.manifest.objective != "ce":
            continue
        if score == "k_density" and not has_kd:
            continue
        t = model.threshold(score, refusal)
        accepted = saved[score] >= t
        wrong = float((~right & accepted).mean())
        rows.append(
            {
                "model": model.name,
                "score": score,
                "attack": "none",
                "eps": 0.0,
                "n": len(y),
                "steps": 0,
                "restarts": 0,
                "attack_success": round(wrong, 4),
                "handled": round(1 - wrong, 4),
                "norm": "linf",
                "threshold": t,
                "clean_refusal": refusal,
                "clean_accuracy": round(float(right.mean()), 4),
                "coverage": round(float(accepted.mean()), 4),
                "accuracy_of_accepted": round(float(right[accepted].mean()), 4),
            }
        )
    return rows


def write_rows(cfg: AuditConfig) -> list[dict[str, object]]:
    """Rows of every job of every plan with saved results (other processes' too), merged into
    the JSON file."""
    from training.attack.rows import job_rows, merge_rows, within_budget, worst_case_rows

    rows: list[dict[str, object]] = []
    groups: dict[tuple[object, ...], list[tuple[AuditJob, dict[str, np.ndarray]]]] = {}
    for job in all_jobs(cfg.models, cfg.dry_run, served_scores()):
        saved = load_job(cfg, MODELS[job.model], job)
        if saved is None:
            continue
        groups.setdefault(job.group, []).append((job, saved))
        if not job.cascade:
            rows += job_rows(job, saved, L2_BUDGETS)
    for group, members in groups.items():
        model, score, refusal, eps, norm = group
        also = []
        if norm == "l2" and eps > 0:  # L2 PGD at this budget, with C&W's wins within it
            cw = groups.get((model, score, refusal, 0.0, "l2"), [])
            also = [(j, within_budget(saved, eps)) for j, saved in cw]
        if eps > 0:
            rows += worst_case_rows(members, also)
    for model in MODELS.values():
        rows += clean_rows(model, cfg.work_dir)
    return merge_rows(cfg.out_json, rows)
