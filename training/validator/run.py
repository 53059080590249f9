"""`notsure attack`, the classic validator: craft adversarial images white-box (FGSM, BIM, PGD,
ILLC), score clean + adversarial via the service.

For each model the mixed set of the paper (Section 4.3) is built: the first N test images and,
for every cost and eps, their N adversarial versions. All of them are sent to the service (or,
offline, to the same ONNX graph) and what comes back is recorded as is. Each (model, cost, eps)
result is cached on disk as soon as it is complete, so an interrupted run resumes where it
stopped; the FGSM direction sign(grad J) does not depend on eps and is cached once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from service.manifest import Manifest
from training import data as data_mod
from training.attacks.classic import AttackConfig, Cost, LabelSource, Method, attack, attack_targets
from training.attacks.classic import fgsm_direction as _fgsm_direction
from training.clients import Decisions, GrpcClient, V2Client, target_of
from training.modelio import load_torch_model, model_version_dir, test_images
from training.progress import progress_bar
from training.tiny import TINY_MODELS, tiny_repo
from training.train import pick_device
from training.validator.scorers import OfflineScorer, score_all

log = logging.getLogger(__name__)
EXAMPLES = 8  # images per (cost, eps) kept for the report's picture


@dataclass(frozen=True)
class AttackRunConfig:
    models: tuple[str, ...] = ("mnist-resnet32-rce",)
    eps: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
    costs: tuple[Cost, ...] = ("ce",)
    labels: LabelSource = "true"
    method: Method = "fgsm"
    steps: int = 10  # iterative methods only
    n: int = 1000
    url: str = "http://127.0.0.1:8000"
    protocol: Literal["http", "grpc"] = "http"  # KServe V2 over HTTP or gRPC (port 8001)
    offline: bool = False  # score with the ONNX file in-process instead of the service
    models_dir: Path = Path("models")
    data_dir: Path = Path("data")
    out_dir: Path = Path("runs/attack")
    cache_dir: Path | None = None  # default: runs/attack-cache (dry runs: out_dir / "cache")
    request_batch: int = 256
    attack_batch: int = 250
    timeout_s: float = 60.0
    retries: int = 3
    api_key: str | None = None
    device: str = "auto"
    threads: int = 0  # torch and onnxruntime threads (0: their defaults)
    dry_run: bool = False  # the tiny synthetic models (see `tiny`), built on first use

    @classmethod
    def tiny(cls, **overrides: object) -> AttackRunConfig:
        """The dry run: both tiny synthetic models, scored offline, 64 images, two budgets."""
        base = cls(models=TINY_MODELS, offline=True, n=64, eps=(0.05, 0.1), dry_run=True)
        return replace(base, **overrides)  # type: ignore[arg-type]


@dataclass
class ModelRecord:
    """Everything measured on one model; decisions are as the service returned them."""

    name: str
    version: int
    manifest: Manifest
    y: np.ndarray  # (N,) true labels
    clean: Decisions
    adv: dict[tuple[str, float], Decisions] = field(default_factory=dict)
    examples: dict[str, np.ndarray] = field(default_factory=dict)  # "clean", "ce@0.1", ...
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AttackRun:
    cfg: AttackRunConfig
    source: str  # the service URL or "offline"
    records: list[ModelRecord]
    wall_time_s: float = 0.0  # this invocation, cached parts excluded


def effective(cfg: AttackRunConfig) -> AttackRunConfig:
    """A dry run of the tiny models attacks them from out_dir, where they are built on first
    use."""
    if not cfg.dry_run or not set(cfg.models) <= set(TINY_MODELS):
        return cfg
    root = tiny_repo(cfg.out_dir / "dry-run-models", cfg.out_dir / "dry-run-runs")
    return replace(cfg, models_dir=root)


def cache_root(cfg: AttackRunConfig) -> Path:
    """Where results are cached; file names carry a hash of all they depend on, so runs with
    different settings can share the folder (kept out of the report folder, which is committed)."""
    if cfg.cache_dir is not None:
        return cfg.cache_dir
    return cfg.out_dir / "cache" if cfg.dry_run else Path("runs/attack-cache")


def cached(path: Path, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Load the arrays at `path` if a complete file is there, else compute and store them.

    The file name carries a hash of everything the result depends on, so a changed model, N,
    attack or scorer never reads a stale result; writes go through a temporary file so that an
    interrupted run leaves no half-written cache.
    """
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            log.debug("cached: %s", path)
            return {k: f[k] for k in f.files}
    arrays = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return arrays


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def run_model(cfg: AttackRunConfig, name: str, source: str) -> ModelRecord:
    """Clean + adversarial decisions for one model, every (cost, eps), resuming from the cache."""
    model_dir = model_version_dir(cfg.models_dir, name)
    device = pick_device(cfg.device)
    net, manifest = load_torch_model(model_dir, device)
    cache = cache_root(cfg) / f"{name}-v{manifest.version}"
    ds = test_images(manifest, cfg.data_dir, cfg.n)
    x_np = ds.x.numpy()
    scorer: OfflineScorer | V2Client | GrpcClient
    if cfg.offline:
        scorer = OfflineScorer(model_dir, manifest, cfg.threads)
    else:
        client = GrpcClient if cfg.protocol == "grpc" else V2Client
        scorer = client(cfg.url, name, manifest.version, cfg.timeout_s, cfg.retries, cfg.api_key)
        scorer.wait_ready(cfg.timeout_s)
    base = (manifest.sha256, cfg.n, manifest.training.dataset if manifest.training else "", source)
    rec_timings: dict[str, float] = {}

    def scored(label: str, x: Callable[[], np.ndarray], key: str) -> tuple[Decisions, np.ndarray]:
        def compute() -> dict[str, np.ndarray]:
            imgs = x()
            t0 = time.perf_counter()
            dec = score_all(scorer, imgs, cfg.request_batch, f"{name} {label}")
            rec_timings[f"score {label} s"] = time.perf_counter() - t0
            return dec.arrays() | {"examples": imgs[:EXAMPLES]}

        arrays = cached(cache / f"{label.replace('@', '-eps')}-{key}.npz", compute)
        return Decisions.from_arrays(arrays), arrays["examples"]

    try:
        clean, clean_ex = scored("clean", lambda: x_np, _key(*base))
        record = ModelRecord(name, manifest.version, manifest, ds.y.numpy(), clean,
                             examples={"clean": clean_ex}, timings=rec_timings)  # fmt: skip
        for cost in cfg.costs:
            for eps in cfg.eps:
                acfg = AttackConfig(method=cfg.method, eps=eps, cost=cost, labels=cfg.labels,
                                    steps=cfg.steps, batch_size=cfg.attack_batch)  # fmt: skip
                key = _key(*base, asdict(acfg))

                def make_adv(acfg: AttackConfig = acfg) -> np.ndarray:
                    t0 = time.perf_counter()
                    adv = _adversarial(net, manifest, ds, acfg, cache, base)
                    rec_timings[f"attack {acfg.cost}@{acfg.eps} s"] = time.perf_counter() - t0
                    return adv

                dec, ex = scored(f"{cost}@{eps:g}", make_adv, key)
                record.adv[(cost, eps)], record.examples[f"{cost}@{eps:g}"] = dec, ex
    finally:
        if not isinstance(scorer, OfflineScorer):
            scorer.close()
    return record


def _adversarial(
    net: torch.nn.Module, manifest: Manifest, ds: data_mod.TensorData, acfg: AttackConfig,
    cache: Path, base: tuple[object, ...],
) -> np.ndarray:  # fmt: skip
    """Adversarial images (N, C, H, W); FGSM reuses one cached sign(grad J) for every eps."""
    if acfg.method != "fgsm":
        with progress_bar(f"{acfg.method} {acfg.cost}@{acfg.eps:g}", total=1) as bar:
            adv = attack(net, manifest.objective, ds.x, ds.y, acfg)
            bar.advance()
        return adv.numpy()
    # The direction depends on the weights, the images and the cost, not on who scores them.
    dkey = _key(*base[:-1], acfg.cost, acfg.labels)

    def direction() -> dict[str, np.ndarray]:
        target = attack_targets(net, manifest.objective, ds.x, ds.y, acfg)
        parts = []
        with progress_bar(f"sign(grad J) {acfg.cost}", total=len(ds)) as bar:
            for i in range(0, len(ds), acfg.batch_size):
                sl = slice(i, i + acfg.batch_size)
                parts.append(_fgsm_direction(net, manifest.objective, ds.x[sl], target[sl], acfg))
                bar.advance(len(parts[-1]))
        return {"sign": torch.cat(parts).to(torch.int8).numpy()}

    sign = cached(cache / f"fgsm-direction-{acfg.cost}-{dkey}.npz", direction)["sign"]
    # Eq. of FGSM: x* = clip(x + eps * sign(grad_x J), 0, 1).
    return np.clip(ds.x.numpy() + np.float32(acfg.eps) * sign.astype(np.float32), 0.0, 1.0)


def run(cfg: AttackRunConfig) -> AttackRun:
    """Score the mixed sets of every model in cfg (see the module docstring)."""
    cfg = effective(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    source = "offline" if cfg.offline else cfg.url
    if not cfg.offline and cfg.protocol == "grpc":
        source = f"grpc://{target_of(cfg.url)}"
    t0 = time.perf_counter()
    records = [run_model(cfg, name, source) for name in cfg.models]
    return AttackRun(cfg, source, records, time.perf_counter() - t0)
