"""The real Prometheus (Debian's binary) scrapes a live service with our config and rules; after
accepted and NOT SURE traffic of known proportions, the refuse-rate expression of the dashboard
and the alert's recording rule return exactly that proportion through the HTTP API."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.conftest import (
    PROMETHEUS_DIR,
    ServiceProcess,
    dashboard_targets,
    free_port,
    grafana_to_promql,
    noise_instances,
    predict,
    stop_process,
    tool,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WAIT_S = 60.0
STACK_ATTEMPTS = 3
# Per request, images sent with T=0 (all accepted) and T=1 (all NOT SURE: no J-score reaches 1)
# to tiny-rce, and images sent to tiny-ce, whose T is forced to 1 through NOTSURE_THRESHOLDS.
RCE_ACCEPTED, RCE_NOT_SURE, CE_IMAGES = 5, 3, 4
EXPECTED_REFUSE = {"tiny-rce": RCE_NOT_SURE / (RCE_ACCEPTED + RCE_NOT_SURE), "tiny-ce": 1.0}
# Dashboard queries that stay empty unless requests fail (no 5xx or shedding is provoked here).
EMPTY_WITHOUT_ERRORS = {
    ("Server error ratio", "A"),
    ("Shed requests and batch failures", "A"),
    ("Score drift (PSI)", "A"),
}  # drift: once a window holds 100 images


def wait_for(what: str, probe: Callable[[], Any], timeout: float = WAIT_S, poll: float = 0.25
             ) -> Any:  # fmt: skip
    """probe() until it returns something truthy; fail with the last value after timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


class PrometheusProcess:
    """prometheus on 127.0.0.1 with deploy/prometheus's config, scraping one service each second."""

    def __init__(self, workdir: Path, service_port: int) -> None:
        self.port = free_port()
        config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
        targets = {"notsure": f"127.0.0.1:{service_port}", "prometheus": f"127.0.0.1:{self.port}"}
        for job in config["scrape_configs"]:
            job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.argv = [tool("prometheus"), f"--config.file={self.config}",
                     f"--storage.tsdb.path={workdir / 'data'}",
                     f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]  # fmt: skip
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> PrometheusProcess:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"prometheus exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        try:
            wait_for("prometheus to be ready", ready)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc)
        self.proc = None

    def series(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """Instant query: (labels, value) of each series of the result."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (expr, body)
        return [(s["metric"], float(s["value"][1])) for s in body["data"]["result"]]

    def by_model(self, expr: str) -> dict[str, float]:
        """Instant query of a per-model expression: {model: value}."""
        result = self.series(expr)
        out = {labels["model"]: value for labels, value in result}
        assert len(out) == len(result), result
        return out

    def wait_for_next_scrape(self) -> None:
        """Return just after Prometheus scraped the notsure target."""

        def last_scrape() -> str | None:
            targets = [t for t in self.api("targets")["activeTargets"]
                       if t["labels"]["job"] == "notsure" and t["health"] == "up"]  # fmt: skip
            return str(targets[0]["lastScrape"]) if targets else None

        before = wait_for("the service's first scrape", last_scrape)
        wait_for("a scrape of the service", lambda: last_scrape() not in (None, before), poll=0.05)

    def first_timestamps(self, metric: str) -> dict[str, float]:
        """Timestamp of the oldest sample of each series of a metric (last minute)."""
        data = self.api(f"query?query={metric}[1m]")
        return {json.dumps(s["metric"], sort_keys=True): float(s["values"][0][0])
                for s in data["result"]}  # fmt: skip

    def api(self, path: str) -> Any:
        body = httpx.get(f"{self.url}/api/v1/{path}", timeout=10).json()
        assert body["status"] == "success", body
        return body["data"]


@dataclass
class Stack:
    service: ServiceProcess
    prometheus: PrometheusProcess


def send_traffic(url: str, repo: Path, seed: int) -> dict[tuple[str, str], int]:
    """One round of the known traffic; returns images per (model, decision) as answered."""
    counts: dict[tuple[str, str], int] = {}

    def count(model: str, decisions: list[str]) -> None:
        for d in decisions:
            counts[model, d] = counts.get((model, d), 0) + 1

    rce = noise_instances(repo, "tiny-rce", RCE_ACCEPTED + RCE_NOT_SURE, seed)
    count("tiny-rce", predict(url, "tiny-rce", rce[:RCE_ACCEPTED], threshold=0.0))
    count("tiny-rce", predict(url, "tiny-rce", rce[RCE_ACCEPTED:], threshold=1.0))
    count("tiny-ce", predict(url, "tiny-ce", noise_instances(repo, "tiny-ce", CE_IMAGES, seed)))
    assert counts == {("tiny-rce", "accepted"): RCE_ACCEPTED,
                      ("tiny-rce", "not_sure"): RCE_NOT_SURE,
                      ("tiny-ce", "not_sure"): CE_IMAGES}, counts  # fmt: skip
    return counts


@pytest.fixture(scope="module")
def stack(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Service and Prometheus, after two identical rounds of traffic: the first creates every
    series, the second is what rate() measures (a counter's first sample is its baseline)."""
    env = {"NOTSURE_MODEL_REPOSITORY": str(model_repo), "NOTSURE_DEVICE": "cpu",
           "NOTSURE_THRESHOLDS": json.dumps({"tiny-ce": 1.0}),
           "NOTSURE_ALLOW_REQUEST_THRESHOLD": "true"}  # fmt: skip
    totals = "sum by (model, decision) (notsure_predictions_total)"
    want = {("tiny-rce", "accepted"): RCE_ACCEPTED, ("tiny-rce", "not_sure"): RCE_NOT_SURE,
            ("tiny-ce", "not_sure"): CE_IMAGES}  # fmt: skip
    for attempt in range(1, STACK_ATTEMPTS + 1):
        with ExitStack() as running:
            workdir = tmp_path_factory.mktemp("prometheus-live")
            service = running.enter_context(ServiceProcess(workdir, env))
            prom = running.enter_context(PrometheusProcess(workdir, service.port))

            def scraped(rounds: int, prom: PrometheusProcess = prom) -> bool:
                # The service creates both decision series at load, at 0: a combination this
                # traffic never produces stays at 0 and is not part of the expectation.
                got = {(m["model"], m["decision"]): v for m, v in prom.series(totals) if v}
                return got == {k: float(rounds * v) for k, v in want.items()}

            # Every series must start at the same scrape: rate() extrapolates each series from
            # its own first sample, so series born a scrape apart would not give the exact
            # ratio. A round that straddles a scrape (a loaded machine) starts over afresh.
            prom.wait_for_next_scrape()
            send_traffic(service.url, model_repo, seed=0)
            wait_for("the first round in Prometheus", lambda: scraped(1))
            births = prom.first_timestamps("notsure_predictions_total")
            if len(set(births.values())) != 1:
                assert attempt < STACK_ATTEMPTS, f"round 1 straddled a scrape each time: {births}"
                continue
            # A few more scrapes at the baseline, so the window has samples on both sides.
            time.sleep(3)
            send_traffic(service.url, model_repo, seed=1)
            wait_for("the second round in Prometheus", lambda: scraped(2))
            time.sleep(2)
            yield Stack(service, prom)
            return


def test_target_is_up(stack: Stack) -> None:
    (target,) = [t for t in stack.prometheus.api("targets")["activeTargets"]
                 if t["labels"]["job"] == "notsure"]  # fmt: skip
    assert target["health"] == "up", target
    assert stack.prometheus.series('up{job="notsure"}') == [
        ({"__name__": "up", "instance": f"127.0.0.1:{stack.service.port}", "job": "notsure"}, 1.0)
    ]


def test_dashboard_refuse_rate_returns_the_ratio_sent(stack: Stack) -> None:
    (panel,) = [t for t in dashboard_targets()
                if t.panel == "Refuse rate per model" and t.ref == "A"]  # fmt: skip
    got = stack.prometheus.by_model(grafana_to_promql(panel.expr))
    assert got == pytest.approx(EXPECTED_REFUSE, rel=1e-9)


def test_recording_rule_of_the_alert_returns_the_ratio_sent(stack: Stack) -> None:
    """The alert compares model:notsure_refuse_rate:ratio_rate5m with its 1-day average."""
    rule = "model:notsure_refuse_rate:ratio_rate5m"

    def evaluated() -> dict[str, float] | None:
        got = stack.prometheus.by_model(rule)
        return got if got == pytest.approx(EXPECTED_REFUSE, rel=1e-9) else None

    wait_for(f"{rule} == {EXPECTED_REFUSE}", evaluated, timeout=15)


def test_rules_evaluate_and_a_steady_refuse_rate_does_not_alert(stack: Stack) -> None:
    groups = stack.prometheus.api("rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert len(rules) == 14
    for name, r in rules.items():
        assert r["health"] == "ok", (name, r.get("lastError"))
    # tiny-ce refuses everything (T forced to 1), but 8 images are too few for the test.
    assert rules["NotSureRefuseRateAboveCalibrated"]["state"] == "inactive"
    assert rules["NotSureScoreDrift"]["state"] == "inactive"
    assert rules["NotSureServiceDown"]["state"] == "inactive"
    assert rules["NotSureModelNotReady"]["state"] == "inactive"


def test_every_dashboard_query_runs(stack: Stack) -> None:
    for t in dashboard_targets():
        got = stack.prometheus.series(grafana_to_promql(t.expr))
        if (t.panel, t.ref) not in EMPTY_WITHOUT_ERRORS:
            assert got, f"panel {t.panel!r} query {t.ref} returned nothing"
