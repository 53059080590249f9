"""Triton's model configuration and statistics extensions of the Open Inference Protocol, built
once for both transports.

`model_config` is the JSON form of Triton's `ModelConfig` message (model_config.proto) that
`GET /v2/models/{name}[/versions/{v}]/config` answers; the gRPC `ModelConfig` method parses the
same dict into the message (`as_message`), so the two cannot differ. Likewise
`model_statistics` for `GET /v2/models[/{name}[/versions/{v}]]/stats` and `ModelStatistics`.
Clients such as Triton's perf_analyzer read both: the batch axis from `max_batch_size`, the
scheduler from `dynamic_batching`, and the counters to tell queueing from computing.
"""

from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from service import v2infer
from service.call import Call
from service.config import Settings
from service.inference import resolve
from service.manifest import MODEL_FILE
from service.runner import LoadedModel, max_batch_size
from service.runtime import CUDA
from service.state import AppState
from service.stats import BATCH_STEPS, Duration

BACKEND = "onnxruntime"
# Response cache steps: notsure keeps no cache, but clients (perf_analyzer) read them always.
_NO_CACHE = {"cache_hit": {"count": 0, "ns": 0}, "cache_miss": {"count": 0, "ns": 0}}
M = TypeVar("M", bound=Message)


def as_message(data: dict[str, Any], message: M) -> M:
    """The protobuf message (for gRPC) of the JSON that HTTP answers."""
    json_format.ParseDict(data, message)
    return message


# -- model configuration ---------------------------------------------------------------------


def _tensor(t: dict[str, Any]) -> dict[str, Any]:
    """A tensor of the metadata as the configuration writes it: dims without the batch axis.
    A tensor of one value per image (shape [batch]) is Triton's dims [1] reshaped to []."""
    dims = t["shape"][1:]
    out: dict[str, Any] = {"name": t["name"], "data_type": f"TYPE_{t['datatype']}"}
    out["dims"] = dims or [1]
    if not dims:
        out["reshape"] = {"shape": []}
    return out


def _parameters(model: LoadedModel) -> list[tuple[str, str]]:
    """notsure's own, as Triton's parameters (strings): T in force on `score` (accepted iff
    score >= T), whether T was calibrated on held-out data and, for a model with a bound graph,
    the radius each answer is certified on and whether a decision requires the certificate."""
    m = model.manifest
    out = [("threshold", repr(model.threshold)), ("score", model.score),
           ("calibrated", _bool(m.calibrated))]  # fmt: skip
    if model.certifier is not None:
        out += [("certify_eps", repr(m.certify_eps)),
                ("certificate_required", _bool(m.certify_required))]  # fmt: skip
    return out


def _bool(value: bool) -> str:
    return "true" if value else "false"


def model_config(model: LoadedModel, settings: Settings) -> dict[str, Any]:
    """The version's configuration in Triton's terms (the JSON of model_config.proto)."""
    inputs, outputs = v2infer.tensors(model)
    max_batch = max_batch_size(settings, model.name, model.manifest)
    config: dict[str, Any] = {
        "name": model.name,
        "platform": v2infer.PLATFORM,
        "backend": BACKEND,
        # Every version in the repository serves; a request without one gets the highest.
        "version_policy": {"all": {}},
        # Every tensor's first axis is the batch (dims leave it out). Batches hold at most this
        # many images (a fixed-batch graph's batch at most); one request may carry up to the
        # max_instances setting, and a request above this runs as a batch of its own.
        "max_batch_size": max_batch,
        "input": [
            {**_tensor(t), "format": "FORMAT_NCHW", "is_shape_tensor": False, "optional": False}
            for t in inputs
        ],
        "output": [{**_tensor(t), "is_shape_tensor": False} for t in outputs],
        # Batches of one version run `inference_threads` at a time, each on its own session
        # share of the cores (or the GPU).
        "instance_group": [
            {
                "name": model.name,
                "kind": "KIND_GPU" if model.provider == CUDA else "KIND_CPU",
                "count": settings.inference_threads,
            }
        ],
        "default_model_filename": MODEL_FILE,
        "parameters": {key: {"string_value": value} for key, value in _parameters(model)},
        "model_transaction_policy": {"decoupled": False},  # one response per request
    }
    if settings.batching:
        delay_ms = settings.batching_for(model.name).max_queue_delay_ms
        config["dynamic_batching"] = {
            # The batcher runs a batch as soon as it holds this many images; it waits up to
            # the delay only while more requests are on their way (service.batch_plan.plan).
            "preferred_batch_size": [max_batch],
            "max_queue_delay_microseconds": round(delay_ms * 1000),
        }
    return config


# -- statistics --------------------------------------------------------------------------------


def stats_versions(
    state: AppState, call: Call, name: str | None, version: int | None
) -> list[LoadedModel]:
    """The ready versions a statistics request names: all of every model (no name), all of one
    model (no version; unknown or unready answer as model metadata does), or one."""
    if not name:
        found = state.repository.all()
    else:
        model = resolve(state, call, name, version)
        if version is not None:
            return [model]
        found = list(state.repository.versions[name].values())
    loaded = (v.loaded for v in found if v.loaded is not None)
    return sorted(loaded, key=lambda m: (m.name, m.version))


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def _model_stat(model: LoadedModel) -> dict[str, Any]:
    snap = model.stats.snapshot()
    return {
        "name": model.name,
        "version": str(model.version),
        "last_inference": snap.last_inference_ms,
        "inference_count": snap.inference_count,
        "execution_count": snap.execution_count,
        "inference_stats": {
            **{step: _duration(d) for step, d in snap.steps.items()},
            **_NO_CACHE,
        },
        "batch_stats": [
            {"batch_size": size, **{s: _duration(getattr(b, s)) for s in BATCH_STEPS}}
            for size, b in snap.batches.items()
        ],
        "memory_usage": [],
        "response_stats": {},
    }


def model_statistics(models: list[LoadedModel]) -> dict[str, Any]:
    """The statistics of these versions (the JSON of ModelStatisticsResponse)."""
    return {"model_stats": [_model_stat(m) for m in models]}
