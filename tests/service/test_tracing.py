"""Tracing: one gRPC (and one HTTP) inference gives a `notsure.infer` span under the caller's
trace context with its four steps, recorded by the OpenTelemetry SDK's in-memory exporter."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.config import Settings
from tests.conftest import LiveServer

ROOT = Path(__file__).resolve().parents[2]
MODEL = "mnist-resnet32-rce"
TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
STEPS = ["decode", "queue wait", "inference", "scoring"]

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    """The process's tracer provider (set once per process), exporting to memory."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    return _EXPORTER


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    settings = Settings(model_repository=ROOT / "models", models=[MODEL], device="cpu",
                        tracing=True)  # fmt: skip
    with LiveServer(settings) as s:
        yield s


def trace_of(spans: tuple[ReadableSpan, ...]) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The notsure.infer span under TRACEPARENT and its children in time order."""
    (root,) = [s for s in spans if s.name == "notsure.infer"]
    assert root.context is not None and root.parent is not None
    assert f"{root.context.trace_id:032x}" == TRACE_ID
    assert f"{root.parent.span_id:016x}" == PARENT_ID and root.parent.is_remote
    kids = sorted((s for s in spans if s.parent and s.parent.span_id == root.context.span_id),
                  key=lambda s: s.start_time or 0)  # fmt: skip
    return root, kids


def check_steps(root: ReadableSpan, kids: list[ReadableSpan]) -> dict[str, float]:
    """The four steps, back to back, inside the parent; their durations in ms."""
    assert [k.name for k in kids] == STEPS
    assert kids[0].start_time == root.start_time and kids[-1].end_time == root.end_time
    durations = {}
    for a, b in itertools.pairwise(kids):
        assert a.end_time == b.start_time, (a.name, b.name)
    for k in kids:
        assert k.start_time is not None and k.end_time is not None
        assert k.end_time >= k.start_time
        durations[k.name] = (k.end_time - k.start_time) / 1e6
    assert durations["inference"] > 0.05  # a ResNet-32 run takes a fraction of a millisecond
    return durations


def test_one_grpc_infer_shows_the_four_spans(server: LiveServer, exporter: InMemorySpanExporter
                                             ) -> None:  # fmt: skip
    import tritonclient.grpc as grpcclient

    exporter.clear()
    client = grpcclient.InferenceServerClient(server.grpc_target)
    inp = grpcclient.InferInput("input", [1, 1, 28, 28], "FP32")
    inp.set_data_from_numpy(np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32))
    result = client.infer(MODEL, [inp], headers={"traceparent": TRACEPARENT})
    assert result.as_numpy("label").tolist() == [-1]  # noise: NOT SURE
    client.close()
    root, kids = trace_of(exporter.get_finished_spans())
    durations = check_steps(root, kids)
    attrs = dict(root.attributes or {})
    assert attrs["notsure.model"] == MODEL and attrs["notsure.images"] == 1
    assert attrs["notsure.not_sure"] == 1
    print("gRPC ModelInfer trace:", {k: f"{v:.3f} ms" for k, v in durations.items()})


def test_http_predict_is_traced_too(server: LiveServer, exporter: InMemorySpanExporter) -> None:
    exporter.clear()
    x = np.random.default_rng(1).random((3, 28, 28)).tolist()
    r = httpx.post(f"{server.url}/v1/models/{MODEL}/predict", json={"instances": x},
                   headers={"traceparent": TRACEPARENT, "x-request-id": "traced-1"})  # fmt: skip
    assert r.status_code == 200
    root, kids = trace_of(exporter.get_finished_spans())
    check_steps(root, kids)
    assert dict(root.attributes or {})["notsure.request_id"] == "traced-1"


def test_without_the_sdk_the_service_starts(tmp_path: Path) -> None:
    """opentelemetry-sdk is a development tool here: with it blocked from import, the app
    starts and serves whether tracing is off or on (the API alone records nothing)."""
    code = (
        "import sys; sys.modules['opentelemetry.sdk'] = None\n"
        "from fastapi.testclient import TestClient\n"
        "from service.config import Settings\nfrom service.main import create_app\n"
        "for tracing in (False, True):\n"
        f"    s = Settings(model_repository='{tmp_path}', tracing=tracing)\n"
        "    with TestClient(create_app(s)) as c:\n"
        "        assert c.get('/v2/health/live').status_code == 200\n"
        "assert 'opentelemetry.sdk.trace' not in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
