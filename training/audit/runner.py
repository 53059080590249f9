"""Run the audit's attack jobs resumably and write the result rows (`plans` says which).

Each job attacks its images in chunks; every finished chunk is saved (`training.audit.store`:
the adversarial images, which images were won, the steps spent), so a killed run resumes at the
first missing chunk. The same results without the images are kept beside the JSON rows: a fresh
checkout resumes from them, and the worst case and the cascades read them, when the work folder
is gone. After each chunk the rows of every job are rebuilt from the
saved results and written to the JSON file. Wins are counted as the service
decides them: the saved images go through the ONNX graph and `service.scoring`, not through
the torch mirror the attack steered by, and for a model with a bound graph through its
certificate too (with `certify_required`, a win needs a certified answer). Wherever rows are
built, a win whose certified ball holds its correctly labelled clean original stops the run
(`training.audit.soundness`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from service.scoring import answered
from training.attacks import get
from training.attacks.threat import Result, l2_distance
from training.audit.jobs import L2_BUDGETS, THRESHOLDS, AuditJob, all_jobs, plan_jobs
from training.audit.rows import job_rows, merge_rows, within_budget, worst_case_rows
from training.audit.soundness import check_certified_wins
from training.audit.store import job_dir, keep_results, load_job, missing_ranges
from training.audit.subject import Model, Models, decided_wins
from training.progress import progress_bar
from training.torch_scoring import served_kind

log = logging.getLogger(__name__)


def won_before(models: Models, model: Model, job: AuditJob) -> np.ndarray:
    """(n,) images that another job of the same group has won: every non-cascade job of every
    plan, and the cascade jobs listed before this one."""
    cfg = models.cfg
    won = np.zeros(job.n, dtype=bool)
    everything = all_jobs(cfg.models, cfg.dry_run, models.served())
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
        # Random starts differ from chunk to chunk, and are the same when a chunk is redone.
        gen = torch.Generator().manual_seed(job.attack.seed * 100003 + lo)
        attack = get("adaptive", job.attack.attack)
        part: Result = attack(threat, x[todo], y[todo], job.attack, gen)
        res.won[todo], res.adv[todo], res.spent[todo] = part.won, part.adv, part.spent
    adv = res.adv.numpy()
    s = model.served(adv)
    served_won = decided_wins(s, y.numpy(), job.score, threshold) & ~skip
    # Saved only for a model with a bound graph, whose results have their own key.
    certificate = (
        {}
        if s.certified is None
        else {"certified": s.certified, "certify_eps": np.full(hi - lo, s.certify_eps)}
    )
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
        **certificate,
    }


def check_saved(model: Model, job: AuditJob, saved: dict[str, np.ndarray]) -> None:
    """The soundness check of the certificate on a job's saved wins (when it has one)."""
    if "certified" in saved and len(saved["idx"]):
        eps = float(saved["certify_eps"][0])
        won, cert = saved["served_won"], saved["certified"]
        check_certified_wins(model, job.name, saved["idx"], won, cert, saved["linf"], eps)


def headline_coverage(models: Models, model: Model, job: AuditJob) -> int:
    """How many of the first `job.n` images the group's own (non-cascade) jobs of at least
    `job.n` images have finished: a cascade attacks only what they left."""
    cfg = models.cfg
    covered = 0
    for other in all_jobs(cfg.models, cfg.dry_run, models.served()):
        if other.group != job.group or other.cascade or other.n < job.n:
            continue
        saved = load_job(cfg, model, other)
        if saved is not None:
            covered = max(covered, int((saved["idx"] < job.n).sum()))
    return covered


def run_job(models: Models, model: Model, job: AuditJob) -> None:
    """Attack the job's images that no saved chunk holds, saving each chunk as it finishes."""
    cfg = models.cfg
    if job.cascade and (covered := headline_coverage(models, model, job)) < job.n:
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
    skip_all = won_before(models, model, job) if job.cascade else np.zeros(job.n, dtype=bool)
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
            write_rows(models)


def run_attacks(models: Models, plan: str) -> list[dict[str, object]]:
    """Run (or resume) a plan's attack jobs, those at the configured budgets only; returns the
    rows written to the JSON file."""
    cfg = models.cfg
    for job in plan_jobs(plan, cfg.models, cfg.dry_run, models.served()):
        if cfg.eps is None or any(abs(job.attack.eps - e) < 1e-9 for e in cfg.eps):
            run_job(models, models[job.model], job)
    return write_rows(models)


CLEAN = slice(0, 5000)  # clean accuracy and coverage: the images not used for thresholds


def clean_rows(model: Model, work_dir: Path) -> list[dict[str, object]]:
    """Clean accuracy, coverage and the clean wrong-and-accepted rate at every threshold, as
    the service decides (with the certificate where the model requires one)."""
    path = work_dir / model.name / f"clean-{model.key[:12]}.npz"
    has_kd = model.kernel_set is not None
    # Files saved before K-density was audited lack it: score the clean images again.
    if not path.exists() or (has_kd and "k_density" not in np.load(path).files):
        s = model.served(model.data.x[CLEAN].numpy())
        path.parent.mkdir(parents=True, exist_ok=True)
        kd = {} if s.k_density is None else {"k_density": s.k_density}
        cert = {} if s.certified is None else {"certified": s.certified}
        np.savez(path, label=s.label, j=s.j_score, confidence=s.confidence, **kd, **cert)
    saved = dict(np.load(path))
    required = model.certifier is not None and model.certifier.required
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
        accepted = answered(saved[score], t, saved.get("certified"), required)
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


def write_rows(models: Models) -> list[dict[str, object]]:
    """Rows of every job of every plan with saved results (other processes' too), merged into
    the JSON file."""
    cfg = models.cfg
    rows: list[dict[str, object]] = []
    groups: dict[tuple[object, ...], list[tuple[AuditJob, dict[str, np.ndarray]]]] = {}
    for job in all_jobs(cfg.models, cfg.dry_run, models.served()):
        saved = load_job(cfg, models[job.model], job)
        if saved is None:
            continue
        check_saved(models[job.model], job, saved)
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
    for model in models:
        rows += clean_rows(model, cfg.work_dir)
    return merge_rows(cfg.out_json, [{**r, **models[str(r["model"])].certificate} for r in rows])
