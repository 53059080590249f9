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
    """One row per job at the served T with saved images: offline vs live wins."""
    rows: list[dict[str, object]] = []
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
        rows.append(
            {
                "model": job.model,
                "attack": attack_label(job),
                "eps": job.attack.eps,
                "n": len(y),
                "offline_wins": int(offline.sum()),
                "live_wins": int(live.sum()),
                "disagree": int((live != offline).sum()),
            }
        )
        log.info("live %s", rows[-1])
    path = cfg.out_json.with_name("live.json")
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return rows
