"""Live replay: does the calibrated refuse-rate alert stay quiet on clean images and fire on a
shift, through a real `notsure serve` scraped by a real Prometheus with deploy/prometheus's
rules?

    python -m benchmarks.monitor_replay --data-dir ../shared/data --out docs/monitoring/replay
    python -m benchmarks.monitor_replay --dry-run     # tiny models and synthetic data, seconds

Phase 1 sends `clean` MNIST test images, one per request; phase 2 sends MNIST test images with
`shift_share` of them replaced by Fashion-MNIST test images (interleaved at random). Requests
go one after another at most `rate` a second, so a count of requests maps to a time. Measured:

- per request, z of the service's window (the client knows each decision, and the window is
  the last `window` answers), hence how many phase-2 requests the test needs to cross 4;
- the alert's state in Prometheus (polled every 0.25 s): never firing in phase 1, and the
  request count when it first fires in phase 2 (this adds the scrape and rule intervals; a phase
  that has sent everything first waits up to 30 s for it and gives its full count);
- the exported PSI of each score at the end of each phase (a full window of either kind).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.serve_process import ServeProcess, free_port
from service.drift import refuse_excess_z
from service.manifest import MANIFEST_FILE, Manifest

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERT = "NotSureRefuseRateAboveCalibrated"
ALERT_GRACE_S = 30.0  # how long a finished phase waits for the alert before saying "never"
Z_ALERT, MIN_EXPECTED = 4.0, 10.0  # the alert's z and its N p0 guard (alerts.yml)


@dataclass(frozen=True)
class ReplayConfig:
    data_dir: Path | None = Path("../shared/data")
    model_repository: Path = ROOT / "models"
    model: str = "mnist-resnet32-rce"
    clean: int = 10_000
    mixed: int = 10_000  # at most; phase 2 ends a full window after the alert fired
    shift_share: float = 0.1
    window: int = 1000
    rate: float = 250.0  # requests a second at most
    prometheus: bool = True
    seed: int = 0
    out: Path | None = None  # writes <out>.json and <out>.md

    @classmethod
    def tiny(cls, repo: Path) -> ReplayConfig:
        """The dry run: the tiny models, synthetic digits vs uniform noise, a short replay."""
        # The tiny models were calibrated on 128 images: a window of 400 is the least where
        # N p0 >= 10, and their p0 is uncertain enough (1 + N / n0 = 4.1) to need a large shift.
        return cls(data_dir=None, model_repository=repo, model="tiny-rce", clean=500, mixed=1000,
                   shift_share=0.3, window=400, rate=400.0)  # fmt: skip


@dataclass
class Phase:
    name: str
    requests: int = 0
    refused: int = 0
    max_z: float = float("-inf")  # the test's z over the phase, once N p0 >= 10
    test_crossed_at: int | None = None  # requests into the phase when z first exceeded 4
    alert_fired_at: int | None = None  # requests into the phase when Prometheus said firing
    psi: dict[str, float] = field(default_factory=dict)  # exported at the end of the phase
    window_refuse_rate: float = 0.0
    seconds: float = 0.0


@dataclass
class ReplayResult:
    date: str
    machine: str
    model: str
    p0: float
    n0: int
    window: int
    shift_share: float
    prometheus: bool
    phases: list[Phase]


# -- data ---------------------------------------------------------------------------------------


def _images(cfg: ReplayConfig) -> tuple[np.ndarray, np.ndarray]:
    """(clean pool, shifted pool), uint8 (N, 28, 28)."""
    if cfg.data_dir is None:
        from training.data import synthetic

        clean = synthetic(2000, seed=5).x.numpy()[:, 0]
        shifted = np.random.default_rng(cfg.seed).random((2000, 28, 28))
    else:
        from training.data import load

        clean = load("mnist", cfg.data_dir, train=False).x.numpy()[:, 0]
        shifted = load("fashion-mnist", cfg.data_dir, train=False).x.numpy()[:, 0]
    return (np.rint(clean * 255).astype(np.uint8), np.rint(shifted * 255).astype(np.uint8))


def _stream(cfg: ReplayConfig, clean: np.ndarray, shifted: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Phase 1 and phase 2 images in sending order."""
    rng = np.random.default_rng(cfg.seed)
    phase1 = clean[rng.permutation(len(clean))[: cfg.clean] % len(clean)]
    idx = rng.integers(0, len(clean), cfg.mixed)
    phase2 = clean[idx]
    swap = rng.random(cfg.mixed) < cfg.shift_share
    phase2[swap] = shifted[rng.integers(0, len(shifted), int(swap.sum()))]
    return phase1, phase2


# -- Prometheus ---------------------------------------------------------------------------------


class Prometheus:
    """Debian's prometheus with deploy/prometheus's config and rules, scraping every second."""

    def __init__(self, workdir: Path, service_port: int) -> None:
        self.port = free_port()
        config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
        config["scrape_configs"] = [{"job_name": "notsure", "static_configs": [
            {"targets": [f"127.0.0.1:{service_port}"]}]}]  # fmt: skip
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed: apt-get install prometheus")
        self.argv = [binary, f"--config.file={workdir / 'prometheus.yml'}",
                     f"--storage.tsdb.path={workdir / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]  # fmt: skip
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).is_success:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"prometheus not ready:\n{self.log.read_text()[-2000:]}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)

    def firing(self, model: str) -> bool:
        r = httpx.get(f"http://127.0.0.1:{self.port}/api/v1/alerts", timeout=5).json()
        return any(a["labels"].get("alertname") == ALERT and a["labels"].get("model") == model
                   and a["state"] == "firing" for a in r["data"]["alerts"])  # fmt: skip

    def evaluated(self, expr: str) -> bool:
        r = httpx.get(f"http://127.0.0.1:{self.port}/api/v1/query", params={"query": expr},
                      timeout=5).json()  # fmt: skip
        return bool(r["data"]["result"])


class AlertWatch:
    """Polls the alert every 0.25 s in a thread; remembers the request count when it fired."""

    def __init__(self, prom: Prometheus, model: str) -> None:
        self.prom, self.model = prom, model
        self.sent = 0  # requests of the current phase so far (set by the sender)
        self.fired_at: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            if self.fired_at is None and self.prom.firing(self.model):
                self.fired_at = self.sent

    def __enter__(self) -> AlertWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# -- the replay ---------------------------------------------------------------------------------


def _gauges(url: str, model: str) -> dict[str, Any]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, Any] = {"psi": {}}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("model") != model:
                continue
            if s.name == "notsure_score_drift_psi":
                out["psi"][s.labels["score"]] = round(s.value, 4)
            elif s.name in ("notsure_window_images", "notsure_window_not_sure"):
                out[s.name] = s.value
    return out


def _send(client: httpx.Client, url: str, model: str, image: np.ndarray) -> bool:
    """One image; True when it was answered NOT SURE."""
    r = client.post(f"{url}/v1/models/{model}/predict", json={"instances": [image.tolist()]})
    r.raise_for_status()
    return bool(r.json()["predictions"][0]["decision"] == "not_sure")


def _phase(name: str, images: np.ndarray, cfg: ReplayConfig, client: httpx.Client, url: str,
           window: list[bool], p0: float, n0: int, watch: AlertWatch | None) -> Phase:  # fmt: skip
    ph = Phase(name)
    if watch is not None:
        watch.sent, watch.fired_at = 0, None
    start, gap = time.monotonic(), 1.0 / cfg.rate
    stop_at = len(images)
    for i, image in enumerate(images):
        if i >= stop_at:
            break
        due = start + i * gap
        if (wait := due - time.monotonic()) > 0:
            time.sleep(wait)
        refused = _send(client, url, cfg.model, image)
        ph.requests, ph.refused = i + 1, ph.refused + refused
        window.append(refused)
        del window[: -cfg.window]
        n, k = len(window), sum(window)
        if n * p0 >= MIN_EXPECTED:
            z = refuse_excess_z(k, n, p0, n0)
            ph.max_z = max(ph.max_z, z)
            if z > Z_ALERT and ph.test_crossed_at is None:
                ph.test_crossed_at = i + 1
        if watch is not None:
            watch.sent = i + 1
            if watch.fired_at is not None and ph.alert_fired_at is None:
                ph.alert_fired_at = watch.fired_at
                stop_at = min(stop_at, i + 1 + cfg.window)  # a full window of the mix, then stop
        elif ph.test_crossed_at is not None and name == "mixed":
            stop_at = min(stop_at, ph.test_crossed_at + cfg.window)
    time.sleep(2.5)  # the monitor refreshes every second: let it see the last requests
    if watch is not None and ph.alert_fired_at is None and ph.test_crossed_at is not None:
        # The phase sent everything before Prometheus's scrape and rule intervals caught up (a
        # short phase on a busy machine): the window still holds the mix, so the alert is due.
        deadline = time.monotonic() + ALERT_GRACE_S
        while watch.fired_at is None and time.monotonic() < deadline:
            time.sleep(0.25)
        ph.alert_fired_at = watch.fired_at
    g = _gauges(url, cfg.model)
    ph.psi = g["psi"]
    ph.window_refuse_rate = round(g.get("notsure_window_not_sure", 0) /
                                  max(g.get("notsure_window_images", 1), 1), 4)  # fmt: skip
    ph.seconds = round(time.monotonic() - start, 1)
    return ph


def replay(cfg: ReplayConfig) -> ReplayResult:
    """Run both phases against a fresh service (and Prometheus); the measured result."""
    manifest = Manifest.load(cfg.model_repository / cfg.model / "1" / MANIFEST_FILE)
    ref = manifest.reference
    if ref is None:
        raise ValueError(f"{cfg.model}'s manifest has no score_references: run notsure calibrate")
    clean, shifted = _images(cfg)
    phase1, phase2 = _stream(cfg, clean, shifted)
    settings = {"NOTSURE_MODELS": cfg.model, "NOTSURE_MONITOR_WINDOW": str(cfg.window),
                "NOTSURE_GRPC_ENABLED": "false"}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="notsure-replay-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        server = stack.enter_context(ServeProcess(cfg.model_repository, work / "serve.log",
                                                  settings))  # fmt: skip
        watch = None
        if cfg.prometheus:
            prom = stack.enter_context(Prometheus(work, server.port))
            # The rules see the service before the replay starts.
            _wait(lambda: prom.evaluated("model_version:notsure_calibrated_refuse_rate:max"))
            watch = stack.enter_context(AlertWatch(prom, cfg.model))
        window: list[bool] = []
        client = stack.enter_context(httpx.Client(timeout=30))
        phases = [
            _phase(name, images, cfg, client, server.url, window, ref.refuse_rate, ref.n, watch)
            for name, images in (("clean", phase1), ("mixed", phase2))
        ]
    return ReplayResult(
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=f"{platform.node()}: {platform.processor() or platform.machine()}, "
        "2-core CPU, no GPU (CPU figures)",
        model=cfg.model, p0=ref.refuse_rate, n0=ref.n, window=cfg.window,
        shift_share=cfg.shift_share, prometheus=cfg.prometheus, phases=phases,
    )  # fmt: skip


def _wait(probe: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            raise RuntimeError("Prometheus did not evaluate the rules in time")
        time.sleep(0.5)


def report(result: ReplayResult) -> str:
    """The result as a Markdown table."""
    lines = [f"Live replay, {result.date}, {result.machine}.", "",
             f"Model `{result.model}`, p0 = {result.p0:.4f} (n0 = {result.n0}), window "
             f"{result.window} answers, {result.shift_share:.0%} shifted images in phase 2, "
             f"Prometheus {'on' if result.prometheus else 'off'}.", "",
             "| phase | requests | refused | max z | test z > 4 after | alert firing after "
             "| window refuse rate | PSI (j_score / confidence / energy) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in result.phases:
        psi = " / ".join(f"{p.psi.get(s, float('nan')):.3f}" for s in
                         ("j_score", "confidence", "energy"))  # fmt: skip
        lines.append(
            f"| {p.name} | {p.requests:,} | {p.refused:,} | {p.max_z:.2f} "
            f"| {p.test_crossed_at or 'never'} | {p.alert_fired_at or 'never'} "
            f"| {p.window_refuse_rate:.2%} | {psi} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--model-repository", type=Path, default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--clean", type=int, default=None)
    p.add_argument("--mixed", type=int, default=None)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--rate", type=float, default=None)
    p.add_argument("--no-prometheus", dest="prometheus", action="store_false", default=None)
    p.add_argument("--out", type=Path, default=None, help="writes OUT.json and OUT.md")
    p.add_argument("--dry-run", action="store_true", help="tiny models, synthetic data")
    a = vars(p.parse_args())
    dry = a.pop("dry_run")
    given = {k: v for k, v in a.items() if v is not None}
    if dry:
        from training.tiny import tiny_repo

        work = Path(tempfile.mkdtemp(prefix="notsure-replay-tiny-"))
        base = ReplayConfig.tiny(tiny_repo(work / "models", work / "runs"))
        cfg = replace(base, **{k: v for k, v in given.items() if k != "model_repository"})
    else:
        cfg = replace(ReplayConfig(), **given)
    result = replay(cfg)
    text = report(result)
    if cfg.out is not None:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.with_suffix(".json").write_text(json.dumps(asdict(result), indent=2) + "\n")
        cfg.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
