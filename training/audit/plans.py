"""`notsure audit`: every plan of the adaptive audit in one table, and `run` to run one.

Four plans attack (their jobs are in `training.audit.jobs`, in order of value), and
`autoattack` measures robust accuracy without abstention (`training.audit.autoattack`); five
attack nothing new and work on the results those saved: sanity checks against independent attacks,
transfer from other models, a replay through the live service, what the certificate proves
beside the worst case (`training.audit.certified`), and the figures and tables.
Every plan ends by rebuilding the result rows from everything saved and writing them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from training.audit.autoattack import run_autoattack
from training.audit.certified import export_tiny, run_certified
from training.audit.checks import run_checks
from training.audit.figures import write_figures
from training.audit.live import live_check
from training.audit.runner import run_attacks, write_rows
from training.audit.subject import AuditConfig, Models
from training.audit.transfer import run_transfer
from training.tiny import TINY_MODELS, tiny_repo

Rows = list[dict[str, object]]


@dataclass(frozen=True)
class Plan:
    says: str  # one line: what the plan does
    run: Callable[[Models], Rows]


def _checks(models: Models) -> Rows:
    run_checks(models)
    return write_rows(models)


def _transfer(models: Models) -> Rows:
    run_transfer(models)
    return write_rows(models)


def _live(models: Models) -> Rows:
    live_check(models, models.cfg.url)
    return write_rows(models)


def _certified(models: Models) -> Rows:
    run_certified(models)
    return write_rows(models)


def _figures(models: Models) -> Rows:
    rows = write_rows(models)
    write_figures(models, rows)
    return rows


PLANS: dict[str, Plan] = {
    "headline": Plan(
        "the Lagrangian attack on every model at the served T, 1,000 images",
        partial(run_attacks, plan="headline"),
    ),
    "secondary": Plan(
        "the other attacks, thresholds, L2 budgets and C&W on 100 images; 1,000-step runs",
        partial(run_attacks, plan="secondary"),
    ),
    "worst-case": Plan(
        "the other L-inf attacks (APGD, Square, targeted) on what the headline did not win",
        partial(run_attacks, plan="worst-case"),
    ),
    "k-density": Plan(
        "the K-density detector at the T refusing 5% of clean images",
        partial(run_attacks, plan="k-density"),
    ),
    "autoattack": Plan(
        "AutoAttack (standard) robust accuracy of the served argmax, no abstention, eps 0.3",
        run_autoattack,
    ),
    "checks": Plan("reference PGD, gradient alignment, Square against the white-box wins", _checks),
    "transfer": Plan("images crafted on other models, sent to each model", _transfer),
    "live": Plan("the saved images replayed through the running service", _live),
    "certified": Plan(
        "per model with a bound graph and eps 0.1-0.3: certified handled, the worst case, and "
        "the clean refusals of a certificate policy",
        _certified,
    ),
    "figures": Plan("the figures and the tables of docs/robustness.md", _figures),
}


def run(cfg: AuditConfig, models: Models | None = None) -> Rows:
    """Run (or resume) cfg.plan; returns the rows written to cfg.out_json. `models` lends the
    models another plan has loaded already. A dry run of the tiny models builds them first (and
    for the certified plan, their bound graphs)."""
    if cfg.plan not in PLANS:
        raise ValueError(f"unknown plan {cfg.plan!r}; use one of {', '.join(PLANS)}")
    if cfg.dry_run and set(cfg.models) <= set(TINY_MODELS):
        tiny_repo(cfg.models_dir, cfg.work_dir / "dry-run-runs")
        if cfg.plan == "certified" and models is None:
            export_tiny(cfg.models_dir)
    torch.set_num_threads(cfg.threads)
    return PLANS[cfg.plan].run(Models(cfg) if models is None else models.under(cfg))
