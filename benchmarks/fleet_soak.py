"""Multi-replica soak: 3 `notsure serve` replicas behind haproxy, Prometheus scraping each; mixed
traffic through the balancer while one replica is sent SIGTERM (drained) or SIGKILL (crashed)
and later restarted on its port.

    python -m benchmarks.fleet_soak --repo models --duration 120 --concurrency 16 --out fleet.json
    python -m benchmarks.fleet_soak --signal kill --duration 60 --concurrency 8
    python -m benchmarks.fleet_soak --signal kill --protocol grpc --duration 60

Every request carries a unique X-Request-ID; a response counts as correct only when it is a 200
that echoes that id with one prediction per image (benchmarks/soak.py's check). "lost" is a
request that got no HTTP response, "duplicated" an id answered twice; 503/429 answers with
Retry-After are the only errors a client may see ("told to retry"). haproxy names the replica
that answered (X-Served-By), so each replica's Prometheus counters are compared with what the
client was answered by that replica, and the dashboard's refuse-rate expression, summed over
replicas, with the share of NOT SURE answers the client saw.

With SIGKILL the killed replica answers nothing it had in flight; haproxy resends those requests
to another replica (deploy/haproxy/haproxy.cfg's retry-on), so the client still gets each answer
once. No scrape reaches a dead process, so in this mode every replica instance keeps its counters
in files of its own (prometheus_client's multiprocess store, the same /metrics series) and the
killed one's are read from them after the kill. Its images counted there but not answered by it
to the client are duplicated inferences: images it had run when it died, run again elsewhere.
`--protocol grpc` sends KServe V2 ModelInfer calls through haproxy's HTTP/2 listener instead
(benchmarks/fleet_grpc.py), counted the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import re
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from benchmarks import ROOT
from benchmarks.balancer import Fleet
from benchmarks.fleet_grpc import Tally, add, grpc_calls, grpc_worker
from benchmarks.soak import SERVER_CALLS, Call, build_calls, check

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "notsure.json"


@dataclass(frozen=True)
class FleetSoakConfig:
    repo: Path
    workdir: Path
    replicas: int = 3
    duration_s: float = 30.0
    concurrency: int = 8
    victim: int = 1  # the replica sent the signal
    signal: str = "term"  # "term": SIGTERM, drained; "kill": SIGKILL, nothing drained
    # SIGKILL only: SIGSTOP the victim this long first (a hung replica, then killed, as a
    # liveness probe does), so that the kill surely finds requests it has not answered.
    freeze_s: float = 0.0
    protocol: str = "http"  # "http": the HTTP mix; "grpc": V2 ModelInfer through HTTP/2
    kill_at: float = 0.3  # fractions of the duration
    restart_at: float = 0.55
    # Traffic goes on at least this long after the restarted replica is back in rotation (a
    # restart takes seconds to tens of seconds on a busy machine).
    after_restart_s: float = 8.0
    timeout_s: float = 30.0
    seed: int = 0
    settings: tuple[tuple[str, str], ...] = ()  # NOTSURE_* variables of every replica


@dataclass
class FleetSoakResult:
    replicas: int
    duration_s: float
    concurrency: int
    victim: int
    signal: str = "term"
    protocol: str = "http"
    date: str = ""  # UTC start of the run
    machine: str = ""
    traffic_s: float = 0.0  # how long traffic really ran (past duration_s after a slow restart)
    requests: int = 0
    ok: int = 0
    lost: int = 0
    duplicated: int = 0
    told_to_retry: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    by_replica: dict[str, int] = field(default_factory=dict)  # answers per replica
    req_per_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    events: list[tuple[float, str]] = field(default_factory=list)
    victim_exit_code: int | None = None
    client_images: Tally = field(default_factory=dict)
    # Per replica instance ("r0", "r1#1" before its restart, "r1#2" after): images by model
    # and decision as the client was answered, and as Prometheus last scraped them.
    client_by_instance: dict[str, Tally] = field(default_factory=dict)
    scraped_by_instance: dict[str, Tally] = field(default_factory=dict)
    # Inference requests (predict, infer) answered 200 per instance: as the client got them,
    # and notsure_requests_total as Prometheus last scraped it.
    client_requests: dict[str, int] = field(default_factory=dict)
    scraped_requests: dict[str, int] = field(default_factory=dict)
    # SIGKILL only: the killed instance's counters read from its files after the kill (images
    # by model and decision, inference requests answered), and the images it ran but did not
    # answer (run again on another replica after haproxy resent the request).
    killed_counters: Tally = field(default_factory=dict)
    killed_requests: int = 0
    duplicated_inference_images: int = 0
    refuse_rate: dict[str, dict[str, float]] = field(default_factory=dict)  # client, dashboard
    # haproxy's own counters: sessions, retries, redispatches, connection and response errors.
    balancer: dict[str, int] = field(default_factory=dict)


def decisions(call: Call, r: httpx.Response) -> list[str]:
    """The decision of each image of a correct answer."""
    if not call.images:
        return []
    if call.kind.startswith("v2_binary"):
        hlen = int(r.headers["inference-header-content-length"])
        outputs = json.loads(r.content[:hlen])["outputs"]
        labels = next(o["data"] for o in outputs if o["name"] == "label")
    elif call.kind.startswith("v2_json"):
        labels = next(o["data"] for o in r.json()["outputs"] if o["name"] == "label")
    else:
        return [p["decision"] for p in r.json()["predictions"]]
    return ["not_sure" if label == -1 else "accepted" for label in labels]


class Traffic:
    """Workers sending the soak's mix through the balancer, counting every answer."""

    def __init__(self, cfg: FleetSoakConfig, res: FleetSoakResult, calls: list[Call]) -> None:
        self.cfg, self.res, self.calls = cfg, res, calls
        self.seen: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.generation = [1] * cfg.replicas  # bumped when a replica restarts
        self.deadline = time.monotonic() + cfg.duration_s  # pushed back after the restart
        self.restarted = False  # workers keep going until the restarted replica has served

    async def worker(self, wid: int, client: httpx.AsyncClient) -> None:
        rng = np.random.default_rng(self.cfg.seed * 1000 + wid)
        res = self.res
        for seq in itertools.count():
            if self.restarted and time.monotonic() >= self.deadline:
                return
            call = self.calls[int(rng.integers(len(self.calls)))]
            rid = f"w{wid}-{seq}-{uuid.uuid4().hex[:12]}"
            content = (call.body_prefix + rid.encode() + call.body_suffix
                       if call.body_suffix is not None else call.body_prefix or None)  # fmt: skip
            res.requests += 1
            t0 = time.perf_counter()
            try:
                r = await client.request(call.method, call.path, content=content,
                                         headers={"x-request-id": rid, **dict(call.headers)},
                                         files=list(call.files) or None)  # fmt: skip
            except httpx.HTTPError as exc:
                res.lost += 1
                res.errors[type(exc).__name__] = res.errors.get(type(exc).__name__, 0) + 1
                continue
            self.latencies.append(time.perf_counter() - t0)
            self.seen[r.headers.get("x-request-id", "")] += 1
            if self.seen[r.headers.get("x-request-id", "")] > 1:
                res.duplicated += 1
            if r.status_code in (429, 503) and "retry-after" in r.headers:
                res.told_to_retry += 1
                continue
            why = check(call, rid, r)
            if why is not None:
                res.errors[why] = res.errors.get(why, 0) + 1
                continue
            res.ok += 1
            replica = r.headers.get("x-served-by", "?")
            res.by_replica[replica] = res.by_replica.get(replica, 0) + 1
            model = call.path.split("/")[3] if call.images else ""
            instance = f"{replica}#{self.generation[int(replica[1:])]}"
            if call.images:
                res.client_requests[instance] = res.client_requests.get(instance, 0) + 1
            for d in decisions(call, r):
                add(res.client_images, model, d)
                add(res.client_by_instance.setdefault(instance, {}), model, d)


async def _calls(url: str, seed: int) -> list[Call]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        models = [m for m in (await client.get("/v1/models")).json()["models"] if m["ready"]]
        calls = list(SERVER_CALLS)
        for i, m in enumerate(models):
            c, h, w = (await client.get(f"/v2/models/{m['name']}")).json()["inputs"][0]["shape"][1:]
            calls += build_calls(m["name"], (c, h, w), seed + i)
    return calls


async def _drive(cfg: FleetSoakConfig, fleet: Fleet, res: FleetSoakResult) -> float:
    """Traffic for the whole duration; SIGTERM and restart of the victim meanwhile."""
    traffic = Traffic(cfg, res, await _calls(fleet.url, cfg.seed))
    backend = "notsure_grpc" if cfg.protocol == "grpc" else "notsure"
    limits = httpx.Limits(max_connections=cfg.concurrency,
                          max_keepalive_connections=cfg.concurrency)  # fmt: skip
    t0 = time.monotonic()
    traffic.deadline = t0 + cfg.duration_s

    def event(what: str) -> None:
        res.events.append((round(time.monotonic() - t0, 2), what))

    async def fault() -> None:
        await asyncio.sleep(cfg.kill_at * cfg.duration_s)
        if cfg.signal == "kill" and cfg.freeze_s > 0:
            event(f"SIGSTOP r{cfg.victim}")
            fleet.freeze_replica(cfg.victim)
            await asyncio.sleep(cfg.freeze_s)
        event(f"SIG{cfg.signal.upper()} r{cfg.victim}")
        stop = fleet.kill_replica if cfg.signal == "kill" else fleet.terminate_replica
        res.victim_exit_code = await asyncio.to_thread(stop, cfg.victim)
        event(f"r{cfg.victim} exited {res.victim_exit_code}")
        # Prometheus' last samples of the old instance, before the new one reuses its port.
        killed = f"r{cfg.victim}#1"
        res.scraped_by_instance[killed] = _scraped(fleet, fleet.ports[cfg.victim], gone=True)
        res.scraped_requests[killed] = _scraped_requests(fleet, fleet.ports[cfg.victim], True)
        if cfg.signal == "kill":
            _read_killed(fleet, cfg.victim, res)
        await asyncio.sleep(max(0.0, cfg.restart_at * cfg.duration_s - (time.monotonic() - t0)))
        traffic.generation[cfg.victim] += 1
        event(f"restart r{cfg.victim}")
        await asyncio.to_thread(fleet.start_replica, cfg.victim)
        event(f"r{cfg.victim} ready")
        await asyncio.to_thread(fleet.wait_until,
                                lambda: fleet.servers_up(backend) == cfg.replicas,
                                30, "the restarted replica in rotation")  # fmt: skip
        event(f"r{cfg.victim} back in rotation")
        traffic.deadline = max(traffic.deadline, time.monotonic() + cfg.after_restart_s)
        traffic.restarted = True

    if cfg.protocol == "grpc":
        calls = await grpc_calls(fleet.url, cfg.seed)
        await asyncio.gather(fault(), *(grpc_worker(traffic, i, fleet.grpc_target, calls)
                                        for i in range(cfg.concurrency)))  # fmt: skip
    else:
        async with httpx.AsyncClient(base_url=fleet.url, limits=limits,
                                     timeout=cfg.timeout_s) as client:  # fmt: skip
            await asyncio.gather(fault(), *(traffic.worker(i, client)
                                            for i in range(cfg.concurrency)))  # fmt: skip
    elapsed = time.monotonic() - t0
    res.traffic_s = round(elapsed, 1)
    res.req_per_s = round(res.requests / elapsed, 1)
    if traffic.latencies:
        q = np.percentile(np.array(traffic.latencies) * 1000, [50, 99])
        res.latency_ms = {"p50": round(float(q[0]), 1), "p99": round(float(q[1]), 1),
                          "max": round(max(traffic.latencies) * 1000, 1)}  # fmt: skip
    return elapsed


def _selector(name: str, port: int, gone: bool, matchers: str = "") -> str:
    """One replica's series of a counter: the last sample scraped before it went away (`gone`),
    else the current one. The plain selector skips series that vanished from the replica's
    scrapes (Prometheus marks them stale), which last_over_time would still return: a series
    only the previous instance on the same port had."""
    selector = f'{name}{{instance="127.0.0.1:{port}"{matchers}}}'
    return f"last_over_time({selector}[1m])" if gone else selector


def _scraped(fleet: Fleet, port: int, gone: bool = False) -> Tally:
    """The last scraped notsure_predictions_total of one replica, by model and decision."""
    tally: Tally = {}
    expr = _selector("notsure_predictions_total", port, gone)
    for labels, value in fleet.query(expr):
        if value:
            add(tally, labels["model"], labels["decision"], int(value))
    return tally


# The inference routes (native predict, V2 infer; gRPC ModelInfer), as the request counter
# labels them.
INFER_ENDPOINTS = ".*/(predict|infer).*|.*/ModelInfer"


def _scraped_requests(fleet: Fleet, port: int, gone: bool = False) -> int:
    """Inference requests answered 200 by one replica, as Prometheus last scraped them."""
    matchers = f',code="200",endpoint=~"{INFER_ENDPOINTS}"'
    expr = f"sum({_selector('notsure_requests_total', port, gone, matchers)})"
    return sum(int(v) for _, v in fleet.query(expr))


def _read_killed(fleet: Fleet, victim: int, res: FleetSoakResult) -> None:
    """The killed instance's final counters, from its files: images by model and decision, and
    inference requests answered (counted once the answer was sent, so never one it died on)."""
    endpoints = re.compile(INFER_ENDPOINTS)
    for name, labels, value in fleet.counters_left(victim, 1):
        if name == "notsure_predictions_total" and value:
            add(res.killed_counters, labels["model"], labels["decision"], int(value))
        elif (name == "notsure_requests_total" and labels["code"] == "200"
              and endpoints.fullmatch(labels["endpoint"])):  # fmt: skip
            res.killed_requests += int(value)


def dashboard_refuse_expr(window_s: int) -> str:
    """The dashboard's refuse-rate query as Grafana sends it with every model selected."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    (expr,) = [t["expr"] for p in panels if p["title"] == "Refuse rate per model"
               for t in p["targets"] if t["refId"] == "A"]  # fmt: skip
    return expr.replace("$__rate_interval", f"{window_s}s").replace('"$model"', '".+"')


def run_fleet_soak(cfg: FleetSoakConfig) -> FleetSoakResult:
    if cfg.signal not in ("term", "kill"):
        raise ValueError(f"signal must be 'term' or 'kill', got {cfg.signal!r}")
    if cfg.protocol not in ("http", "grpc"):
        raise ValueError(f"protocol must be 'http' or 'grpc', got {cfg.protocol!r}")
    res = FleetSoakResult(cfg.replicas, cfg.duration_s, cfg.concurrency, cfg.victim, cfg.signal,
                          cfg.protocol)  # fmt: skip
    res.date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res.machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU"
    with Fleet(cfg.repo, cfg.workdir, cfg.replicas, dict(cfg.settings),
               counter_files=cfg.signal == "kill") as fleet:  # fmt: skip
        started = time.time()
        asyncio.run(_drive(cfg, fleet, res))
        res.balancer = fleet.backend_counters(
            "notsure_grpc" if cfg.protocol == "grpc" else "notsure"
        )
        # Three more scrapes of the final counters, then read them.
        time.sleep(3.5)
        for i, port in enumerate(fleet.ports):
            gen = fleet.starts[i]
            res.scraped_by_instance[f"r{i}#{gen}"] = _scraped(fleet, port)
            res.scraped_requests[f"r{i}#{gen}"] = _scraped_requests(fleet, port)
        window = int(time.time() - started) + 10  # the whole soak, and a little before it
        dashboard = {labels["model"]: v for labels, v in fleet.query(dashboard_refuse_expr(window))}
        for model, by in res.client_images.items():
            total = sum(by.values())
            res.refuse_rate[model] = {"client": by.get("not_sure", 0) / total,
                                      "dashboard": dashboard.get(model, float("nan"))}  # fmt: skip
    if cfg.signal == "kill":
        answered = res.client_by_instance.get(f"r{cfg.victim}#1", {})
        res.duplicated_inference_images = sum(
            n - answered.get(m, {}).get(d, 0) for m, by in res.killed_counters.items()
            for d, n in by.items()
        )  # fmt: skip
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repo", type=Path, default=ROOT / "models", help="model repository")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of traffic")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--signal", choices=("term", "kill"), default="term",
                   help="SIGTERM the victim (it drains) or SIGKILL it")  # fmt: skip
    p.add_argument("--freeze", type=float, default=0.0,
                   help="with --signal kill: SIGSTOP the victim this long first (s)")  # fmt: skip
    p.add_argument("--protocol", choices=("http", "grpc"), default="http",
                   help="the HTTP mix, or V2 gRPC ModelInfer over HTTP/2")  # fmt: skip
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fleet-soak-") as work:
        cfg = FleetSoakConfig(repo=a.repo.resolve(), workdir=Path(work), replicas=a.replicas,
                              duration_s=a.duration, concurrency=a.concurrency,
                              signal=a.signal, freeze_s=a.freeze,
                              protocol=a.protocol)  # fmt: skip
        res = run_fleet_soak(cfg)
    text = json.dumps(asdict(res), indent=2)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)
    problems = accounting_problems(res)
    for line in problems:
        print(f"PROBLEM: {line}", file=sys.stderr)
    return 1 if problems else 0


def accounting_problems(res: FleetSoakResult, refuse_tol: float = 0.005) -> list[str]:
    """What the soak got wrong; empty when nothing was lost, duplicated or miscounted."""
    out = []
    if res.lost or res.duplicated or res.errors:
        out.append(f"lost {res.lost}, duplicated {res.duplicated}, errors {res.errors}")
    expected_exit = -signal.SIGKILL if res.signal == "kill" else 0
    if res.victim_exit_code != expected_exit:
        out.append(f"the replica sent SIG{res.signal.upper()} exited {res.victim_exit_code}")
    for inst, client in res.client_by_instance.items():
        scraped = res.scraped_by_instance.get(inst, {})
        requests = (res.scraped_requests.get(inst, 0), res.client_requests.get(inst, 0))
        if inst == f"r{res.victim}#1":
            # Answers given after the old instance's last scrape are never scraped: at most.
            short = [(m, d) for m, by in scraped.items() for d, n in by.items()
                     if n > client.get(m, {}).get(d, 0)]  # fmt: skip
            if short or requests[0] > requests[1]:
                out.append(f"{inst}: Prometheus counted more than the client got: {short}, "
                           f"requests {requests}")  # fmt: skip
            if res.signal == "kill":
                out += _killed_problems(res, inst, client)
        elif scraped != client or requests[0] != requests[1]:
            out.append(f"{inst}: Prometheus {scraped} != client {client}, requests {requests}")
    for model, rr in res.refuse_rate.items():
        if not abs(rr["client"] - rr["dashboard"]) <= refuse_tol:
            out.append(f"{model}: refuse rate client {rr['client']} dashboard {rr['dashboard']}")
    return out


def _killed_problems(res: FleetSoakResult, inst: str, client: Tally) -> list[str]:
    """The killed instance's own final counters against what the client got from it: every
    image answered was counted (more is a duplicated inference, never fewer), and no request
    was counted as answered that the client did not get from it."""
    out = []
    uncounted = [(m, d) for m, by in client.items() for d, n in by.items()
                 if n > res.killed_counters.get(m, {}).get(d, 0)]  # fmt: skip
    if uncounted:
        out.append(f"{inst}: answered more than its own counters say: {uncounted}")
    if res.killed_requests > res.client_requests.get(inst, 0):
        out.append(f"{inst}: counted {res.killed_requests} inference answers, the client got "
                   f"{res.client_requests.get(inst, 0)} from it")  # fmt: skip
    return out


if __name__ == "__main__":
    sys.exit(main())
