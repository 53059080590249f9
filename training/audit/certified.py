"""`notsure audit --plan certified`: what the bounds prove beside what the attacks found, per
model with a bound graph (`certify.onnx`) and per L-inf radius eps (0.1, 0.2, 0.3 and the radius
the model certifies its answers at):

  certified, certified handled: from the bounds around each clean image
      (`training.certify.accuracy.evaluate`, the bound graph under onnxruntime) on the clean
      images (the first 5,000 test images): the share that no attack within eps can win, a
      lower bound of handled;
  worst-case handled: 1 - the worst-case attack success at the served decision (served score,
      served T, and the model's own certificate where it requires one) over every saved L-inf
      attack at eps (`rows.worst_case_rows`): an upper bound of handled, found by attacking;
  policy clean refusals: the share of clean images that a certificate policy at eps (an answer
      needs score >= T and a label certified at eps around its input) refuses beyond those that
      T alone refuses.

An image the bounds declare handled at eps that a saved attack within eps has won raises
`training.audit.soundness.UnsoundCertificate`. The rows go to `certified.json` beside the
audit's rows (each with its run's date and machine) and, as a table for docs/robustness.md, to
`certified.md`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from service.certify import CertifyGraph, certified_labels
from service.manifest import CERTIFY_FILE
from training.audit.jobs import AuditJob, all_jobs
from training.audit.rows import worst_case_rows
from training.audit.runner import CLEAN
from training.audit.soundness import check_wins
from training.audit.store import load_job
from training.audit.subject import Model, Models
from training.certify.accuracy import THRESHOLD_SCORES, evaluate, handled, onnx_bounds
from training.evaluation import table
from training.modelio import model_version_dir
from training.provenance import run_record
from training.tiny import TINY_MODELS
from training.torch_scoring import served_kind

log = logging.getLogger(__name__)

RADII = (0.1, 0.2, 0.3)
DRY_RUN_EPS = 1e-6  # the tiny ResNet-8s are certified at about this radius and not far above
Row = dict[str, object]


def run_certified(models: Models) -> list[Row]:
    """Rows for every configured model with a bound graph, merged into certified.json (by model
    and eps) and written as a table to certified.md; returns this run's rows."""
    cfg = models.cfg
    rows: list[Row] = []
    for name in cfg.models:
        model = models[name]
        if model.certifier is None:
            log.info("%s has no bound graph (notsure certify export); skipped", name)
        elif model.manifest.score == "k_density":
            log.warning("%s is served on k_density, which the bounds do not cover; skipped", name)
        else:
            rows += model_rows(models, model, model.certifier)
    path = cfg.out_json.with_name("certified.json")
    old = json.loads(path.read_text()) if path.exists() else []
    new = {(r["model"], r["eps"]) for r in rows}
    merged: list[Row] = [r for r in old if (r["model"], r["eps"]) not in new] + rows
    merged.sort(key=lambda r: (str(r["model"]), float(str(r["eps"]))))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(merged) + "\n")
    return rows


def model_rows(models: Models, model: Model, certifier: CertifyGraph) -> list[Row]:
    """One row per radius for a model with a bound graph (its `certifier`)."""
    folder = model_version_dir(models.cfg.models_dir, model.name)
    x = model.data.x[CLEAN].numpy().astype(np.float32)
    y = model.data.y[CLEAN].numpy().astype(np.int64)
    radii = tuple(sorted({*RADII, certifier.eps}))
    results = evaluate(folder, x, y, radii, "onnx", folder / CERTIFY_FILE)
    rows = []
    for r in results:
        members = worst_case_members(models, model, r.eps)
        checked = check_against_bounds(model, members, r.eps, folder)
        wc = next(iter(worst_case_rows(members)), None)
        rows.append({
            "model": model.name,
            "eps": r.eps,
            "served_radius": r.eps == certifier.eps,
            "certificate_required": certifier.required,
            "score": r.score,
            "threshold": r.threshold,
            "images": r.images,
            "clean_accuracy": round(r.clean_accuracy, 4),
            "certified_accuracy": round(r.certified_accuracy, 4),
            "certified_handled": None if r.certified_handled is None
            else round(r.certified_handled, 4),
            "worst_case_handled": None if wc is None else wc["handled"],
            "worst_case_n": None if wc is None else wc["n"],
            "worst_case_over": None if wc is None else wc["over"],
            "wins_checked_against_bounds": checked,
            "accept_rate": round(r.accept_rate, 4),
            "policy_accept_rate": round(r.policy_accept_rate, 4),
            # Refused under the policy minus refused by T alone: (1 - policy) - (1 - accept).
            "policy_clean_refusals": round(r.accept_rate - r.policy_accept_rate, 4),
            "run": run_record(),
        })  # fmt: skip
    return rows


def worst_case_members(
    models: Models, model: Model, eps: float
) -> list[tuple[AuditJob, dict[str, np.ndarray]]]:
    """The saved L-inf attacks at eps on the served score at the served T: the worst case."""
    cfg = models.cfg
    group = (model.name, served_kind(model.manifest.score), None, eps, "linf")
    members = []
    for job in all_jobs(cfg.models, cfg.dry_run, models.served()):
        if job.model == model.name and job.group == group:
            saved = load_job(cfg, model, job)
            if saved is not None:
                members.append((job, saved))
    return members


def check_against_bounds(
    model: Model, members: list[tuple[AuditJob, dict[str, np.ndarray]]], eps: float, folder: Path
) -> int:
    """Raise `UnsoundCertificate` for a saved win on an image the bounds declare handled at
    eps around its clean original (certified, for a score the bounds do not cap); returns how
    many such images were checked."""
    if not members:
        return 0
    idx = np.unique(np.concatenate([saved["idx"] for _, saved in members]))
    x, y = model.data.x[idx].numpy(), model.data.y[idx].numpy().astype(np.int64)
    bounds = onnx_bounds(folder / CERTIFY_FILE)
    covered = []
    for i in range(0, len(idx), 250):
        m = bounds(x[i : i + 250], eps)
        yi = y[i : i + 250]
        if model.manifest.score in THRESHOLD_SCORES:
            covered.append(handled(m, yi, model.manifest.threshold))
        else:
            covered.append(certified_labels(m)[np.arange(len(yi)), yi])
    safe = np.concatenate(covered)
    checked = 0
    for job, saved in members:
        at = safe[np.searchsorted(idx, saved["idx"])]
        why = "the bounds around its clean original ruling out any win (certified handled)"
        checked += check_wins(model.name, job.name, saved["idx"], saved["served_won"], at,
                              saved["linf"], eps, why)  # fmt: skip
    return checked


def export_tiny(models_dir: Path) -> None:
    """The dry run: a bound graph for each tiny model that has none, at `DRY_RUN_EPS`,
    required (an uncertified answer is NOT SURE)."""
    from training.certify.graph import export_model

    for name in TINY_MODELS:
        folder = model_version_dir(models_dir, name)
        if not (folder / CERTIFY_FILE).exists():
            export_model(folder, parity_images=8, eps=DRY_RUN_EPS, required=True)


def _pct(v: object, n: object = None) -> str:
    if v is None:
        return "-"
    return f"{100 * float(v):.1f}%" + ("" if n is None else f" (n {n})")  # type: ignore[arg-type]


def markdown(rows: list[Row]) -> str:
    """The table for docs/robustness.md: per model and eps, what the bounds prove, what the
    attacks found, and what the certificate policy costs on clean images."""
    header = ["model", "eps", "certified (bounds)", "certified handled (bounds)",
              "worst-case handled (attacks)", "clean refusals the policy adds"]  # fmt: skip
    body = [
        [
            str(r["model"]) + (" (served radius)" if r["served_radius"] else ""),
            f"{float(r['eps']):g}",  # type: ignore[arg-type]
            _pct(r["certified_accuracy"], r["images"]),
            _pct(r["certified_handled"], r["images"]),
            _pct(r["worst_case_handled"], r["worst_case_n"]),
            _pct(r["policy_clean_refusals"], r["images"]),
        ]
        for r in rows
    ]
    runs = sorted({f"{r['run']['date']}, {r['run']['machine']}" for r in rows})  # type: ignore[index]
    note = (
        "Bounds: interval bound propagation around each clean image (certified: every image "
        "within eps gets the true label; certified handled: none gets an accepted wrong one). "
        "Attacks: 1 - the worst-case success of the saved L-inf attacks at eps, at the served "
        "decision. Policy: answers that also need a label certified at eps around the input. "
        f"Measured {'; '.join(runs)}."
    )
    return table(header, body) + "\n\n" + note
