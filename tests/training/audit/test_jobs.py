"""Job keys name saved results: adding plans or scores must not move the existing ones."""

from __future__ import annotations

from dataclasses import replace

from training.audit.jobs import CE, JOB_PLANS, LAGRANGE, RCE, AuditJob, all_jobs, k_density

# The bundled models' manifest sha256s, and the keys their audit results were saved under
# before the K-density jobs existed (the CE one is the folder name of a saved 1,000-image run).
RCE_SHA = "c8b2199e80dc44c476d4af24fcfef9c514f0e9031faee78056164f548785e1eb"
CE_SHA = "4ebd2e25b70844edaa8f7fd85796b4159de4f5fed08a949875a56bf31c77ff21"
SAVED = {
    (AuditJob(RCE, replace(LAGRANGE, eps=0.3), 1000), RCE_SHA): "59f3d2f51e8a",
    (AuditJob(RCE, replace(LAGRANGE, eps=0.1), 1000), RCE_SHA): "8cca80ecf4f9",
    (AuditJob(CE, replace(LAGRANGE, eps=0.1), 1000, score="confidence"), CE_SHA): "8e1aa943fffd",
}


def test_existing_job_keys_are_unchanged() -> None:
    for (job, sha), key in SAVED.items():
        assert job.key(sha) == key, job.name


def test_every_job_has_its_own_key_and_the_old_plans_come_first() -> None:
    jobs = all_jobs((RCE, CE))
    assert len({(j.model, j.key(RCE_SHA)) for j in jobs}) == len(jobs)
    assert list(JOB_PLANS)[-1] == "k-density"
    kd = [j for j in jobs if j.score == "k_density"]
    assert kd == k_density((RCE, CE))
    assert jobs[-len(kd) :] == kd  # appended: the cascade order of the other plans is unchanged


def test_k_density_jobs_attack_at_the_t_refusing_5_percent_of_clean_images() -> None:
    kd = k_density((RCE, CE))
    assert {j.clean_refusal for j in kd} == {0.05}
    lagrange = [j for j in kd if j.attack.attack == "lagrangian" and j.attack.restarts == 5]
    assert {(j.model, j.attack.eps, j.n) for j in lagrange} == {
        (m, e, n) for m in (RCE, CE) for e, n in ((0.3, 100), (0.1, 100), (0.3, 1000))
    }
    assert all(j.attack.steps == 200 and j.attack.restarts == 5 for j in lagrange)


def test_k_density_plan_checks_convergence_with_one_restart_of_1000_steps() -> None:
    long = [j for j in k_density((RCE, CE)) if j.attack.steps == 1000]
    assert {(j.model, j.attack.attack, j.attack.restarts, j.attack.eps) for j in long} == {
        (m, "lagrangian", 1, 0.1) for m in (RCE, CE)
    }


def test_worst_case_ends_each_budget_with_the_targeted_cascade_at_the_served_t() -> None:
    jobs = JOB_PLANS["worst-case"]((RCE, CE))
    targeted = [j for j in jobs if j.attack.attack == "targeted"]
    assert {(j.model, j.attack.eps) for j in targeted} == {
        (m, e) for m in (RCE, CE) for e in (0.3, 0.1, 0.2, 0.05)
    }
    assert all(j.cascade and j.clean_refusal is None and j.n == 1000 for j in targeted)
    for j in targeted:  # after the other cascades of its group: it attacks what they left
        group = [o for o in jobs if o.group == j.group]
        assert group[-1] == j
