"""The audit's attack jobs, in order of value, and the plans that attack (`JOB_PLANS`; every
plan, those that only check saved results too, is listed in `training.audit.plans`).

A job is one attack on the first `n` test images of one model, against one score and one
threshold. Its key hashes everything the result depends on, so results saved under that key
are never read back for other settings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

from training.attacks.threat import AdaptiveConfig
from training.torch_scoring import ScoreKind

RCE, CE = "mnist-resnet32-rce", "mnist-resnet32-ce"
# The thresholds every model is measured at: (score, share of clean images refused). None is
# the manifest's served T, on the score the model is served on (whatever the score says here).
THRESHOLDS: tuple[tuple[ScoreKind, float | None], ...] = (
    ("j", None),
    ("j", 0.01),
    ("confidence", 0.05),
    ("k_density", 0.05),
)
HEADLINE_EPS = ((0.3, 0.1), (0.2,), (0.05,))  # in order of value: cheap and telling first
ALL_EPS = (0.05, 0.1, 0.2, 0.3)
L2_BUDGETS = (0.5, 1.0, 1.5, 2.0, 3.0)
L2_ORDER = (2.0, 1.5, 1.0, 3.0)  # L2 PGD's budgets, by value (0.5 is C&W's alone)


@dataclass(frozen=True)
class AuditJob:
    """One attack run; `clean_refusal` None means the manifest's served T."""

    model: str
    attack: AdaptiveConfig
    n: int
    score: ScoreKind = "j"
    clean_refusal: float | None = None
    # Only images that no earlier job with the same model, score, T and eps has won: these
    # jobs add to the worst case, they get no row of their own.
    cascade: bool = False

    @property
    def group(self) -> tuple[str, str, float | None, float, str]:
        """Jobs whose per-image wins are combined into one worst case."""
        norm = "l2" if self.attack.attack == "cw-l2" else self.attack.norm
        return (self.model, self.score, self.clean_refusal, self.attack.eps, norm)

    def key(self, model_sha: str) -> str:
        blob = json.dumps([model_sha, _keyed(self)], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        a = self.attack
        t = "served-T" if self.clean_refusal is None else f"T{self.clean_refusal:g}"
        tail = "-cascade" if self.cascade else ""
        norm = "l2" if a.norm == "l2" else ""
        budget = f"{norm}eps{a.eps:g}-n{self.n}-s{a.steps}x{a.restarts}"
        return f"{a.attack}-{a.loss}-{self.score}-{t}-{budget}{tail}"


# Settings that did not exist when the first results were saved: a job that leaves them at
# these values is keyed as before, so saved results stay valid. C&W's own settings enter the
# key of a C&W job only; the other attacks are keyed with the values C&W had then.
_LATER = {"norm": "linf"}
_CW_THEN = {"cw_c": 1.0, "cw_lr": 0.01}


def _keyed(job: AuditJob) -> dict[str, object]:
    d = asdict(job)
    a = d["attack"]
    for k, v in _LATER.items():
        if a[k] == v:
            del a[k]
    if job.attack.attack != "cw-l2":
        a.update(_CW_THEN)
        del a["cw_beta2"]
    return d


LAGRANGE = AdaptiveConfig(attack="lagrangian", steps=200, restarts=5, lambdas=(0.1, 1.0, 10.0))


def headline(models: tuple[str, ...] = (RCE, CE)) -> list[AuditJob]:
    """The strongest attack on every model at the served T, 1,000 images, eps by value."""
    n = 1000
    return [
        AuditJob(m, replace(LAGRANGE, eps=e), n)
        for eps in HEADLINE_EPS
        for e in eps
        for m in models
    ]


def secondary(models: tuple[str, ...] = (RCE, CE)) -> list[AuditJob]:
    """The other attacks and thresholds on 100 images, then a 1,000-step convergence run."""
    n = 100
    jobs: list[AuditJob] = []
    for e in (0.1, 0.3, 0.2, 0.05):
        for m in models:
            base = replace(LAGRANGE, eps=e)
            jobs += [
                AuditJob(m, replace(base, attack="selective"), n),
                AuditJob(m, replace(base, loss="ce"), n),
                AuditJob(m, base, n, clean_refusal=0.01),
                AuditJob(m, replace(base, attack="orthogonal"), n),
                AuditJob(m, replace(base, attack="pgd"), n),
            ]
        # A CE model guarded by its confidence instead of J (the score it is served on), at
        # the T for 5% and for 1% clean refusals.
        jobs += [
            AuditJob(m, replace(LAGRANGE, eps=e), n, score="confidence", clean_refusal=r)
            for m in models
            if m.endswith("-ce")
            for r in (0.05, 0.01)
        ]
    cw = AdaptiveConfig(attack="cw-l2", eps=0.0, steps=200, restarts=5, lambdas=(1.0,))
    jobs += [AuditJob(m, cw, n) for m in models]
    # L2 budgets: the Lagrangian attack with L2 steps, the budgets nearest the L-inf wins'
    # L2 sizes first.
    jobs += [AuditJob(m, replace(LAGRANGE, eps=b, norm="l2"), n) for b in L2_ORDER for m in models]
    # Convergence: one restart of 1,000 steps where the headline spends 5 x 200.
    jobs += [
        AuditJob(m, replace(LAGRANGE, eps=e, steps=1000, restarts=1), n)
        for e in (0.1, 0.05)
        for m in models
    ]
    return jobs


def worst_case_fill(models: tuple[str, ...] = (RCE, CE)) -> list[AuditJob]:
    """The other L-inf attacks on the images the headline attack did not win, the targeted
    attack on every wrong class last."""
    n = 1000
    jobs = []
    for e in (e for eps in HEADLINE_EPS for e in eps):  # the headline's order: cheap first
        for m in models:
            base = replace(LAGRANGE, eps=e)
            jobs += [
                AuditJob(m, replace(base, attack="selective"), n, cascade=True),
                AuditJob(m, replace(base, loss="ce"), n, cascade=True),
                # torchattacks' APGD-CE (ignores the test), 100 steps x 5 restarts.
                AuditJob(m, replace(base, attack="apgd", steps=100), n, cascade=True),
                # Square with the audit's objective: 1,000 queries, no gradients.
                AuditJob(
                    m,
                    replace(base, attack="square", steps=1000, restarts=1, lambdas=(1.0,)),
                    n,
                    cascade=True,
                ),
                # Every wrong class in turn, its log-probability and served score pushed up:
                # 9 classes x 2 restarts (lambda 1, 10) x 50 steps.
                AuditJob(
                    m,
                    replace(base, attack="targeted", loss="ce", steps=50, restarts=2),
                    n,
                    cascade=True,
                ),
            ]
    return jobs


def k_density(models: tuple[str, ...] = (RCE, CE)) -> list[AuditJob]:
    """The K-density detector (the RCE paper's second one) at the T refusing 5% of clean
    calibration images: the Lagrangian attack with its term, then the other attacks."""
    jobs = [
        AuditJob(m, replace(LAGRANGE, eps=e), 100, score="k_density", clean_refusal=0.05)
        for e in (0.3, 0.1)
        for m in models
    ]
    jobs += [
        AuditJob(m, replace(LAGRANGE, eps=0.3), 1000, score="k_density", clean_refusal=0.05)
        for m in models
    ]
    for attack in ("selective", "orthogonal"):
        jobs += [
            AuditJob(
                m,
                replace(LAGRANGE, attack=attack, eps=0.1),
                100,
                score="k_density",
                clean_refusal=0.05,
            )
            for m in models
        ]
    # Convergence: one restart of 1,000 steps where the others spend 5 x 200.
    jobs += [
        AuditJob(
            m,
            replace(LAGRANGE, eps=0.1, steps=1000, restarts=1),
            100,
            score="k_density",
            clean_refusal=0.05,
        )
        for m in models
    ]
    cw = AdaptiveConfig(attack="cw-l2", eps=0.0, steps=200, restarts=5, lambdas=(1.0,))
    jobs += [AuditJob(m, cw, 100, score="k_density", clean_refusal=0.05) for m in models]
    return jobs


JOB_PLANS = {
    "headline": headline,
    "secondary": secondary,
    "worst-case": worst_case_fill,
    "k-density": k_density,
}


def on_served_score(jobs: list[AuditJob], served: Mapping[str, ScoreKind]) -> list[AuditJob]:
    """Jobs at the served T attack the score the model is served on (its manifest's): the
    plans write J, and a CE model served on confidence is attacked on confidence instead."""
    return [
        replace(j, score=served[j.model]) if j.clean_refusal is None and j.model in served else j
        for j in jobs
    ]


def plan_jobs(
    plan: str,
    models: tuple[str, ...],
    dry_run: bool = False,
    served: Mapping[str, ScoreKind] | None = None,
) -> list[AuditJob]:
    """A named plan's jobs; the dry run keeps the code path with few images and steps.
    `served` names each model's served score (see `on_served_score`)."""
    jobs = on_served_score(JOB_PLANS[plan](models=models), served or {})
    if dry_run:
        jobs = [
            replace(
                j,
                n=min(j.n, 8),
                attack=replace(
                    j.attack, steps=min(j.attack.steps, 3), restarts=min(j.attack.restarts, 2)
                ),
            )
            for j in jobs
        ]
    return jobs


def all_jobs(
    models: tuple[str, ...],
    dry_run: bool = False,
    served: Mapping[str, ScoreKind] | None = None,
) -> list[AuditJob]:
    """Every plan's jobs in plan order, each once."""
    seen: dict[AuditJob, None] = {}
    for plan in JOB_PLANS:
        seen.update(dict.fromkeys(plan_jobs(plan, models, dry_run, served)))
    return list(seen)
