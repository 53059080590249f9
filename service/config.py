"""The one Settings object (environment prefix NOTSURE_). Nothing else reads or writes
os.environ."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class BatchingSettings(BaseSettings):
    """Dynamic batching knobs (per model overrides live in Settings.batching_overrides)."""

    model_config = SettingsConfigDict(frozen=True)

    max_batch_size: int = Field(default=64, ge=1, le=4096)
    max_queue_delay_ms: float = Field(default=2.0, ge=0.0, le=1000.0)


class Settings(BaseSettings):
    """Everything configurable, from NOTSURE_* variables or a .env file."""

    model_config = SettingsConfigDict(env_prefix="NOTSURE_", env_file=None, frozen=True)

    # Where and how to serve.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    model_repository: Path = Path("models")
    # Serve only these model names (empty: every model in the repository). With
    # model_control=explicit: the models loaded at start; the API may load any other.
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # How the served versions may change while the server runs, as Triton's
    # --model-control-mode (service/model_control.py): "none", the repository is read once at
    # start and load/unload requests are refused; "poll", it is rescanned every
    # repository_poll_s (new version folders load, removed ones unload, changed files reload);
    # "explicit", only POST /v2/repository/models/{name}/load|unload (and gRPC) change it.
    model_control: Literal["none", "poll", "explicit"] = "none"
    repository_poll_s: float = Field(default=15.0, gt=0)
    # The model the page at /ui opens on and the README's examples call (`GET /v1/models` names
    # it as `default_model` when it is served; otherwise the page takes the first ready one).
    default_model: str = "mnist-resnet32-rce"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    intra_op_threads: int = Field(
        default=0, ge=0, description="threads per onnxruntime run; 0: cores / inference_threads"
    )
    log_level: str = "info"
    # Inference routes answered without FastAPI's dependency solving (same answers; see
    # service/api/routing.py); off: FastAPI handles them as any other route.
    fast_path: bool = True
    # FastAPI's OpenTelemetry spans/metrics/logs (needs a configured OpenTelemetry SDK).
    opentelemetry: bool = False
    # gRPC (KServe V2 / Open Inference Protocol), in the same process as HTTP
    grpc_enabled: bool = True
    grpc_port: int = 8001
    # Server processes sharing the HTTP and gRPC ports (service/workers.py), for hosts with
    # more cores than one process keeps busy: each loads the models and runs its own batchers
    # on cores / workers of the cores; /metrics adds up all of them.
    workers: int = Field(default=1, ge=1, le=64)
    # Where the workers keep their metrics for /metrics to add up: set by the supervisor.
    metrics_dir: Path | None = None

    # Decisions.
    thresholds: dict[str, float] = Field(
        default_factory=dict, description="per-model T overrides, e.g. {'mnist-resnet32-rce': 0.5}"
    )
    allow_request_threshold: bool = False
    reveal_not_sure_labels: bool = False

    # Dynamic batching and back-pressure.
    batching: bool = True
    max_batch_size: int = Field(default=64, ge=1, le=4096)
    max_queue_delay_ms: float = Field(default=2.0, ge=0.0, le=1000.0)
    batching_overrides: dict[str, BatchingSettings] = Field(default_factory=dict)
    max_queue_images: int = Field(default=4096, ge=1)
    request_timeout_s: float = Field(default=10.0, gt=0)
    retry_after_s: int = Field(default=1, ge=0)
    inference_threads: int = Field(default=2, ge=1, le=64)
    # A batch that starts on a quiet server (no two requests at once for the last 50 ms, see
    # service.batching.QUIET_S) runs on a second session with every core: batch-1 latency 0.6
    # instead of 1.0 ms for ResNet-32 on 2 cores. CPU provider only.
    lone_batch_all_cores: bool = True

    # Slow and idle clients. Each open connection holds a file descriptor and a parser: a few
    # thousand clients that trickle their headers a byte at a time (or open a socket and send
    # nothing) would otherwise stay open for ever and lock everyone else out.
    # Beyond max_connections a new connection is answered 503 and closed at once.
    max_connections: int = Field(default=2048, ge=1)
    # From a connection's first byte of a request (or from its opening) to the end of the
    # request's headers; past it: 408 and close. Real clients send headers in one packet.
    header_timeout_s: float = Field(default=10.0, gt=0)
    # The longest pause between two reads of a request body (not counting pauses the server
    # asks for by stopping reading); past it: 408 and close.
    body_timeout_s: float = Field(default=20.0, gt=0)

    # Request limits.
    max_instances: int = Field(default=256, ge=1)
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    # Decoding runs on the event loop: a 4096x4096 PNG costs ~0.1 s. Classifiers here take
    # 28x28 or 32x32 inputs, so a 1-megapixel ceiling leaves room for resizing without letting
    # one request stall the others.
    max_image_pixels: int = Field(default=1024 * 1024, ge=1)
    # Requests whose encoded images declare more pixels than this in all are decoded in a
    # worker thread; smaller ones on the event loop (cheaper than the hand-off).
    decode_inline_max_pixels: int = Field(default=256 * 256, ge=0)

    # Access.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_keys_file: Path | None = None  # one key a line; re-read when it changes
    protect_metrics: bool = False
    protect_health: bool = False
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Monitoring (service/monitor.py): the last `monitor_window` answered images of each model
    # version are compared with its calibration (refuse rate, score drift); 0 turns it off.
    monitor_window: int = Field(default=1000, ge=0, le=1_000_000)
    monitor_interval_s: float = Field(default=1.0, gt=0)
    # Refused-input records (service/records.py): this share of NOT SURE images is written to
    # record_dir (image and scores). Off (0) by default: the images are what users sent.
    record_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    record_dir: Path = Path("not-sure-records")
    record_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    record_queue: int = Field(default=1024, ge=1)
    # OpenTelemetry spans of the service's own steps (decode, queue wait, inference, scoring)
    # for HTTP and gRPC, children of the caller's trace context (service/tracing.py); needs
    # the opentelemetry-sdk (or another API implementation) configured in the process.
    tracing: bool = False
    # Every request as one JSON line on the notsure.access logger (errors always are).
    access_log: bool = False

    @model_validator(mode="after")
    def _one_process_for_model_control(self) -> Settings:
        # Each worker holds its own copy of the models: a load or unload request would reach
        # one of them, and the merged metrics of several processes cannot drop a series.
        if self.model_control != "none" and self.workers > 1:
            raise ValueError(
                f"model_control={self.model_control} needs workers=1 (each worker loads its own "
                "models); set NOTSURE_WORKERS=1 or NOTSURE_MODEL_CONTROL=none"
            )
        return self

    @field_validator("models", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, v: object) -> object:
        if isinstance(v, str):
            return [item.strip() for item in v.split(",") if item.strip()]
        return v

    def intra_threads(self) -> int:
        """onnxruntime intra-op threads: batches run `inference_threads` at a time, so split
        the cores between them instead of oversubscribing."""
        if self.intra_op_threads:
            return self.intra_op_threads
        return max(1, self.cores() // self.inference_threads)

    def grace_s(self) -> float:
        """How long requests in flight get to finish when the server drains or a model version
        is unloaded or replaced: the request timeout, plus the time to send the answer."""
        return self.request_timeout_s + 5

    def cores(self) -> int:
        """The cores one server process may use: the machine's, split between the workers."""
        return max(1, (os.cpu_count() or 1) // self.workers)

    def lone_batch_threads(self) -> int:
        """onnxruntime threads for a lone batch (one that has the machine to itself); 0 when
        it would gain nothing."""
        threads = self.cores() if self.intra_op_threads == 0 else self.intra_op_threads
        if (
            not self.lone_batch_all_cores
            or self.inference_threads == 1
            or threads <= self.intra_threads()
        ):
            return 0
        return threads

    def batching_for(self, model: str) -> BatchingSettings:
        if model in self.batching_overrides:
            return self.batching_overrides[model]
        return BatchingSettings(
            max_batch_size=self.max_batch_size, max_queue_delay_ms=self.max_queue_delay_ms
        )


@lru_cache
def get_settings() -> Settings:
    return Settings()


# prometheus_client picks its multiprocess value store when it is imported, from this variable.
PROMETHEUS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def export_metrics_dir(path: Path) -> None:
    """Name the multiprocess metrics folder in this process's environment, for the worker
    processes it starts (their prometheus_client reads it when imported)."""
    os.environ[PROMETHEUS_DIR_VARIABLE] = str(path)
