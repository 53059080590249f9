"""Send the audit's saved adversarial images through a live service and count its decisions.

The audit counts wins offline (ONNX graph + `service.scoring`); this replays every saved image
over KServe V2 with binary tensors and checks that the running service decides the same. For
a job at the served T the win is the service's own decision (a label, not -1, that is wrong).
For a job at another threshold or on another score (T for 1% clean refusals, confidence,
K-density), the service applies its own T to its own score, so the win is read from what it
returns: the predicted class (argmax of `probabilities`) is wrong and the job's score, as the
service computed it (`j_score`, `confidence` or `k_density`), is at least the job's T. For a
model with a bound graph the service's `certified` output is read too: where the model requires
the certificate, a win needs it, and every live win whose certified ball holds its correctly
labelled clean original stops the replay (`training.audit.soundness`).
"""

from __future__ import annotations

import json
import logging

import numpy as np

from service.scoring import NOT_SURE, answered
from training.audit.jobs import AuditJob, all_jobs
from training.audit.rows import attack_label
from training.audit.soundness import check_certified_wins
from training.audit.store import job_dir, load_chunks
from training.audit.subject import Model, Models
from training.clients import V2Client
from training.progress import progress_bar
from training.provenance import run_record
from training.torch_scoring import service_name

log = logging.getLogger(__name__)
BATCH = 256  # images per request


def live_wins(client: V2Client, model: Model, job: AuditJob, adv: np.ndarray,
              y: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """(N,) whether the service's answers to `adv` count as wins for the job, and (N,) whether
    each answer is certified (None for a model without a bound graph)."""
    served_t = job.clean_refusal is None
    score = service_name(job.score)
    has_cert = model.manifest.certify_eps is not None
    required = has_cert and model.manifest.certify_required
    outputs: tuple[str, ...] = ("label",) if served_t else ("probabilities", score)
    outputs += ("certified",) if has_cert else ()
    won = np.zeros(len(adv), dtype=bool)
    certified = np.zeros(len(adv), dtype=bool)
    with progress_bar(f"live {model.name} {job.name}", total=len(adv)) as bar:
        for i in range(0, len(adv), BATCH):
            t, _ = client.infer_outputs(adv[i : i + BATCH], outputs)
            yi = y[i : i + BATCH]
            cert = t["certified"].astype(bool) if has_cert else None
            if cert is not None:
                certified[i : i + BATCH] = cert
            if served_t:  # the service's own decision, its certificate policy included
                label = t["label"].astype(np.int64)
                won[i : i + BATCH] = (label != NOT_SURE) & (label != yi)
            else:
                wrong = t["probabilities"].argmax(axis=1) != yi
                ok = answered(t[score].astype(np.float64), threshold, cert, required)
                won[i : i + BATCH] = wrong & ok
            bar.advance(len(yi))
    return won, certified if has_cert else None


def live_check(models: Models, url: str) -> list[dict[str, object]]:
    """One row per job with saved images: offline vs live wins. The images are this
    machine's chunks (the kept results leave them out), so a job replays as many images as
    the work folder holds; rows of jobs with none here are kept from earlier replays."""
    cfg = models.cfg
    path = cfg.out_json.with_name("live.json")
    rows: list[dict[str, object]] = json.loads(path.read_text()) if path.exists() else []
    for job in all_jobs(cfg.models, cfg.dry_run, models.served()):
        model = models[job.model]
        saved = load_chunks(job_dir(cfg, model, job))
        if saved is None:
            continue
        keep = ~saved["skipped"]  # a cascade's images that an earlier attack had won
        idx, adv = saved["idx"][keep], saved["adv"][keep]
        y = model.data.y.numpy()[idx]
        threshold = float(saved["threshold"][0]) if len(saved["threshold"]) else 0.0
        client = V2Client(url, model.name, model.manifest.version)
        try:
            client.wait_ready(60.0)
            live, certified = live_wins(client, model, job, adv, y, threshold)
        finally:
            client.close()
        eps = model.manifest.certify_eps
        if certified is not None and eps is not None:
            linf = saved["linf"][keep]
            check_certified_wins(model, f"{job.name} (live)", idx, live, certified, linf, eps)
        offline = saved["served_won"][keep]
        # The service's certificates against those saved offline, image by image.
        certificates = (
            {}
            if certified is None or "certified" not in saved
            else {
                "live_certified": int(certified.sum()),
                "certified_disagree": int((certified != saved["certified"][keep]).sum()),
            }
        )
        row = {
            "model": job.model,
            "score": job.score,
            "attack": attack_label(job),
            "norm": job.attack.norm,
            "eps": job.attack.eps,
            "clean_refusal": job.clean_refusal,
            "threshold": threshold,
            "cascade": job.cascade,
            "steps": job.attack.steps,
            "restarts": job.attack.restarts,
            "decided_by": "service" if job.clean_refusal is None else "service's score at T",
            "n": len(y),
            "offline_wins": int(offline.sum()),
            "live_wins": int(live.sum()),
            "disagree": int((live != offline).sum()),
            **model.certificate,
            **certificates,
            "run": run_record(),
        }
        rows = [r for r in rows if not _same_job(r, row)] + [row]
        log.info("live %s", row)
        path.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def _same_job(old: dict[str, object], new: dict[str, object]) -> bool:
    """Whether a saved row replays the same job (rows written before the score, norm, T,
    steps and restarts were recorded match on what they have)."""
    return all(old[k] == new[k] for k in new if k in old and k not in _COUNTS)


_COUNTS = ("n", "offline_wins", "live_wins", "disagree", "threshold", "decided_by", "run",
           "live_certified", "certified_disagree")  # fmt: skip
