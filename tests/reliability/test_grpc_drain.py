"""SIGTERM under gRPC load: calls in flight finish with their answers, new calls are refused at
once, health checking says NOT_SERVING or is gone, and `notsure serve` exits 0."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import httpx
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from benchmarks.soak import ServeProcess
from tests.reliability.conftest import RCE, pixels
from tests.reliability.test_overload import metric

pytestmark = pytest.mark.slow


def _request(i: int, images: int) -> Any:
    x = pixels(images, seed=i)
    req = pb.ModelInferRequest(model_name=RCE, id=f"g{i}")
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req


def test_sigterm_drains_grpc_calls_refuses_new_and_exits_0(
    serve: Callable[..., ServeProcess],
) -> None:
    server = serve(inference_threads="1", max_batch_size="64", max_queue_images="32768",
                   max_instances="2048")  # fmt: skip
    n, images = 8, 1024  # seconds of work behind one inference thread
    channel = grpc.insecure_channel(server.grpc_target)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)

    def call(i: int) -> tuple[str, Any, float]:
        try:
            resp = stub.ModelInfer(_request(i, images), timeout=60)
        except grpc.RpcError as exc:
            return f"g{i}", exc, time.monotonic()
        return f"g{i}", resp, time.monotonic()

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(call, i) for i in range(n)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # signal once the server holds every call
            text = httpx.get(f"{server.url}/metrics").text
            if metric(text, "notsure_inflight_requests", model=RCE) >= n:
                break
            time.sleep(0.01)
        sigterm_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        probes: list[tuple[float, grpc.StatusCode]] = []  # new calls on fresh connections
        while server.proc.poll() is None:  # type: ignore[union-attr]
            with grpc.insecure_channel(server.grpc_target) as fresh:
                try:
                    pb_grpc.GRPCInferenceServiceStub(fresh).ServerLive(
                        pb.ServerLiveRequest(), timeout=2
                    )
                    code = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    code = exc.code()
            probes.append((time.monotonic() - sigterm_at, code))
            time.sleep(0.05)
        results = [f.result() for f in futures]
    channel.close()
    answered_after = sum(1 for _, _, t in results if t > sigterm_at)
    for rid, resp, _ in results:  # every call in flight finished, with its own answer
        assert isinstance(resp, pb.ModelInferResponse), (rid, resp)
        assert resp.id == rid and list(resp.outputs[0].shape) == [images]
    assert answered_after > 0  # they really were in flight at the signal
    refused = [t for t, code in probes if code == grpc.StatusCode.UNAVAILABLE]
    assert refused and refused[0] < 1.0, probes
    assert all(code != grpc.StatusCode.OK for t, code in probes if t >= refused[0]), probes
    assert server.proc.returncode == 0, server.log()[-2000:]  # type: ignore[union-attr]
    assert "drained after signal 15" in server.log()
