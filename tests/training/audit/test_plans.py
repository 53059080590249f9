"""Every plan of the audit stands in one table, and the plans that attack are the job plans."""

from __future__ import annotations

from training.audit.jobs import JOB_PLANS
from training.audit.plans import PLANS


def test_every_plan_is_in_one_table() -> None:
    assert list(PLANS) == [
        "headline", "secondary", "worst-case", "k-density", "autoattack", "checks", "transfer",
        "live", "certified", "figures",
    ]  # fmt: skip
    assert set(JOB_PLANS) <= set(PLANS)
    assert all(p.says and callable(p.run) for p in PLANS.values())
