"""Model control under load: a new model version arrives while clients keep sending.

    python -m benchmarks.model_control --out docs/benchmarks/model_control
    python -m benchmarks.model_control --dry-run            # a few seconds, CI's run

Starts `notsure serve` on 127.0.0.1 over a private copy of one model (version 1) and runs a
closed loop of `concurrency` clients (KServe V2 binary infer without a version: the latest
ready one answers) for `seconds`. At `change_at_s` version 1's folder is copied in as version 2
(staged beside it and renamed into place, so the server never sees half a folder); with
`model_control=explicit` the benchmark then calls `POST /v2/repository/models/{name}/load`
(which also reloads version 1 under the load), with `poll` the server's next scan finds it.
Each mode reports the requests sent, those that failed (anything but a 200 answer: there must
be none), when version 2 first answered, and the latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np

from benchmarks.serve_process import ServeProcess
from service import v2codec
from service.manifest import MANIFEST_FILE, Manifest

ROOT = Path(__file__).resolve().parents[1]
Mode = Literal["explicit", "poll"]


def add_version(repo: Path, name: str, source: int, version: int, **changes: Any) -> Path:
    """Copy `<repo>/<name>/<source>/` in as version `version`, its manifest renumbered and
    given `changes` (e.g. threshold, sha256); staged under a name the repository ignores, then
    renamed into place in one step. Returns the new folder."""
    staged = repo / name / f".incoming-{version}"
    shutil.copytree(repo / name / str(source), staged)
    manifest = Manifest.load(staged / MANIFEST_FILE)
    manifest.model_copy(update={"version": version, **changes}).save(staged / MANIFEST_FILE)
    return staged.rename(repo / name / str(version))


@dataclass(frozen=True)
class ControlConfig:
    seconds: float = 60.0
    concurrency: int = 8
    change_at_s: float = 20.0  # when version 2 is copied in (and loaded, in explicit mode)
    modes: tuple[Mode, ...] = ("explicit", "poll")
    poll_s: float = 2.0  # NOTSURE_REPOSITORY_POLL_S in poll mode
    images: int = 1  # per request
    model: str = "mnist-resnet32-rce"
    repo: Path = ROOT / "models"
    out: Path | None = None

    @classmethod
    def tiny(cls) -> ControlConfig:
        return cls(seconds=5.0, concurrency=4, change_at_s=1.5, poll_s=0.3)


@dataclass
class ModeResult:
    mode: Mode
    requests: int = 0
    failed: int = 0
    by_status: dict[str, int] = field(default_factory=dict)  # "error" for a transport error
    by_version: dict[str, int] = field(default_factory=dict)  # 200 answers per version
    copied_at_s: float = 0.0  # since the load started
    load_status: int | None = None  # the load request's (explicit)
    load_call_s: float | None = None
    first_new_answer_s: float | None = None  # from the copy to version 2's first answer
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    index_after: list[dict[str, str]] = field(default_factory=list)


@dataclass
class ControlResult:
    date: str
    machine: str
    config: dict[str, Any]
    modes: list[ModeResult]


async def _drive(url: str, repo: Path, cfg: ControlConfig, mode: Mode) -> ModeResult:
    res = ModeResult(mode)
    shape = Manifest.load(repo / cfg.model / "1" / MANIFEST_FILE).input_shape
    x = np.random.default_rng(0).random((cfg.images, *shape), dtype=np.float32)
    body, headers = v2codec.encode_request([("input", x)], outputs=["label"])
    statuses: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    latencies: list[float] = []
    t0 = time.monotonic()
    deadline = t0 + cfg.seconds
    copied: dict[str, float] = {}
    limits = httpx.Limits(max_connections=cfg.concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            while time.monotonic() < deadline:
                start = time.perf_counter()
                try:
                    r = await client.post(
                        f"/v2/models/{cfg.model}/infer", content=body, headers=headers
                    )
                except httpx.HTTPError:
                    statuses["error"] += 1
                    continue
                latencies.append(time.perf_counter() - start)
                statuses[str(r.status_code)] += 1
                if r.status_code != 200:
                    continue
                _, header = v2codec.decode_response(
                    r.content, r.headers.get("inference-header-content-length")
                )
                versions[header["model_version"]] += 1
                if header["model_version"] == "2" and res.first_new_answer_s is None:
                    res.first_new_answer_s = round(time.monotonic() - copied["at"], 3)

        async def change() -> None:
            await asyncio.sleep(cfg.change_at_s)
            await asyncio.to_thread(add_version, repo, cfg.model, 1, 2)
            copied["at"] = time.monotonic()
            res.copied_at_s = round(copied["at"] - t0, 3)
            if mode == "explicit":
                r = await client.post(f"/v2/repository/models/{cfg.model}/load")
                res.load_status = r.status_code
                res.load_call_s = round(time.monotonic() - copied["at"], 3)

        await asyncio.gather(change(), *(worker() for _ in range(cfg.concurrency)))
        res.index_after = (await client.post("/v2/repository/index")).json()
    res.requests = sum(statuses.values())
    res.failed = res.requests - statuses["200"]
    res.by_status, res.by_version = dict(statuses), dict(versions)
    if latencies:
        ms = np.asarray(latencies) * 1000
        res.p50_ms, res.p99_ms = (
            round(float(np.median(ms)), 2),
            round(float(np.percentile(ms, 99)), 2),
        )
        res.max_ms = round(float(ms.max()), 2)
    return res


def run_mode(cfg: ControlConfig, mode: Mode) -> ModeResult:
    """One live server over a fresh copy of the model's version 1, under load, for `mode`."""
    with tempfile.TemporaryDirectory(prefix="notsure-control-") as tmp:
        repo = Path(tmp) / "models"
        shutil.copytree(cfg.repo / cfg.model / "1", repo / cfg.model / "1")
        env = {
            "NOTSURE_MODEL_CONTROL": mode,
            "NOTSURE_REPOSITORY_POLL_S": str(cfg.poll_s),
            "NOTSURE_MODELS": cfg.model,
            "NOTSURE_GRPC_ENABLED": "false",
        }
        with ServeProcess(repo, Path(tmp) / "serve.log", env) as server:
            return asyncio.run(_drive(server.url, repo, cfg, mode))


def control(cfg: ControlConfig) -> ControlResult:
    modes = [run_mode(cfg, mode) for mode in cfg.modes]
    return ControlResult(
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=f"{platform.node()}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, no GPU (CPU figures)",
        config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        modes=modes,
    )


def report(result: ControlResult) -> str:
    """The result as a Markdown table, one row per mode."""
    c = result.config
    lines = [
        f"Model control under load, {result.date}, {result.machine}.",
        "",
        f"{c['model']}: {c['concurrency']} clients in a closed loop for {c['seconds']:g} s, "
        f"{c['images']} image(s) a request; version 2 copied in at {c['change_at_s']:g} s "
        f"(poll interval {c['poll_s']:g} s).",
        "",
        "| mode | requests | failed | answers v1 / v2 | load call (s) | copy to first v2 "
        "answer (s) | p50 / p99 / max (ms) |",
        "| --- | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for m in result.modes:
        v = m.by_version
        lines.append(
            f"| {m.mode} | {m.requests} | {m.failed} | {v.get('1', 0)} / {v.get('2', 0)} | "
            f"{'-' if m.load_call_s is None else m.load_call_s} | "
            f"{'never' if m.first_new_answer_s is None else m.first_new_answer_s} | "
            f"{m.p50_ms} / {m.p99_ms} / {m.max_ms} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.model_control", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--concurrency", type=int, default=None)
    p.add_argument("--change-at-s", type=float, default=None)
    p.add_argument("--poll-s", type=float, default=None)
    p.add_argument("--mode", dest="modes", choices=["explicit", "poll"], action="append")
    p.add_argument("--model", default=None)
    p.add_argument("--repo", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="writes OUT.json and OUT.md")
    p.add_argument("--dry-run", action="store_true", help="a few seconds (CI)")
    a = vars(p.parse_args(argv))
    base = ControlConfig.tiny() if a.pop("dry_run") else ControlConfig()
    if a["modes"]:
        a["modes"] = tuple(a["modes"])
    cfg = replace(base, **{k: v for k, v in a.items() if v is not None})
    result = control(cfg)
    text = json.dumps(asdict(result), indent=2)
    if cfg.out is not None:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.with_suffix(".json").write_text(text + "\n")
        cfg.out.with_suffix(".md").write_text(report(result))
    print(report(result))
    return 0 if all(m.failed == 0 for m in result.modes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
