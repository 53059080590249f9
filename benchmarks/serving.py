"""Serving benchmark: the real server in its own process, wrk as the load generator.

Prints (and writes as JSON + markdown) req/s, img/s and p50/p99 latency at several concurrencies
for 1-image and 64-image requests, native JSON and KServe V2 binary, next to raw in-process
onnxruntime at the same batch sizes, and optionally the same server with batching off and
other servers (LitServe, BentoML, a lean async FastAPI endpoint, Triton through PyTriton)
serving the same model behind the same client.

    python -m benchmarks.serving --duration 10 --out docs/benchmarks
    python -m benchmarks.serving --quick          # 3 s per cell, fewer cells

Only 127.0.0.1 is targeted; every run is bounded by --duration.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks import ROOT
from benchmarks.batching_ab import measure_pairs, summary_line
from benchmarks.loadgen import (
    NOTSURE_APIS,
    Server,
    bodies,
    free_port,
    run_wrk,
    wait_idle,
    wait_quiet,
)
from benchmarks.raw_ort import raw_onnxruntime, raw_parallel, raw_parallel_cpu
from benchmarks.serving_report import (
    SAME_REQUEST,
    Cell,
    ceiling,
    markdown,
    rewrite,
    targets,
)
from service.manifest import MANIFEST_FILE, MODEL_FILE, Manifest

OTHERS = ROOT / "benchmarks" / "others"  # the comparison servers
COMPARE = (
    "no-batching",
    "litserve",
    "bentoml",
    "fastapi-lean",
    "fastapi-lean-default",
    "pytriton",
    "pytriton-grpc",
)
# notsure's cells: its HTTP body kinds (wrk) and V2 over gRPC.
PROTOCOLS = (*NOTSURE_APIS, "grpc")


class Other(NamedTuple):
    """A server compared with notsure on the same images in the body kinds it accepts."""

    cmd: list[str]  # "{port}" is replaced by the free port (also in env PORT)
    env: dict[str, str]
    ready: str  # GET path that answers 200 once the model is loaded
    path: str  # POST path of the requests
    apis: tuple[str, ...] = ("native",)  # the bodies it takes, keys of bodies() (or "grpc")
    images: tuple[int, ...] = (1, 64)


def grpc_load(
    target: str, model: str, images: int, concurrency: int, duration_s: float, shape: list[int],
    input_name: str = "input", datatype: str = "FP32",
) -> tuple[float, float, float, dict[str, int]]:  # fmt: skip
    """req/s, p50 and p99 ms, errors of one gRPC cell, from benchmarks.grpc_load run in its
    own process (the load generator must not share the driver's interpreter)."""
    cmd = [sys.executable, "-m", "benchmarks.grpc_load", "--target", target,
           "--model", model, "--images", str(images), "--concurrency", str(concurrency),
           "--duration", str(duration_s), "--input", input_name, "--datatype", datatype,
           "--shape", *map(str, shape)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 120, cwd=ROOT)
    if out.returncode != 0:
        return 0.0, 0.0, 0.0, {"load generator failed": 1, out.stderr[-200:]: 1}
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["req_s"], r["p50_ms"], r["p99_ms"], r["errors"]


def measured_kinds(protocols: list[str], servers: list[tuple[str, Other]], n: int) -> list[str]:
    """The body kinds measured at n images per request, each named by notsure's kind that
    carries the same request: notsure's protocols first, then any a peer alone has."""
    kinds = list(protocols) if any(name == "notsure" for name, _ in servers) else []
    for name, spec in servers:
        if name != "notsure" and n in spec.images:
            kinds += [k for k in (SAME_REQUEST.get(a, a) for a in spec.apis) if k not in kinds]
    return kinds


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with --quick's shorter cells applied."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="mnist-resnet32-rce")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per cell")
    ap.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="seconds of the same load before each cell, not measured (0: none)",
    )
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument(
        "--compare",
        nargs="*",
        default=list(COMPARE),
        choices=COMPARE,
        help="other servers, on the same images in the body kinds each accepts",
    )
    ap.add_argument(
        "--ab-pairs",
        type=int,
        default=5,
        help="alternating batching on/off runs at c=32 for the 1.5x target (0: skip)",
    )
    ap.add_argument(
        "--protocols",
        nargs="*",
        default=list(PROTOCOLS),
        choices=PROTOCOLS,
        help="notsure's cells: its HTTP body kinds (wrk) and V2 over gRPC",
    )
    ap.add_argument("--skip-raw", action="store_true", help="no raw onnxruntime rows (a smoke run)")
    ap.add_argument("--quick", action="store_true", help="3 s cells, concurrency 1 and 32")
    ap.add_argument("--out", type=Path, default=None, help="folder for results.json/.md")
    ap.add_argument("--rewrite", action="store_true", help="only rebuild results.md from --out")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.concurrency = 3.0, [1, 32]
        args.ab_pairs = min(args.ab_pairs, 2)
    return args


def measure_raw(args: argparse.Namespace, vdir: Path, manifest: Manifest) -> dict[str, Any]:
    """Raw in-process onnxruntime at batch 1 and 64: one session at 1 and 2 intra-op threads,
    and one run per core in parallel (the ceiling a server is held against)."""
    raw: dict[str, dict[str, float]] = {}
    for batch in () if args.skip_raw else (1, 64):
        for intra in (1, 2):
            ips, ms = raw_onnxruntime(
                vdir / MODEL_FILE, manifest.input_shape, batch, max(2.0, args.duration / 2), intra
            )
            raw[f"batch{batch}-intra{intra}"] = {"img_s": ips, "ms_per_run": ms}
            print(
                f"raw onnxruntime batch {batch:2d} intra-op {intra}: {ips:8.0f} img/s "
                f"{ms:7.2f} ms/run",
                flush=True,
            )
        ips = raw_parallel(
            vdir / MODEL_FILE,
            manifest.input_shape,
            batch,
            max(2.0, args.duration / 2),
            os.cpu_count() or 1,
        )
        raw[f"batch{batch}-parallel"] = {"img_s": ips}
        print(
            f"raw onnxruntime batch {batch:2d} {os.cpu_count()} parallel runs: {ips:8.0f} img/s",
            flush=True,
        )
    if raw:
        print(ceiling(raw), flush=True)
    return raw


SERVE = [sys.executable, "-m", "notsure.cli", "serve"]


def notsure_env(model: str) -> dict[str, str]:
    """notsure's settings in every cell. A queue deep enough for 64 clients x 64 images: the
    benchmark measures throughput, not load shedding (tests/reliability covers that)."""
    return {
        "NOTSURE_MODELS": model,
        "NOTSURE_LOG_LEVEL": "warning",
        "NOTSURE_MAX_QUEUE_IMAGES": "16384",
    }


def comparison_servers(
    model: str, vdir: Path, manifest: Manifest, pytriton_grpc: int
) -> dict[str, Other]:
    """Every server `--compare` may name, serving the model of `vdir`. The peers that run from
    their own environments find `benchmarks.others` through PYTHONPATH."""

    def lean(threads: str) -> Other:
        return Other(
            [sys.executable, "-m", "benchmarks.others.fastapi_app"],
            {"MODEL_DIR": str(vdir), "SCORER_THREADS": threads},
            "/health",
            "/predict",
            ("native", "native-float"),
        )

    pytriton = Other(
        [os.environ.get("PYTRITON_PYTHON", "/tmp/pytritonvenv/bin/python"),
         "-m", "benchmarks.others.pytriton_app"],
        {"MODEL_DIR": str(vdir), "PYTHONPATH": str(ROOT)},
        # Triton is ready (/v2/health/ready) before PyTriton has loaded the model into it.
        f"/v2/models/{manifest.name}/ready",
        f"/v2/models/{manifest.name}/infer",
        ("v2-json-u8", "v2-binary-u8"),
    )  # fmt: skip
    return {
        "no-batching": Other(
            SERVE,
            {**notsure_env(model), "NOTSURE_BATCHING": "false"},
            "/v2/health/ready",
            f"/v1/models/{model}/predict",
            images=(1,),
        ),
        "litserve": Other(
            [sys.executable, "-m", "benchmarks.others.litserve_app"],
            {"MODEL_DIR": str(vdir)},
            "/health",
            "/predict",
        ),
        "bentoml": Other(
            [
                os.environ.get("BENTOML", "/tmp/bentovenv/bin/bentoml"),
                "serve",
                "bentoml_app:NotSure",
                "--host",
                "127.0.0.1",
                "--port",
                "{port}",
                "--working-dir",
                str(OTHERS),
            ],
            {"MODEL_DIR": str(vdir), "PYTHONPATH": str(ROOT)},
            "/readyz",
            "/predict",
        ),
        "fastapi-lean": lean("1"),
        # The same endpoint with onnxruntime's own thread default (every core for each run), as
        # a hand-written service gets it without thinking about threads.
        "fastapi-lean-default": lean("0"),
        "pytriton": pytriton,
        # The same PyTriton app with its gRPC endpoint on, loaded by the same gRPC client as
        # notsure's gRPC cells (UINT8 images, as its HTTP cells).
        "pytriton-grpc": pytriton._replace(
            env={**pytriton.env, "GRPC_PORT": str(pytriton_grpc)}, apis=("grpc",)
        ),
    }


def start_servers(
    mine: Other, compare: list[str], others: dict[str, Other]
) -> list[tuple[str, Server, Other]]:
    """notsure and each compared server that is installed and starts, all at once (an idle
    server costs no CPU); a peer that is missing or fails to start is skipped, and said so."""
    running = [("notsure", Server(mine.cmd, mine.env, mine.ready), mine)]
    for name in compare:
        spec = others[name]
        if not Path(spec.cmd[0]).exists() and not shutil.which(spec.cmd[0]):
            print(f"{name}: not installed, skipped", flush=True)
            continue
        try:
            running.append((name, Server(spec.cmd, spec.env, spec.ready), spec))
        except RuntimeError as exc:
            print(f"{name}: failed to start ({exc}), skipped", flush=True)
    return running


class Base(NamedTuple):
    """Raw onnxruntime just before a cell: the ceiling at the cell's batch, and its own CPU time
    per image at the batch the server could form."""

    img_s: float
    cpu_ms_per_img: float
    cpu_batch: int


@dataclass
class Bench:
    """One run's inputs and the cells measured so far."""

    args: argparse.Namespace
    vdir: Path
    manifest: Manifest
    tmp: Path
    reqs: dict[int, dict[str, tuple[Path, str, str]]]  # images per request -> body kind -> body
    grpc_port: int  # notsure's
    pytriton_grpc: int
    cells: list[Cell] = field(default_factory=list)

    def report(self, c: Cell) -> None:
        self.cells.append(c)
        print(
            f"{c.server:20s} {c.api:12s} {c.images:3d} img  c={c.concurrency:3d}  "
            f"{c.req_s:8.1f} req/s {c.img_s:8.0f} img/s  p50 {c.p50_ms:7.2f} ms  "
            f"p99 {c.p99_ms:7.2f} ms  cpu {c.cpu_ms:5.2f} ms/req"
            + (f" ({c.cpu_ratio:.2f}x onnxruntime's)" if c.cpu_ratio is not None else "")
            + f"  errors {c.errors}",
            flush=True,
        )

    def base_for(self, n: int, c: int) -> Base:
        """The ceiling just before a cell, and onnxruntime's own CPU per image at the batch the
        server could form (the request's images; for 1-image requests one per client, at most
        64): the machine's free CPU drifts, so the raw baseline is measured in the same minute
        as the cell it is compared with."""
        if self.args.skip_raw:
            return Base(0.0, 0.0, 0)
        shape, path, workers = (
            self.manifest.input_shape,
            self.vdir / MODEL_FILE,
            os.cpu_count() or 1,
        )
        img_s, cpu = raw_parallel_cpu(path, shape, n, 1.5, workers)
        batch = n if n > 1 else min(c, 64)
        if batch != n:
            cpu = raw_parallel_cpu(path, shape, batch, 1.5, workers)[1]
        return Base(img_s, cpu, batch)

    def cell(
        self,
        server: Server,
        name: str,
        api: str,
        n: int,
        c: int,
        target: str,
        base: Base,
        model: str,
        shape: list[int],
        grpc_input: tuple[str, str],
    ) -> None:
        """One measured cell, with the server's CPU time per request, after `--warmup`
        seconds of the same load that are not measured (a server's first requests after a
        start or a change of body kind pay one-off costs: a 5 s cell at c=1 that started cold
        once had a p99 of 1.15 s)."""
        args = self.args

        def load(seconds: float) -> tuple[float, float, float, Any]:
            if api == "grpc":
                return grpc_load(target, model, n, c, seconds, shape, *grpc_input)
            return run_wrk(server.url + target, self.reqs[n][api], c, seconds, self.tmp)

        if args.warmup > 0:
            warm_rps = load(args.warmup)[0]
            # The load generator abandons the requests in flight when the warm-up ends; the
            # server still answers them. Left alone they ran into the measured seconds (64
            # clients x 64 images are 1.3 s of work: a quarter of a 5 s cell, counted as CPU
            # and time but not as answers). Wait until they are done: notsure says so on
            # /metrics; for a peer, the time its own warm-up rate needs for c requests.
            time.sleep(0.2 + min(c / warm_rps, 15.0) if warm_rps > 0 else 1.0)
            if name in ("notsure", "no-batching"):
                wait_idle(server.url)
        cpu0 = server.cpu_seconds()
        rps, p50, p99, errs = load(args.duration)
        cpu = server.cpu_seconds() - cpu0
        done = rps * args.duration
        cpu_ms = 1000 * cpu / done if done else 0.0
        self.report(Cell(name, api, n, c, rps, rps * n, p50, p99, errs, base.img_s, cpu_ms,
                         base.cpu_ms_per_img, base.cpu_batch))  # fmt: skip

    def run_cells(self, running: list[tuple[str, Server, Other]]) -> None:
        """Each cell loads the servers one after another, the order reversed from one cell to
        the next, with the ceiling measured just before: the machine's speed drifts by tens of
        percent within minutes, and a peer measured a quarter of an hour after notsure was
        compared with another machine."""
        args, shape = self.args, list(self.manifest.input_shape)
        servers = [server for _, server, _ in running]
        flip = False
        for n in (1, 64):
            for kind in measured_kinds(args.protocols, [(nm, sp) for nm, _, sp in running], n):
                for c in args.concurrency:
                    group = [
                        (name, server, spec, api)
                        for name, server, spec in running
                        if n in spec.images
                        for api in spec.apis
                        if (api if name == "notsure" else SAME_REQUEST.get(api, api)) == kind
                    ]
                    wait_quiet(servers)  # nothing left over from the last cell
                    base = self.base_for(n, c)
                    for name, server, spec, api in reversed(group) if flip else group:
                        if name in ("notsure", "no-batching"):
                            wait_idle(server.url)
                        wait_quiet(servers)
                        if name == "notsure":
                            target = f"127.0.0.1:{self.grpc_port}" if api == "grpc" else (
                                NOTSURE_APIS[api].format(args.model))  # fmt: skip
                            self.cell(server, name, api, n, c, target, base, args.model,
                                      shape, ("input", "FP32"))  # fmt: skip
                        else:
                            target = (
                                f"127.0.0.1:{self.pytriton_grpc}" if api == "grpc" else spec.path
                            )
                            self.cell(server, name, api, n, c, target, base, self.manifest.name,
                                      shape[1:], ("images", "UINT8"))  # fmt: skip
                    flip = not flip


def write_results(
    args: argparse.Namespace, raw: dict[str, Any], cells: list[Cell], ab: dict[str, Any] | None
) -> None:
    """results.json (and results.md, when there are raw rows to compare with) in --out,
    with the machine and the command that measured them."""
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "duration_s": args.duration,
        "model": args.model,
        "command": " ".join(["python -m benchmarks.serving", *sys.argv[1:]]),
    }
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "raw_onnxruntime": raw,
                "cells": [asdict(c) for c in cells],
                "batching_ab": ab,
            },
            indent=2,
        )
    )
    if raw:  # the report and the targets compare against the raw onnxruntime rows
        (args.out / "results.md").write_text(markdown(cells, raw, meta, ab))
    print(f"wrote {args.out / 'results.json'}" + (" and results.md" if raw else ""))


def main(argv: Sequence[str] | None = None) -> None:
    """Raw onnxruntime rows, the servers' cells, batching on vs off in pairs, the report."""
    args = parse_args(argv)
    if args.rewrite:
        rewrite(args.out)
        return
    needs_wrk = set(NOTSURE_APIS) & set(args.protocols) or set(args.compare) - {"pytriton-grpc"}
    if needs_wrk and shutil.which("wrk") is None:
        sys.exit("wrk is needed for HTTP cells: apt-get install wrk (or --protocols grpc)")
    vdir = ROOT / "models" / args.model / "1"
    manifest = Manifest.load(vdir / MANIFEST_FILE)
    raw = measure_raw(args, vdir, manifest)
    tmp = Path(tempfile.mkdtemp(prefix="notsure-bench-"))
    bench = Bench(args, vdir, manifest, tmp, {n: bodies(manifest, n, tmp) for n in (1, 64)},
                  grpc_port=free_port(), pytriton_grpc=free_port())  # fmt: skip
    others = comparison_servers(args.model, vdir, manifest, bench.pytriton_grpc)
    mine = Other(SERVE, {**notsure_env(args.model), "NOTSURE_GRPC_PORT": str(bench.grpc_port)},
                 "/v2/health/ready", "", tuple(args.protocols))  # fmt: skip
    running: list[tuple[str, Server, Other]] = []
    try:
        running = start_servers(mine, args.compare, others)
        bench.run_cells(running)
    finally:
        for _, server, _ in running:
            server.stop()

    ab = None
    if args.ab_pairs:
        # One cell per configuration, a minute apart, is at the mercy of the machine's drift;
        # the batching target is judged on the median of alternating pairs instead.
        ab = measure_pairs(
            args.model, args.ab_pairs, args.duration, 32, {"NOTSURE_BATCHING": "false"}, tmp
        )
        print(summary_line(ab), flush=True)
    if args.out:
        write_results(args, raw, bench.cells, ab)
    if not raw:
        print("no raw onnxruntime rows (--skip-raw): no report table, targets not checked")
        return
    for name, measured, ok in targets(bench.cells, raw, ab):
        print(f"{'MET ' if ok else 'MISS'} {name}: {measured}")


if __name__ == "__main__":
    main()
