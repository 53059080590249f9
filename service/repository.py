"""The model repository: `<root>/<name>/<version>/{model.onnx, manifest.json}`.

Each version is verified before it serves: the manifest parses, its name/version match the
folder, model.onnx has the manifest's sha256, and the graph's input and output shapes match the
manifest. A version that fails stays listed with its error, and readiness reports it. Changes
while the server runs (load, unload, reload, polling) go through `service.model_control`.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from service.batch_plan import ArrivalTracker
from service.certify import CertifyLoadError, load_certifier
from service.config import Settings
from service.errors import ModelNotFound, ModelNotReady
from service.kdensity import KernelSet, read_kernel_array
from service.manifest import MANIFEST_FILE, MODEL_FILE, Manifest
from service.metrics import Metrics
from service.preprocess import GraphMismatch, ModelIO, check_output
from service.runner import LoadedModel, Scorer, max_batch_size, start_serving
from service.runtime import CPU, OnnxModel
from service.thresholds import configured_threshold

log = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """A model version that cannot serve; the message says why, without file paths."""


# (file name, size, mtime_ns) of each file in a version folder: its files changed when it does.
Fingerprint = tuple[tuple[str, int, int], ...]
State = Literal["READY", "UNAVAILABLE", "LOADING", "UNLOADING"]  # as Triton's repository index


def fingerprint(folder: Path) -> Fingerprint:
    try:
        files = [(p.name, p.stat()) for p in folder.iterdir() if p.is_file()]
    except FileNotFoundError:  # removed meanwhile
        return ()
    return tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in files))


@dataclass(eq=False)
class ModelVersion:
    """One version found in the repository and how its load went: `loaded` when it serves,
    else `error` says why not. A version that serves may have an `error` too: its files
    changed and the new ones were refused (it serves what it loaded before)."""

    name: str
    version: int
    path: Path
    manifest: Manifest | None = None  # once it parsed, even if the version failed later
    loaded: LoadedModel | None = None
    error: str | None = None
    files: Fingerprint = ()  # its folder's files when a load of it was last tried
    change: Literal["LOADING", "UNLOADING"] | None = None  # under way (service.model_control)
    unloaded: bool = False  # on request: readiness no longer waits for it
    late: bool = False  # first found after start-up: its failure leaves readiness alone

    @property
    def ready(self) -> bool:
        return self.loaded is not None

    @property
    def state(self) -> State:
        return self.change or ("READY" if self.loaded is not None else "UNAVAILABLE")

    @property
    def reason(self) -> str:
        """Why it is in its state ("" when it serves as loaded)."""
        if self.error:
            return self.error
        return "unloaded" if self.unloaded else (self.change or "").lower()


def _check_graph(manifest: Manifest, model: OnnxModel) -> None:
    sig = model.signature
    # The input was checked when the session was built with the manifest's ModelIO.
    try:
        check_output(ModelIO.of(manifest), sig.output_name, sig.output_shape, manifest.num_classes)
    except GraphMismatch as exc:
        raise ModelLoadError(str(exc)) from exc


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


def _info_labels(model: LoadedModel) -> tuple[str, ...]:
    """notsure_model_info's labels of a loaded version."""
    m = model.manifest
    return model.name, str(model.version), model.provider, m.objective, m.architecture, m.score


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
            found = ModelVersion(name, version, path, files=fingerprint(path))
            self.versions.setdefault(name, {})[version] = found
            found.loaded = self.try_load(found)
            self.publish(found)
        if not self.versions:
            log.error("no models found in %s", self.settings.model_repository)

    def try_load(self, found: ModelVersion) -> LoadedModel | None:
        """`found` verified and serving (in a worker thread at run time: this takes seconds);
        None, with `found.error` saying why, when it cannot serve."""
        try:
            return self._load(found)
        except ModelLoadError as exc:
            found.error = str(exc)
        except Exception as exc:  # onnxruntime and friends raise many types
            found.error = f"{type(exc).__name__}: failed to load"
            log.exception("model %s/%d failed to load", found.name, found.version)
        log.error("model %s version %d NOT loaded: %s", found.name, found.version, found.error)
        return None

    def publish(self, found: ModelVersion) -> None:
        """Its metrics as it stands now: ready (with its info series) or not."""
        if found.loaded is not None:
            self._announce(found.loaded)
        self.metrics.model_ready.labels(found.name, str(found.version)).set(int(found.ready))

    def _load(self, found: ModelVersion) -> LoadedModel:
        """Verify the version's files and start serving it; its manifest is noted on `found`
        as soon as it parses. Raises ModelLoadError."""
        try:
            manifest = Manifest.load(found.path / MANIFEST_FILE)
        except FileNotFoundError as exc:
            raise ModelLoadError("manifest.json is missing") from exc
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"]))
            raise ModelLoadError(f"manifest.json is invalid at {where}: {first['msg']}") from exc
        found.manifest = manifest
        if (manifest.name, manifest.version) != (found.name, found.version):
            raise ModelLoadError(
                f"manifest says {manifest.name}/{manifest.version}, folder is "
                f"{found.name}/{found.version}"
            )
        onnx_path = found.path / MODEL_FILE
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
        io = ModelIO.of(manifest)  # normalisation, output kind, fixed batch
        try:
            model = OnnxModel(graph, self.settings.device, self.settings.intra_threads(), io)
        except GraphMismatch as exc:
            raise ModelLoadError(str(exc)) from exc
        _check_graph(manifest, model)
        _check_features(manifest, model)
        kernel_set = read_kernel_set(manifest, found.path)
        kernel, score = manifest.kernel.to_kernel(), manifest.score
        device, threads = self.settings.device, self.settings.intra_threads()
        try:
            certifier = load_certifier(manifest, found.path, device, threads)
        except CertifyLoadError as exc:
            raise ModelLoadError(str(exc)) from exc
        scorer = Scorer(model, kernel, score, kernel_set, certifier)
        lone_threads = self.settings.lone_batch_threads() if model.provider == CPU else 0
        lone = None
        if lone_threads:
            lone_cert = certifier and load_certifier(manifest, found.path, "cpu", lone_threads)
            lone_model = OnnxModel(graph, "cpu", lone_threads, io)
            lone = Scorer(lone_model, kernel, score, kernel_set, lone_cert)
        batch_sizes = (1, max_batch_size(self.settings, found.name, manifest))
        for s in filter(None, (scorer, lone)):
            s.warm_up(manifest.input_shape, batch_sizes)
        try:
            threshold = configured_threshold(self.settings, found.name, found.version, manifest)
        except ValueError as exc:
            raise ModelLoadError(f"configured {exc}") from exc
        return start_serving(
            found.name, found.version, manifest, threshold, scorer, lone,
            settings=self.settings, metrics=self.metrics, executor=self._executor,
            arrivals=self._arrivals,
        )  # fmt: skip

    def _announce(self, model: LoadedModel) -> None:
        """The metrics series and the log line of a version that is ready."""
        m, labels = model.manifest, (model.name, str(model.version))
        # Both decision series exist from load on, so a refuse rate reads 0 before the first
        # refusal instead of "no data".
        for decision in ("accepted", "not_sure"):
            self.metrics.predictions.labels(*labels, decision)
        if model.certifier is not None:
            for certified in ("true", "false"):
                self.metrics.certificates.labels(*labels, certified)
        self.metrics.model_info.labels(*_info_labels(model)).set(1)
        s, lone = self.settings, model.lone_scorer
        log.info(
            "model %s version %d ready on %s (%s >= %.4g, %s, max batch %d, %d x %d threads%s)",
            model.name, model.version, model.provider, m.score, model.threshold, m.objective,
            s.batching_for(model.name).max_batch_size, s.inference_threads, s.intra_threads(),
            f", {s.lone_batch_threads()} for a lone batch" if lone else "",
        )  # fmt: skip

    def retract(self, model: LoadedModel) -> None:
        """Drop the info series of a version whose files no longer serve (replaced, unloaded)."""
        self.metrics.model_info.remove(*_info_labels(model))

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
            ready = [v.loaded for v in versions.values() if v.loaded is not None]
            if not ready:
                raise ModelNotReady(f"model {name!r} has no ready version")
            return max(ready, key=lambda v: v.version)
        found = versions.get(version)
        if found is None:
            raise ModelNotFound(
                f"model {name!r} has no version {version}",
                field="version",
                fix=f"use one of: {', '.join(map(str, sorted(versions)))}",
            )
        if found.loaded is None:
            why = found.reason or "not loaded"
            raise ModelNotReady(f"model {name!r} version {version} is not ready: {why}")
        return found.loaded

    def all(self) -> list[ModelVersion]:
        return [found for vs in self.versions.values() for found in vs.values()]

    @property
    def ready(self) -> bool:
        """Every version found at start-up serves (and is not unloaded on request)."""
        return bool(self.versions) and all(f.ready for f in self.all() if not f.unloaded | f.late)

    async def close(self) -> None:
        for found in self.all():
            if found.loaded is not None:
                await found.loaded.batcher.close()
