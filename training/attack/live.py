"""Send the audit's saved adversarial images through a live service and count its decisions.

The audit counts wins offline (ONNX graph + `service.scoring`); this replays every saved image
over KServe V2 with binary tensors and checks that the running service decides the same.
"""

from __future__ import annotations

import json
import logging

from training.attack.audit import _MODELS, AuditConfig, job_dir, load_chunks, served_scores
from training.attack.io import score_all
from training.attack.plan import all_jobs
from training.attack.rows import attack_label
from training.attack.service_client import NOT_SURE, V2Client

log = logging.getLogger(__name__)


def live_check(cfg: AuditConfig, url: str) -> list[dict[str, object]]:
    """One row per job at the served T with saved images: offline vs live wins. The images
    are this machine's chunks (the kept results leave them out), so a job replays as many
    images as the work folder holds; rows of jobs with none here are kept from earlier
    replays."""
    path = cfg.out_json.with_name("live.json")
    rows: list[dict[str, object]] = json.loads(path.read_text()) if path.exists() else []
    served = served_scores()
    for job in all_jobs(cfg.models, cfg.dry_run, served):
        if job.clean_refusal is not None or job.cascade:
            continue  # the service applies the manifest's T to the served score only
        model = _MODELS[job.model]
        saved = load_chunks(job_dir(cfg, model, job))
        if saved is None:
            continue
        client = V2Client(url, model.name, model.manifest.version)
        try:
            client.wait_ready(60.0)
            dec = score_all(client, saved["adv"], 256, f"live {model.name} {job.name}")
        finally:
            client.close()
        y = model.data.y.numpy()[saved["idx"]]
        live = (dec.label != NOT_SURE) & (dec.label != y)
        offline = saved["served_won"]
        row = {
            "model": job.model,
            "score": job.score,
            "attack": attack_label(job),
            "norm": job.attack.norm,
            "eps": job.attack.eps,
            "steps": job.attack.steps,
            "restarts": job.attack.restarts,
            "n": len(y),
            "offline_wins": int(offline.sum()),
            "live_wins": int(live.sum()),
            "disagree": int((live != offline).sum()),
        }
        rows = [r for r in rows if not _same_job(r, row)] + [row]
        log.info("live %s", row)
        path.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def _same_job(old: dict[str, object], new: dict[str, object]) -> bool:
    """Whether a saved row replays the same job (rows written before the score, norm, steps
    and restarts were recorded match on what they have)."""
    return all(old[k] == new[k] for k in new if k in old and k not in _COUNTS)


_COUNTS = ("n", "offline_wins", "live_wins", "disagree")
