"""Batching on vs off, measured in alternating pairs so that the machine's drift cancels out.

One run of `serving.py` measures each configuration once, a minute apart; on a shared 2-core
machine that alone moves the ratio by tens of percent. Here both servers are started once
(an idle server costs no CPU) and loaded in turn, on, off, on, off, ... at the same
concurrency with the same body (by default 1-image integer JSON; `--body` and `--images` pick
another); each pair gives a ratio, and the median over the pairs is the figure to quote. The
rates are requests a second; multiply by --images for images a second.

    python -m benchmarks.batching_ab --pairs 6 --duration 6 --concurrency 32

Only 127.0.0.1 is targeted; every wrk run is bounded by --duration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import ROOT
from benchmarks.loadgen import NOTSURE_APIS, Server, bodies, run_wrk, wait_idle
from service.manifest import MANIFEST_FILE, Manifest


def measure_pairs(
    model: str,
    pairs: int,
    duration: float,
    concurrency: int,
    off_env: dict[str, str],
    tmp: Path,
    on_env: dict[str, str] | None = None,
    on_tree: Path = ROOT,
    off_tree: Path = ROOT,
    body_kind: str = "native",
    images: int = 1,
) -> dict[str, Any]:
    """Alternate wrk runs on a batching and a batching-off server; the pairs and their median."""
    manifest = Manifest.load(ROOT / "models" / model / "1" / MANIFEST_FILE)
    body = bodies(manifest, images, tmp)[body_kind]
    base = {
        "NOTSURE_MODELS": model,
        "NOTSURE_LOG_LEVEL": "warning",
        "NOTSURE_MAX_QUEUE_IMAGES": "16384",
    }
    serve = [sys.executable, "-m", "notsure.cli", "serve"]
    path = NOTSURE_APIS[body_kind].format(model)
    on = Server(serve, {**base, **(on_env or {})}, "/v2/health/ready", cwd=on_tree)
    try:
        off = Server(serve, {**base, **off_env}, "/v2/health/ready", cwd=off_tree)
    except RuntimeError:
        on.stop()
        raise
    rows: list[dict[str, float]] = []
    try:
        for i in range(pairs):
            row: dict[str, float] = {}
            for name, srv in (("on", on), ("off", off)):
                wait_idle(srv.url)
                rps, p50, p99, errs = run_wrk(srv.url + path, body, concurrency, duration, tmp)
                row[name], row[f"{name}_p50_ms"], row[f"{name}_p99_ms"] = rps, p50, p99
                row[f"{name}_errors"] = errs
            row["ratio"] = row["on"] / row["off"]
            rows.append(row)
            print(
                f"batching on/off pair {i + 1}: on {row['on']:7.1f} req/s  off "
                f"{row['off']:7.1f} req/s  ratio {row['ratio']:.2f}x",
                flush=True,
            )
    finally:
        on.stop()
        off.stop()
    ratios = [r["ratio"] for r in rows]
    return {
        "concurrency": concurrency,
        "body": body_kind,
        "images": images,
        "off_env": off_env,
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "median_on": statistics.median(r["on"] for r in rows),
        "median_off": statistics.median(r["off"] for r in rows),
        "pairs": rows,
    }


def summary_line(ab: dict[str, Any]) -> str:
    return (
        f"c={ab['concurrency']}: median on {ab['median_on']:.0f} vs off {ab['median_off']:.0f} "
        f"req/s; ratio median {ab['median_ratio']:.2f}x (range {ab['min_ratio']:.2f}-"
        f"{ab['max_ratio']:.2f}) over {len(ab['pairs'])} alternating pairs"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="mnist-resnet32-rce")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--duration", type=float, default=6.0, help="seconds per wrk run")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--body", choices=sorted(NOTSURE_APIS), default="native", help="body kind")
    ap.add_argument("--images", type=int, default=1, help="images per request")
    ap.add_argument(
        "--off-env",
        default="NOTSURE_BATCHING=false",
        help="extra settings of the 'off' server, comma-separated KEY=VALUE",
    )
    ap.add_argument("--on-env", default="", help="extra settings of the 'on' server, likewise")
    ap.add_argument(
        "--on-tree",
        type=Path,
        default=ROOT,
        help="checkout whose code the 'on' server runs (default: this one); e.g. a "
        "`git worktree` of another commit, to compare two versions of the code",
    )
    ap.add_argument("--off-tree", type=Path, default=ROOT, help="likewise for the 'off' server")
    ap.add_argument("--out", type=Path, default=None, help="write the pairs as JSON here")
    args = ap.parse_args()
    off_env = dict(kv.split("=", 1) for kv in args.off_env.split(",") if kv)
    on_env = dict(kv.split("=", 1) for kv in args.on_env.split(",") if kv)
    tmp = Path(tempfile.mkdtemp(prefix="notsure-ab-"))
    ab = measure_pairs(
        args.model, args.pairs, args.duration, args.concurrency, off_env, tmp, on_env,
        args.on_tree.resolve(), args.off_tree.resolve(), args.body, args.images,
    )  # fmt: skip
    print(summary_line(ab))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(ab, indent=2))


if __name__ == "__main__":
    main()
