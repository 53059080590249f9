"""Clients of the running service, for every tool that sends it images (the validator, the
audit's live replay, `notsure validate ood`): KServe V2 over HTTP or gRPC, one `Decisions`
record from both.

`V2Client` speaks the KServe V2 / Open Inference Protocol over HTTP with the binary tensor data
extension (raw little-endian tensors after a JSON header), which is ~10x smaller and faster than
JSON numbers for a 20k-image attack run. `GrpcClient` has the same interface (`wait_ready`,
`metadata`, `infer`, `close`) over gRPC: images travel as `raw_input_contents` and outputs come
back as `raw_output_contents`; its messages and stubs are the generated ones tritonclient[grpc]
ships, and grpc is imported only when a gRPC client is built.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import numpy.typing as npt

from service import v2codec
from service.scoring import NOT_SURE

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
OUTPUTS = ("label", "j_score", "confidence", "non_me", "probabilities")
DEFAULT_GRPC_PORT = 8001
# gRPC's back-pressure and transient statuses (queue full, not ready yet, deadline in the
# queue): wait and retry, as the HTTP client does on 503/504.
RETRY = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")


@dataclass(frozen=True)
class Decisions:
    """Per-image results for B images, as the service returned them."""

    label: I64  # (B,) -1 for NOT SURE
    j_score: F32  # (B,)
    confidence: F32  # (B,)
    non_me: F32  # (B,)
    probabilities: F32  # (B, L); argmax is the predicted class even when NOT SURE
    threshold: float  # the T that was applied

    @property
    def predicted(self) -> I64:
        return self.probabilities.argmax(axis=1).astype(np.int64)

    @property
    def refused(self) -> npt.NDArray[np.bool_]:
        return self.label == NOT_SURE

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in OUTPUTS} | {"threshold": np.float64(self.threshold)}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> Decisions:
        return cls(*(np.asarray(a[k]) for k in OUTPUTS), threshold=float(a["threshold"]))

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], threshold: float) -> Decisions:
        """The record from the service's output tensors, in the types the service sends."""
        return cls(
            label=tensors["label"].astype(np.int64),
            j_score=tensors["j_score"].astype(np.float32),
            confidence=tensors["confidence"].astype(np.float32),
            non_me=tensors["non_me"].astype(np.float32),
            probabilities=tensors["probabilities"].astype(np.float32),
            threshold=threshold,
        )

    @classmethod
    def concat(cls, parts: list[Decisions]) -> Decisions:
        arrays = {k: np.concatenate([getattr(p, k) for p in parts]) for k in OUTPUTS}
        return cls(**arrays, threshold=parts[0].threshold)


class ServiceError(RuntimeError):
    """The service answered with an error, or not at all within the retries."""


class V2Client:
    """A small synchronous KServe V2 client for one model version, with bounded retries."""

    def __init__(
        self, url: str, model: str, version: int | None = None, timeout_s: float = 60.0,
        retries: int = 3, api_key: str | None = None,
    ) -> None:  # fmt: skip
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s, headers=headers)
        self.model, self.version, self.retries = model, version, retries
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
        self.infer_path = f"{path}/infer"

    def close(self) -> None:
        self.http.close()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Poll /v2/health/ready until the server says it is ready, or fail after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.http.get("/v2/health/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ServiceError(f"{self.http.base_url} not ready after {timeout_s:.0f} s")
            time.sleep(0.2)

    def metadata(self) -> dict:
        resp = self.http.get(f"/v2/models/{self.model}")
        if resp.status_code != 200:
            raise ServiceError(f"model metadata: HTTP {resp.status_code}: {resp.text[:300]}")
        return dict(resp.json())

    def infer(self, x: F32) -> Decisions:
        """Score a batch (B, C, H, W) of pixels in [0, 1] through the service."""
        return Decisions.from_tensors(*self.infer_outputs(x, OUTPUTS))

    def infer_outputs(
        self, x: F32, outputs: tuple[str, ...]
    ) -> tuple[dict[str, np.ndarray], float]:
        """The named output tensors for a batch (B, C, H, W), and the T the service applied."""
        body, headers = v2codec.encode_request(
            [("input", np.ascontiguousarray(x, np.float32))],
            outputs=outputs,
            binary_outputs=outputs,
        )
        for attempt in range(self.retries + 1):
            try:
                resp = self.http.post(self.infer_path, content=body, headers=headers)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise ServiceError(f"{self.infer_path}: {exc}") from exc
                time.sleep(0.5 * 2**attempt)
                continue
            # 503/504 are back-pressure (queue full, timeout in the queue): wait and retry.
            if resp.status_code in (503, 504) and attempt < self.retries:
                time.sleep(float(resp.headers.get("Retry-After", 0.5 * 2**attempt)))
                continue
            if resp.status_code != 200:
                raise ServiceError(f"{self.infer_path}: HTTP {resp.status_code}: {resp.text[:300]}")
            length = resp.headers.get(v2codec.HEADER_LENGTH)
            tensors, meta = v2codec.decode_response(resp.content, length)
            missing = [n for n in outputs if n not in tensors]
            if missing:
                raise ServiceError(f"response lacks outputs {missing}")
            threshold = (meta.get("parameters") or {}).get("threshold")
            if threshold is None:
                raise ServiceError("response parameters lack 'threshold' (the applied T)")
            return tensors, float(threshold)
        raise ServiceError(f"{self.infer_path}: no answer after {self.retries} retries")


def target_of(url: str) -> str:
    """host:port for grpc from 'host:port', 'grpc://host:port' or an http(s) URL; an http URL
    without the gRPC port keeps its host and takes port 8001."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port if parts.scheme == "grpc" and parts.port else DEFAULT_GRPC_PORT
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
        o.name: np.frombuffer(raw, v2codec.DTYPES[o.datatype]).reshape(tuple(o.shape))
        for o, raw in zip(resp.outputs, resp.raw_output_contents, strict=True)
    }
    missing = [n for n in OUTPUTS if n not in tensors]
    if missing:
        raise ServiceError(f"response lacks outputs {missing}")
    if "threshold" not in resp.parameters:
        raise ServiceError("response parameters lack 'threshold' (the applied T)")
    return Decisions.from_tensors(tensors, float(resp.parameters["threshold"].double_param))
