"""The attack tool's scorer over KServe V2 gRPC: `GrpcClient` has V2Client's interface
(`wait_ready`, `metadata`, `infer`, `close`) and returns the same `Decisions`.

Images travel as `raw_input_contents` and outputs come back as `raw_output_contents` (raw
little-endian tensors, like the HTTP client's binary extension). Messages and stubs are the
generated ones tritonclient[grpc] ships; grpc is imported only when a gRPC scorer is built.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from service.v2codec import DTYPES
from training.attack.service_client import F32, OUTPUTS, Decisions, ServiceError

DEFAULT_PORT = 8001
# Back-pressure and transient statuses (queue full, not ready yet, deadline in the queue):
# wait and retry, as the HTTP client does on 503/504.
RETRY = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")


def target_of(url: str) -> str:
    """host:port for grpc from 'host:port', 'grpc://host:port' or an http(s) URL; an http URL
    without the gRPC port keeps its host and takes port 8001."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port if parts.scheme == "grpc" and parts.port else DEFAULT_PORT
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcClient:
    """A small synchronous KServe V2 gRPC client for one model version, with bounded retries."""

    def __init__(
        self, url: str, model: str, version: int | None = None, timeout_s: float = 60.0,
        retries: int = 3, api_key: str | None = None,
    ) -> None:  # fmt: skip
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        self._grpc, self._pb = grpc, service_pb2
        self.target = target_of(url)
        limit = 256 * 1024 * 1024  # a 20k-image attack batch fits; the server sets its own
        self.channel = grpc.insecure_channel(
            self.target,
            options=[("grpc.max_send_message_length", limit),
                     ("grpc.max_receive_message_length", limit)],
        )  # fmt: skip
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.metadata_headers = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.model, self.version, self.timeout_s, self.retries = model, version, timeout_s, retries

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: str, request: Any) -> Any:
        return getattr(self.stub, method)(
            request, timeout=self.timeout_s, metadata=self.metadata_headers
        )

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Poll ServerReady until the server says it is ready, or fail after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self._call("ServerReady", self._pb.ServerReadyRequest()).ready:
                    return
            except self._grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise ServiceError(f"{self.target} not ready after {timeout_s:.0f} s")
            time.sleep(0.2)

    def metadata(self) -> dict[str, Any]:
        req = self._pb.ModelMetadataRequest(name=self.model, version=str(self.version or ""))
        try:
            resp = self._call("ModelMetadata", req)
        except self._grpc.RpcError as exc:
            raise ServiceError(f"model metadata: {exc.code().name}: {exc.details()}") from exc
        tensors = lambda ts: [  # noqa: E731
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts
        ]
        return {"name": resp.name, "versions": list(resp.versions), "platform": resp.platform,
                "inputs": tensors(resp.inputs), "outputs": tensors(resp.outputs)}  # fmt: skip

    def infer(self, x: F32) -> Decisions:
        """Score a batch (B, C, H, W) of pixels in [0, 1] through the service."""
        req = self._pb.ModelInferRequest(
            model_name=self.model, model_version=str(self.version or "")
        )
        req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        req.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
        for name in OUTPUTS:
            req.outputs.add(name=name)
        where = f"{self.target} ModelInfer"
        for attempt in range(self.retries + 1):
            try:
                resp = self._call("ModelInfer", req)
            except self._grpc.RpcError as exc:
                if exc.code().name in RETRY and attempt < self.retries:
                    time.sleep(0.5 * 2**attempt)
                    continue
                raise ServiceError(f"{where}: {exc.code().name}: {exc.details()}") from exc
            return _decisions(resp)
        raise ServiceError(f"{where}: no answer after {self.retries} retries")


def _decisions(resp: Any) -> Decisions:
    if len(resp.raw_output_contents) != len(resp.outputs):
        raise ServiceError("response outputs are not raw tensors (raw_output_contents)")
    tensors = {
        o.name: np.frombuffer(raw, DTYPES[o.datatype]).reshape(tuple(o.shape))
        for o, raw in zip(resp.outputs, resp.raw_output_contents, strict=True)
    }
    missing = [n for n in OUTPUTS if n not in tensors]
    if missing:
        raise ServiceError(f"response lacks outputs {missing}")
    if "threshold" not in resp.parameters:
        raise ServiceError("response parameters lack 'threshold' (the applied T)")
    return Decisions(
        label=tensors["label"].astype(np.int64),
        j_score=tensors["j_score"].astype(np.float32),
        confidence=tensors["confidence"].astype(np.float32),
        non_me=tensors["non_me"].astype(np.float32),
        probabilities=tensors["probabilities"].astype(np.float32),
        threshold=float(resp.parameters["threshold"].double_param),
    )
