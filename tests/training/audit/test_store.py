"""The committed audit results: every kept result under docs/robustness/results/ is found by
the store for a job of today's plans, so a fresh checkout resumes from all of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.manifest import MANIFEST_FILE, Manifest
from training.audit.jobs import all_jobs
from training.audit.store import load_job, results_path
from training.audit.subject import AuditConfig, Model
from training.modelio import model_version_dir
from training.torch_scoring import served_kind

ROOT = Path(__file__).resolve().parents[3]
RESULTS = ROOT / "docs" / "robustness" / "results"


def _model(name: str) -> Model:
    """What the store reads of a model: its name and its manifest (no net, no data)."""
    manifest = Manifest.load(model_version_dir(ROOT / "models", name) / MANIFEST_FILE)
    return Model(name, manifest, None, None, None)  # type: ignore[arg-type]


@pytest.mark.skipif(not RESULTS.exists(), reason="no committed audit results")
def test_every_committed_result_belongs_to_a_planned_job(tmp_path: Path) -> None:
    names = tuple(sorted(p.name for p in RESULTS.iterdir() if p.is_dir()))
    models = {n: _model(n) for n in names}
    served = {n: served_kind(m.manifest.score) for n, m in models.items()}
    cfg = AuditConfig(models=names, work_dir=tmp_path, out_json=RESULTS.parent / "adaptive.json")
    found: dict[Path, int] = {}
    for job in all_jobs(names, served=served):
        path = results_path(cfg, models[job.model], job)
        if path.exists():
            saved = load_job(cfg, models[job.model], job)  # no work folder: the kept results
            assert saved is not None and len(saved["idx"]) <= job.n
            np.testing.assert_array_equal(saved["idx"], np.sort(saved["idx"]))
            found[path] = len(saved["idx"])
    kept = set(RESULTS.rglob("*.npz"))
    assert kept and set(found) == kept
