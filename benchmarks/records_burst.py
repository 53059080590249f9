"""NOT SURE records under a burst: does the disk cap hold while every image is refused?

    python -m benchmarks.records_burst --seconds 60 --out docs/monitoring/records_burst
    python -m benchmarks.records_burst --dry-run          # 3 s, a small cap

Starts `notsure serve` with NOTSURE_RECORD_RATE=1 and a small NOTSURE_RECORD_MAX_BYTES, sends
uniform-noise images (which the bundled RCE model refuses, all of them) from `concurrency`
clients for `seconds`, measures the record folder's size every 0.1 s, and reads the records'
counters from /metrics at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.serve_process import ServeProcess

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class BurstConfig:
    seconds: float = 60.0
    cap_bytes: int = 2 * 1024 * 1024
    images: int = 16  # per request
    concurrency: int = 4
    model: str = "mnist-resnet32-rce"
    out: Path | None = None

    @classmethod
    def tiny(cls) -> BurstConfig:
        return cls(seconds=3.0, cap_bytes=64 * 1024)


@dataclass
class BurstResult:
    date: str
    machine: str
    seconds: float
    cap_bytes: int
    requests: int
    refused_images: int
    written: float
    dropped_queue_full: float
    rotated: float
    max_folder_bytes: int
    final_folder_bytes: int
    final_records: int
    p50_ms: float
    p99_ms: float


def _folder_bytes(folder: Path) -> int:
    total = 0
    for p in list(folder.iterdir()) if folder.exists() else []:
        with contextlib.suppress(FileNotFoundError):  # rotated away meanwhile
            total += p.stat().st_size
    return total


async def _load(url: str, cfg: BurstConfig, latencies: list[float]) -> tuple[int, int]:
    rng = np.random.default_rng(0)
    bodies = [{"instances": rng.integers(0, 256, (cfg.images, 28, 28)).tolist()} for _ in range(8)]
    stop = time.monotonic() + cfg.seconds
    done = {"requests": 0, "refused": 0}

    async def client(i: int) -> None:
        async with httpx.AsyncClient(timeout=30) as c:
            k = i
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                r = await c.post(f"{url}/v1/models/{cfg.model}/predict", json=bodies[k % 8])
                latencies.append(time.perf_counter() - t0)
                r.raise_for_status()
                done["requests"] += 1
                done["refused"] += sum(p["decision"] == "not_sure" for p in r.json()["predictions"])
                k += 1

    await asyncio.gather(*(client(i) for i in range(cfg.concurrency)))
    return done["requests"], done["refused"]


def _counts(url: str) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, s.labels.get("reason", "")): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip


def _drained(url: str, refused: int, timeout_s: float = 30.0) -> dict[tuple[str, str], float]:
    """The records' counters once every refused image was written or dropped."""
    deadline = time.monotonic() + timeout_s
    while True:
        c = _counts(url)
        handled = (
            c[("notsure_records_written_total", "")]
            + c[("notsure_records_dropped_total", "queue_full")]
        )
        if handled >= refused or time.monotonic() > deadline:
            return c
        time.sleep(0.2)


def burst(cfg: BurstConfig) -> BurstResult:
    with tempfile.TemporaryDirectory(prefix="notsure-burst-") as tmp:
        folder = Path(tmp) / "records"
        env = {"NOTSURE_MODELS": cfg.model, "NOTSURE_RECORD_RATE": "1",
               "NOTSURE_RECORD_DIR": str(folder), "NOTSURE_RECORD_MAX_BYTES": str(cfg.cap_bytes),
               "NOTSURE_GRPC_ENABLED": "false"}  # fmt: skip
        with ServeProcess(ROOT / "models", Path(tmp) / "serve.log", env) as server:
            sizes: list[int] = []
            watching = threading.Event()

            def watch() -> None:
                while not watching.wait(0.1):
                    sizes.append(_folder_bytes(folder))

            t = threading.Thread(target=watch, daemon=True)
            t.start()
            latencies: list[float] = []
            requests, refused = asyncio.run(_load(server.url, cfg, latencies))
            counts = _drained(server.url, refused)  # the writer empties its queue
            watching.set()
            t.join()
            final = _folder_bytes(folder)
            records = len(list(folder.glob("*.json")))
    lat = np.asarray(latencies) * 1000
    return BurstResult(
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=f"{platform.node()}: {platform.machine()}, 2-core CPU, no GPU (CPU figures)",
        seconds=cfg.seconds, cap_bytes=cfg.cap_bytes, requests=requests, refused_images=refused,
        written=counts[("notsure_records_written_total", "")],
        dropped_queue_full=counts[("notsure_records_dropped_total", "queue_full")],
        rotated=counts[("notsure_records_rotated_total", "")],
        max_folder_bytes=max(sizes, default=0), final_folder_bytes=final, final_records=records,
        p50_ms=round(float(np.median(lat)), 2), p99_ms=round(float(np.percentile(lat, 99)), 2),
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--cap-bytes", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="writes OUT.json")
    p.add_argument("--dry-run", action="store_true")
    a = vars(p.parse_args())
    base = BurstConfig.tiny() if a.pop("dry_run") else BurstConfig()
    cfg = replace(base, **{k: v for k, v in a.items() if v is not None})
    result = burst(cfg)
    text = json.dumps(asdict(result), indent=2)
    if cfg.out is not None:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.with_suffix(".json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
