"""What the attack tool reads back from a model: the service over KServe V2, or the ONNX file.

`V2Client` speaks the KServe V2 / Open Inference Protocol with the binary tensor data extension
(raw little-endian tensors after a JSON header), which is ~10x smaller and faster than JSON
numbers for a 20k-image attack run. `OfflineScorer` runs the same ONNX graph in-process through
`service.runtime` and `service.scoring`, and returns the same record, so the two can be compared.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt

from service import v2codec
from service.manifest import MODEL_FILE, Manifest
from service.repository import read_kernel_set
from service.runtime import OnnxModel
from service.scoring import NOT_SURE, decide, score_logits

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
OUTPUTS = ("label", "j_score", "confidence", "non_me", "probabilities")


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
        tensors, threshold = self.infer_outputs(x, OUTPUTS)
        return Decisions(
            label=tensors["label"].astype(np.int64),
            j_score=tensors["j_score"].astype(np.float32),
            confidence=tensors["confidence"].astype(np.float32),
            non_me=tensors["non_me"].astype(np.float32),
            probabilities=tensors["probabilities"].astype(np.float32),
            threshold=threshold,
        )

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


class OfflineScorer:
    """The service's computation, in-process: the ONNX graph, then `service.scoring`."""

    def __init__(self, model_dir: Path, manifest: Manifest, threads: int = 0) -> None:
        self.model = OnnxModel(model_dir / MODEL_FILE, device="cpu", intra_op_threads=threads)
        self.manifest = manifest
        self.kernel_set = read_kernel_set(manifest, model_dir)

    def infer(self, x: F32) -> Decisions:
        m = self.manifest
        z, f = self.model.run_with_features(np.ascontiguousarray(x, np.float32))
        s = score_logits(z, m.kernel.to_kernel(), m.score, f, self.kernel_set)
        # Cast to what the service sends (FP32), so both paths give the same record.
        return Decisions(
            label=decide(s, m.threshold),
            j_score=s.j_score.astype(np.float32),
            confidence=s.confidence.astype(np.float32),
            non_me=s.non_me.astype(np.float32),
            probabilities=s.probabilities.astype(np.float32),
            threshold=self.manifest.threshold,
        )
