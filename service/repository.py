"""The model repository: `<root>/<name>/<version>/{model.onnx, manifest.json}`.

Each version is verified before it serves: the manifest parses, its name/version match the
folder, model.onnx has the manifest's sha256, and the graph's input and output shapes match the
manifest. A version that fails stays listed with its error, and readiness reports it.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from service.batching import INLINE_MAX_IMAGES, ArrivalTracker, Batcher, note_inferred
from service.config import Settings
from service.errors import InferenceFailed, ModelNotFound, ModelNotReady
from service.kdensity import KernelSet, read_kernel_array
from service.manifest import MANIFEST_FILE, MODEL_FILE, Manifest
from service.metrics import BatchMetrics, Metrics
from service.runtime import CPU, OnnxModel
from service.scoring import Kernel, ScoreName, Scores, score_logits
from service.thresholds import configured_threshold

log = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """A model version that cannot serve; the message says why, without file paths."""


@dataclass(eq=False)
class LoadedModel:
    """A version that loaded and serves: its verified manifest, sessions and batcher."""

    name: str
    version: int
    manifest: Manifest
    model: OnnxModel
    # The same graph on every core, for batches that run alone (None: not worth it).
    wide_model: OnnxModel | None
    kernel: Kernel
    kernel_set: KernelSet | None  # K-density's training features, when the model has one
    threshold: float  # T in force unless a request brings its own (`service.thresholds`)
    batcher: Batcher[Scores] = field(init=False)

    @property
    def score(self) -> ScoreName:
        """The score T applies to."""
        return self.manifest.score

    def infer(self, x: np.ndarray, sizes: list[int]) -> list[Scores]:
        """Run one batch (in a worker thread) and split the scores per request."""
        return self._infer(self.model, x, sizes)

    def infer_alone(self, x: np.ndarray, sizes: list[int]) -> list[Scores]:
        """`infer` on the every-core session: for a batch that has the machine to itself."""
        assert self.wide_model is not None  # only called when the batcher was given it
        return self._infer(self.wide_model, x, sizes)

    def _infer(self, model: OnnxModel, x: np.ndarray, sizes: list[int]) -> list[Scores]:
        logits, feats = model.run_with_features(x) if self.kernel_set else (model.run(x), None)
        note_inferred()  # for tracing: what follows is scoring
        if logits.shape[0] != x.shape[0] or (feats is not None and feats.shape[0] != x.shape[0]):
            raise InferenceFailed(f"model returned {logits.shape[0]} rows for {x.shape[0]} images")
        scores = score_logits(logits, self.kernel, self.score, feats, self.kernel_set)
        bounds = [0, *itertools.accumulate(sizes)]
        return [scores.rows(a, b) for a, b in itertools.pairwise(bounds)]


@dataclass(eq=False)
class ModelVersion:
    """One version found in the repository and how its load went: `loaded` when it serves,
    else `error` says why not."""

    name: str
    version: int
    path: Path
    manifest: Manifest | None = None  # once it parsed, even if the version failed later
    loaded: LoadedModel | None = None
    error: str | None = None

    @property
    def ready(self) -> bool:
        return self.loaded is not None and self.error is None


def _check_graph(manifest: Manifest, model: OnnxModel) -> None:
    sig = model.signature
    want_in = manifest.input_shape
    got_in = tuple(sig.input_shape[1:])
    if len(sig.input_shape) != 4 or got_in != want_in:
        raise ModelLoadError(
            f"graph input {list(sig.input_shape)} does not match the manifest's "
            f"input_shape {list(want_in)}"
        )
    if len(sig.output_shape) != 2 or sig.output_shape[1] != manifest.num_classes:
        raise ModelLoadError(
            f"graph output {list(sig.output_shape)} does not have the manifest's "
            f"{manifest.num_classes} classes"
        )


def _check_features(manifest: Manifest, model: OnnxModel) -> None:
    """A manifest with a K-density kernel set needs the graph's features output to match it."""
    kd = manifest.k_density
    feats = model.signature.features_shape
    if kd is not None and (feats is None or len(feats) != 2 or feats[1] != kd.dim):
        raise ModelLoadError(
            f"the manifest names a K-density kernel set of dimension {kd.dim}, but the graph "
            f"has {'no features output' if feats is None else f'features {list(feats)}'}; "
            "re-export the model with `notsure export`"
        )


def read_kernel_set(manifest: Manifest, folder: Path) -> KernelSet | None:
    """The K-density kernel set the manifest names, checked against its sha256 and shape; None
    when it names none. Raises ModelLoadError."""
    kd = manifest.k_density
    if kd is None:
        return None
    path = folder / kd.file
    if path.name != kd.file or not path.is_file():
        raise ModelLoadError(f"the kernel set file {kd.file!r} is missing")
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != kd.sha256:
        raise ModelLoadError(f"{kd.file} does not match the manifest's sha256; refusing it")
    try:
        arr = read_kernel_array(raw)  # the verified bytes, parsed without any pickle loader
    except ValueError as exc:
        raise ModelLoadError(f"{kd.file}: {exc}") from exc
    want = (manifest.num_classes, kd.per_class, kd.dim)
    if arr.shape != want:
        raise ModelLoadError(f"{kd.file} holds {list(arr.shape)}, expected {list(want)}")
    return KernelSet(features=arr, sigma2=kd.sigma2)


def scan(root: Path) -> list[tuple[str, int, Path]]:
    """(name, version, folder) for every `<name>/<int>/` under root, sorted."""
    found = []
    if root.is_dir():
        for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for vdir in model_dir.iterdir():
                if vdir.is_dir() and vdir.name.isdigit() and int(vdir.name) > 0:
                    found.append((model_dir.name, int(vdir.name), vdir))
    return sorted(found)


class Repository:
    """Loads every model version once and hands out ready ones by name and version."""

    def __init__(
        self, settings: Settings, metrics: Metrics, executor: Executor, arrivals: ArrivalTracker
    ) -> None:
        self.settings, self.metrics = settings, metrics
        self._executor, self._arrivals = executor, arrivals
        self.versions: dict[str, dict[int, ModelVersion]] = {}

    def load_all(self) -> None:
        wanted = set(self.settings.models)
        for name, version, path in scan(self.settings.model_repository):
            if wanted and name not in wanted:
                continue
            mv = ModelVersion(name, version, path)
            self.versions.setdefault(name, {})[version] = mv
            try:
                self._load(mv)
            except ModelLoadError as exc:
                mv.error = str(exc)
            except Exception as exc:  # onnxruntime and friends raise many types
                mv.error = f"{type(exc).__name__}: failed to load"
                log.exception("model %s/%d failed to load", name, version)
            self.metrics.model_ready.labels(name, str(version)).set(1 if mv.ready else 0)
            if mv.error:
                log.error("model %s version %d NOT loaded: %s", name, version, mv.error)
        if not self.versions:
            log.error("no models found in %s", self.settings.model_repository)

    def _load(self, mv: ModelVersion) -> None:
        try:
            manifest = Manifest.load(mv.path / MANIFEST_FILE)
        except FileNotFoundError as exc:
            raise ModelLoadError("manifest.json is missing") from exc
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"]))
            raise ModelLoadError(f"manifest.json is invalid at {where}: {first['msg']}") from exc
        mv.manifest = manifest
        if (manifest.name, manifest.version) != (mv.name, mv.version):
            raise ModelLoadError(
                f"manifest says {manifest.name}/{manifest.version}, folder is "
                f"{mv.name}/{mv.version}"
            )
        onnx_path = mv.path / MODEL_FILE
        if not onnx_path.is_file():
            raise ModelLoadError("model.onnx is missing")
        # Read once, hash those bytes and hand the same bytes to onnxruntime: nothing can swap
        # the file between the check and the load.
        graph = onnx_path.read_bytes()
        if hashlib.sha256(graph).hexdigest() != manifest.sha256:
            raise ModelLoadError(
                "model.onnx does not match the manifest's sha256 (corrupt or "
                "replaced); refusing to load it"
            )
        model = OnnxModel(
            graph, device=self.settings.device, intra_op_threads=self.settings.intra_threads()
        )
        _check_graph(manifest, model)
        _check_features(manifest, model)
        kernel_set = read_kernel_set(manifest, mv.path)
        wide_threads = self.settings.lone_batch_threads() if model.provider == CPU else 0
        wide = (
            OnnxModel(graph, device="cpu", intra_op_threads=wide_threads) if wide_threads else None
        )
        cfg = self.settings.batching_for(mv.name)
        for m in filter(None, (model, wide)):
            for n in sorted({1, cfg.max_batch_size}):  # warm-up: first runs allocate and plan
                x = np.zeros((n, *manifest.input_shape), np.float32)
                # The same call serving makes: with a kernel set, logits and features together
                # (a run that fetches other outputs is planned and allocated anew).
                if kernel_set is not None:
                    m.run_with_features(x)
                else:
                    m.run(x)
        try:
            threshold = configured_threshold(self.settings, mv.name, mv.version, manifest)
        except ValueError as exc:
            raise ModelLoadError(f"configured {exc}") from exc
        lm = LoadedModel(
            mv.name, mv.version, manifest, model, wide, manifest.kernel.to_kernel(), kernel_set,
            threshold,
        )  # fmt: skip
        labels = (mv.name, str(mv.version))
        lm.batcher = Batcher(
            lm.infer,
            self._executor,
            max_batch=cfg.max_batch_size if self.settings.batching else 1,
            max_delay_s=cfg.max_queue_delay_ms / 1000.0 if self.settings.batching else 0.0,
            max_queue_images=self.settings.max_queue_images,
            slots=self.settings.inference_threads,
            retry_after_s=self.settings.retry_after_s,
            observer=BatchMetrics(self.metrics, *labels),
            arrivals=self._arrivals,
            run_alone=lm.infer_alone if wide is not None else None,
            inline_max_images=INLINE_MAX_IMAGES,
        )
        mv.loaded = lm
        # Both decision series exist from load on, so a refuse rate reads 0 before the first
        # refusal instead of "no data".
        for decision in ("accepted", "not_sure"):
            self.metrics.predictions.labels(*labels, decision)
        self.metrics.model_info.labels(
            *labels,
            model.provider,
            manifest.objective,
            manifest.architecture,
            manifest.score,
        ).set(1)
        log.info(
            "model %s version %d ready on %s (%s >= %.4g, %s, max batch %d, %d x %d threads%s)",
            mv.name,
            mv.version,
            model.provider,
            manifest.score,
            lm.threshold,
            manifest.objective,
            cfg.max_batch_size,
            self.settings.inference_threads,
            self.settings.intra_threads(),
            f", {wide_threads} for a lone batch" if wide_threads else "",
        )

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        """A ready version; the highest ready one when version is None."""
        versions = self.versions.get(name)
        if not versions:
            raise ModelNotFound(
                f"no model named {name!r}",
                field="name",
                fix=f"use one of: {', '.join(sorted(self.versions)) or 'none'}",
            )
        if version is None:
            ready = [v.loaded for v in versions.values() if v.ready and v.loaded is not None]
            if not ready:
                raise ModelNotReady(f"model {name!r} has no ready version")
            return max(ready, key=lambda v: v.version)
        mv = versions.get(version)
        if mv is None:
            raise ModelNotFound(
                f"model {name!r} has no version {version}",
                field="version",
                fix=f"use one of: {', '.join(map(str, sorted(versions)))}",
            )
        if not mv.ready or mv.loaded is None:
            raise ModelNotReady(f"model {name!r} version {version} is not ready: {mv.error}")
        return mv.loaded

    def all(self) -> list[ModelVersion]:
        return [mv for vs in self.versions.values() for mv in vs.values()]

    @property
    def ready(self) -> bool:
        return bool(self.versions) and all(mv.ready for mv in self.all())

    async def close(self) -> None:
        for mv in self.all():
            if mv.loaded is not None:
                await mv.loaded.batcher.close()
