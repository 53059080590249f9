"""Soak test for `notsure serve`: mixed concurrent traffic for a fixed time, every response checked.

    python -m benchmarks.soak --repo models --duration 300 --concurrency 64 --out soak.json
    python -m benchmarks.soak --url http://127.0.0.1:8000 --pid 1234 --duration 30

Without --url it starts its own `notsure serve` on a free 127.0.0.1 port and stops it with
SIGTERM at the end (the exit code is part of the result). Each request carries a unique
X-Request-ID (and the same id in the body where the API has one); a response counts as correct
only when it is a 200 that echoes that id and has one prediction per image sent. "lost" is a
request that got no HTTP response at all; "duplicated" an id that came back more than once.
The server's resident memory (VmRSS) is sampled every second from /proc; `rss_kib.growth` is
the change of its level after warm-up (windowed medians, see `rss_summary`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import itertools
import json
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
from PIL import Image

from benchmarks.serve_process import ServeProcess, free_port, rss_kib
from service import v2codec

__all__ = ["ServeProcess", "free_port", "rss_kib"]


@dataclass(frozen=True)
class SoakConfig:
    url: str
    pid: int | None = None  # the server's pid, for RSS samples
    duration_s: float = 300.0
    concurrency: int = 64
    warmup_s: float = 10.0  # RSS baseline is the first sample after this
    timeout_s: float = 30.0
    seed: int = 0


@dataclass
class SoakResult:
    duration_s: float
    concurrency: int
    requests: int = 0
    ok: int = 0
    images: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # kind -> count of wrong answers
    lost: int = 0
    duplicated: int = 0
    by_endpoint: dict[str, int] = field(default_factory=dict)
    req_per_s: float = 0.0
    images_per_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50/p99/max over all requests
    rss_kib: dict[str, int] = field(default_factory=dict)  # start, after_warmup, end, max
    rss_samples: list[tuple[float, int]] = field(default_factory=list)
    client_cpu_s: float = 0.0
    server_exit_code: int | None = None

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


@dataclass(frozen=True)
class Call:
    """One request template; the request id is spliced in at send time."""

    kind: str
    method: str
    path: str
    images: int  # predictions expected back (0: not an inference call)
    body_prefix: bytes = b""  # JSON: prefix + id + suffix; other bodies: prefix only
    body_suffix: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    files: tuple[tuple[str, tuple[str, bytes, str]], ...] = ()
    id_in_body: bool = False


def _png(img: npt.NDArray[np.float32]) -> bytes:
    """(C, H, W) in [0, 1] -> PNG bytes."""
    arr = (img * 255).round().astype(np.uint8)
    pil = Image.fromarray(arr[0]) if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0))
    buf = io.BytesIO()
    pil.save(buf, "PNG")
    return buf.getvalue()


def _json_call(kind: str, path: str, images: int, body: dict[str, Any]) -> Call:
    rest = json.dumps(body, separators=(",", ":")).encode()
    return Call(
        kind,
        "POST",
        path,
        images,
        b'{"id":"',
        b'",' + rest[1:],
        (("content-type", "application/json"),),
        id_in_body=True,
    )


def build_calls(model: str, shape: tuple[int, int, int], seed: int) -> list[Call]:
    """The traffic mix for one model: every endpoint, batch sizes 1 to 128."""
    rng = np.random.default_rng(seed)
    x = rng.random((128, *shape), dtype=np.float32).round(3)  # (128, C, H, W)

    def pixels(n: int) -> list[Any]:
        return [img[0].tolist() if shape[0] == 1 else img.tolist() for img in x[:n]]

    def v2_json(n: int) -> dict[str, Any]:
        return {
            "inputs": [
                {
                    "name": "input",
                    "shape": [n, *shape],
                    "datatype": "FP32",
                    "data": x[:n].reshape(-1).tolist(),
                }
            ]
        }

    calls = [
        _json_call("predict_pixels_1", f"/v1/models/{model}/predict", 1, {"instances": pixels(1)}),
        _json_call(
            "predict_pixels_16", f"/v1/models/{model}/predict", 16, {"instances": pixels(16)}
        ),
        _json_call(
            "predict_png_8",
            f"/v1/models/{model}/predict",
            8,
            {"instances": [base64.b64encode(_png(i)).decode() for i in x[:8]]},
        ),
        _json_call(
            "predict_version_4",
            f"/v1/models/{model}/versions/1/predict",
            4,
            {"instances": [{"b64": base64.b64encode(_png(i)).decode()} for i in x[:4]]},
        ),
        _json_call("v2_json_8", f"/v2/models/{model}/infer", 8, v2_json(8)),
        Call(
            "predict_files_2",
            "POST",
            f"/v1/models/{model}/predict/files",
            2,
            files=tuple(("files", (f"{i}.png", _png(x[i]), "image/png")) for i in range(2)),
        ),
        Call("metadata", "GET", f"/v2/models/{model}", 0),
    ]
    for n in (1, 32, 128):
        # j_score as binary data, the labels in the JSON header (-1: NOT SURE): the
        # multi-replica soak counts decisions from them.
        body, headers = v2codec.encode_request(
            [("input", x[:n])], outputs=["j_score", "label"], binary_outputs=["j_score"]
        )
        calls.append(
            Call(
                f"v2_binary_{n}",
                "POST",
                f"/v2/models/{model}/infer",
                n,
                body,
                headers=tuple((k.lower(), v) for k, v in headers.items()),
            )
        )
    return calls


SERVER_CALLS = [
    Call("ready", "GET", "/v2/health/ready", 0),
    Call("models", "GET", "/v1/models", 0),
    Call("metrics", "GET", "/metrics", 0),
]


def check(call: Call, rid: str, r: httpx.Response) -> str | None:
    """Why this response is wrong, or None when it is right."""
    if r.status_code != 200:
        return f"status_{r.status_code}"
    if r.headers.get("x-request-id") != rid:
        return "request_id_header"
    if not call.images:
        return None
    if call.kind.startswith("v2_binary"):
        try:
            tensors, _ = v2codec.decode_response(r.content, r.headers[v2codec.HEADER_LENGTH])
        except (KeyError, ValueError):
            return "prediction_count"
        ok = tensors["j_score"].shape == tensors["label"].shape == (call.images,)
        return None if ok else "prediction_count"
    body = r.json()
    if call.id_in_body and body.get("id") != rid:
        return "request_id_body"
    if "predictions" in body:
        n = len(body["predictions"])
    else:  # KServe V2: one label per image
        n = next(o["shape"][0] for o in body["outputs"] if o["name"] == "label")
    return "prediction_count" if n != call.images else None


async def _worker(
    wid: int,
    client: httpx.AsyncClient,
    calls: list[Call],
    deadline: float,
    res: SoakResult,
    seen: Counter[str],
    latencies: list[float],
) -> None:
    rng = np.random.default_rng(wid)
    for seq in itertools.count():
        if time.monotonic() >= deadline:
            return
        call = calls[int(rng.integers(len(calls)))]
        rid = f"w{wid}-{seq}-{uuid.uuid4().hex[:12]}"
        headers = {"x-request-id": rid, **dict(call.headers)}
        content = (
            call.body_prefix + rid.encode() + call.body_suffix
            if call.body_suffix is not None
            else call.body_prefix or None
        )
        res.requests += 1
        res.by_endpoint[call.kind] = res.by_endpoint.get(call.kind, 0) + 1
        t0 = time.perf_counter()
        try:
            r = await client.request(
                call.method,
                call.path,
                headers=headers,
                content=content,
                files=list(call.files) or None,
            )
        except httpx.HTTPError as exc:
            res.lost += 1
            res.errors[type(exc).__name__] = res.errors.get(type(exc).__name__, 0) + 1
            continue
        latencies.append(time.perf_counter() - t0)
        echoed = r.headers.get("x-request-id", "")
        seen[echoed] += 1
        if seen[echoed] > 1:
            res.duplicated += 1
        why = check(call, rid, r)
        if why is None:
            res.ok += 1
            res.images += call.images
        else:
            res.errors[why] = res.errors.get(why, 0) + 1


async def _sample_rss(pid: int | None, t0: float, stop: asyncio.Event, res: SoakResult) -> None:
    while pid is not None and not stop.is_set():
        kib = rss_kib(pid)
        if kib is not None:
            res.rss_samples.append((round(time.monotonic() - t0, 1), kib))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)


async def run_soak(cfg: SoakConfig) -> SoakResult:
    """Drive cfg.concurrency workers against cfg.url for cfg.duration_s and check every answer."""
    res = SoakResult(cfg.duration_s, cfg.concurrency)
    limits = httpx.Limits(
        max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency
    )
    async with httpx.AsyncClient(base_url=cfg.url, limits=limits, timeout=cfg.timeout_s) as client:
        models = [m for m in (await client.get("/v1/models")).json()["models"] if m["ready"]]
        calls = list(SERVER_CALLS)
        for i, m in enumerate(models):
            meta = (await client.get(f"/v2/models/{m['name']}")).json()
            c, h, w = meta["inputs"][0]["shape"][1:]
            calls += build_calls(m["name"], (c, h, w), cfg.seed + i)
        seen: Counter[str] = Counter()
        latencies: list[float] = []
        stop = asyncio.Event()
        t0 = time.monotonic()
        cpu0 = time.process_time()
        sampler = asyncio.create_task(_sample_rss(cfg.pid, t0, stop, res))
        await asyncio.gather(
            *(
                _worker(i, client, calls, t0 + cfg.duration_s, res, seen, latencies)
                for i in range(cfg.concurrency)
            )
        )
        elapsed = time.monotonic() - t0
        stop.set()
        await sampler
    res.client_cpu_s = round(time.process_time() - cpu0, 1)
    res.req_per_s = round(res.requests / elapsed, 1)
    res.images_per_s = round(res.images / elapsed, 1)
    if latencies:
        q = np.percentile(np.array(latencies) * 1000, [50, 99])
        res.latency_ms = {
            "p50": round(float(q[0]), 1),
            "p99": round(float(q[1]), 1),
            "max": round(max(latencies) * 1000, 1),
        }
    if res.rss_samples:
        res.rss_kib = rss_summary(res.rss_samples, cfg.warmup_s)
    return res


def rss_summary(
    samples: list[tuple[float, int]], warmup_s: float, window_s: float = 5.0
) -> dict[str, int]:
    """Resident memory over a run from (seconds, KiB) samples: the first, the first after
    warm-up, the last and the largest sample, and `growth`, the median of the last `window_s`
    seconds minus the median of the first `window_s` seconds after warm-up. Single samples
    swing by tens of MiB with the request bodies in flight at that second (64 clients, up to
    128 images each); the windowed medians follow the level, so a leak or an allocator that
    keeps growing shows in `growth` and the traffic of one second does not."""
    kib = [k for _, k in samples]
    after = [(t, k) for t, k in samples if t >= warmup_s] or samples[-1:]
    t_warm, t_end = after[0][0], after[-1][0]
    first = [k for t, k in after if t < t_warm + window_s]
    last = [k for t, k in after if t > t_end - window_s]
    return {
        "start": kib[0],
        "after_warmup": after[0][1],
        "end": kib[-1],
        "max": max(kib),
        "growth": int(np.median(last) - np.median(first)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", help="a running server; else one is started from --repo")
    p.add_argument("--pid", type=int, help="the running server's pid (for RSS)")
    p.add_argument("--repo", type=Path, default=Path("models"), help="model repository")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of traffic")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--warmup", type=float, default=10.0, help="seconds before the RSS baseline")
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    p.add_argument(
        "--server-log", type=Path, help="the started server's log (default: a new temp directory)"
    )
    a = p.parse_args(argv)
    server = None
    if a.url is None:
        log = a.server_log or Path(tempfile.mkdtemp(prefix="notsure-soak-")) / "server.log"
        print(f"server log: {log}", file=sys.stderr)
        server = ServeProcess(a.repo, log).start()
    url = a.url or server.url  # type: ignore[union-attr]
    pid = a.pid or (server.pid if server else None)
    cfg = SoakConfig(
        url=url, pid=pid, duration_s=a.duration, concurrency=a.concurrency, warmup_s=a.warmup
    )
    try:
        res = asyncio.run(run_soak(cfg))
    finally:
        if server is not None:
            code = server.terminate()
    if server is not None:
        res.server_exit_code = code
    out = asdict(res)
    text = json.dumps(out, indent=2)
    if a.out:
        a.out.write_text(text + "\n")
    summary = {k: v for k, v in out.items() if k not in ("rss_samples", "by_endpoint")}
    print(json.dumps(summary))
    clean = res.error_count == 0 and res.lost == 0 and res.duplicated == 0
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
