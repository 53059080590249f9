"""ONNX Runtime sessions: execution-provider selection, graph inspection, thread-safe runs."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from threadpoolctl import threadpool_limits

from service.preprocess import GraphMismatch, ModelIO, check_input, padded_chunks

log = logging.getLogger(__name__)

FEATURES_OUTPUT = "features"  # the graph output that holds the final hidden vector

Device = Literal["auto", "cuda", "cpu"]
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def single_threaded_blas() -> None:
    """Run numpy's BLAS (OpenBLAS) on one thread in this process. The service's matrix
    products are small (K-density's distances to the kernel set), and OpenBLAS's own threads
    spin-wait after each one on the cores that onnxruntime needs: with them, 64-image JSON
    requests at concurrency 8 went 17 req/s, without them 21 (2 cores)."""
    threadpool_limits(1, user_api="blas")


class ProviderUnavailable(RuntimeError):
    """The requested execution provider is not available in this onnxruntime build/host."""


def cuda_driver_present() -> bool:
    """Whether the NVIDIA driver library can be loaded (onnxruntime-gpu lists its CUDA
    provider as available even on hosts without a GPU, then fails noisily at session start)."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def select_providers(device: Device, available: Sequence[str], driver: bool) -> list[str]:
    """Providers to ask onnxruntime for, in priority order.

    'auto' takes CUDA when this onnxruntime build offers it and a driver is present (the CPU
    stays as the fallback for unsupported nodes); 'cuda' insists on it; 'cpu' never uses it.
    """
    if device == "cpu":
        return [CPU]
    if CUDA in available and driver:
        return [CUDA, CPU]
    if device == "cuda":
        why = (
            "no NVIDIA driver (libcuda.so.1) was found"
            if CUDA in available
            else (f"this onnxruntime build offers only {', '.join(available)}")
        )
        raise ProviderUnavailable(
            f"device 'cuda' requested but {why}; install onnxruntime-gpu on a host with an "
            "NVIDIA driver, or set device to auto/cpu"
        )
    return [CPU]


def session_options(intra_op_threads: int = 0) -> ort.SessionOptions:
    """The options of every session the service builds (the model and its bound graph)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The batch axis varies with the load: with memory patterns on, onnxruntime caches a
    # plan and its buffers for every batch size it meets, so resident memory grew with
    # the traffic (tens of MiB in a 25 s soak after warm-up).
    opts.enable_mem_pattern = False
    # Nor the CPU memory arena: it grows in power-of-two steps whenever a run's tensors
    # do not fit what it holds (a larger batch, or two batches at once), and never gives
    # memory back, so resident memory kept stepping up under mixed traffic (ResNet-32
    # repository, 90 s soak after warm-up: 511 -> 568 MiB, still rising; without it flat
    # at about 340 MiB). Plain malloc costs nothing measurable here (single- and
    # two-thread runs at batch 1 and 64 within noise of the arena's).
    opts.enable_cpu_mem_arena = False
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
    return opts


@dataclass(frozen=True)
class GraphSignature:
    input_name: str
    input_shape: tuple[int | str | None, ...]  # as declared, batch axis first
    output_name: str
    output_shape: tuple[int | str | None, ...]
    # The final hidden vector, (B, D), when the graph exports one (for K-density).
    features_name: str | None = None
    features_shape: tuple[int | str | None, ...] | None = None


class OnnxModel:
    """One InferenceSession. `run` is safe to call from several threads at once."""

    def __init__(
        self,
        model: Path | bytes,
        device: Device = "auto",
        intra_op_threads: int = 0,
        io: ModelIO | None = None,
    ) -> None:
        """`model`: an .onnx file, or its bytes (already verified by the caller); `io`: what the
        manifest says the graph takes and gives (normalisation, output kind, fixed batch),
        checked against the graph here (GraphMismatch) and applied on every run."""
        opts = session_options(intra_op_threads)
        providers = select_providers(device, ort.get_available_providers(), cuda_driver_present())
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, sess_options=opts, providers=providers)
        # onnxruntime silently falls back to the CPU when CUDA fails to initialise: report what
        # it actually uses, not what was asked for.
        self.provider: str = self.session.get_providers()[0]
        if device == "cuda" and self.provider != CUDA:
            raise ProviderUnavailable(f"CUDA provider failed to initialise; got {self.provider}")
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        if io is not None and io.output_name is not None:
            named = [o for o in self.session.get_outputs() if o.name == io.output_name]
            if not named:
                have = ", ".join(o.name for o in self.session.get_outputs())
                raise GraphMismatch(
                    f"the graph has no output {io.output_name!r}; set output_name to one of {have}"
                )
            out = named[0]
        self.io = None if io is None else check_input(io, inp.name, tuple(inp.shape), inp.type)
        feats = [o for o in self.session.get_outputs()[1:] if o.name == FEATURES_OUTPUT]
        self.signature = GraphSignature(
            inp.name,
            tuple(inp.shape),
            out.name,
            tuple(out.shape),
            feats[0].name if feats else None,
            tuple(feats[0].shape) if feats else None,
        )

    def run_outputs(self, names: list[str], x: npt.NDArray[np.float32]) -> list[npt.NDArray[Any]]:
        """The named outputs for (B, C, H, W) pixels, through the manifest's `io` when given: a
        fixed-batch graph runs on chunks of its batch, the last padded, and the pad dropped."""
        io, name = self.io, self.signature.input_name
        if io is None:
            return [np.asarray(o) for o in self.session.run(names, {name: x})]
        g = io.graph_input(x)
        if io.batch_size is None:
            return [np.asarray(o) for o in self.session.run(names, {name: g})]
        parts = [self.session.run(names, {name: c}) for c in padded_chunks(g, io.batch_size)]
        return [np.concatenate([p[i] for p in parts])[: x.shape[0]] for i in range(len(names))]

    def _softmax_input(self, out: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        if self.io is None:
            return np.asarray(out, dtype=np.float32)
        return self.io.softmax_input(out)

    def run(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """(B, C, H, W) float32 -> (B, L) float32 logits fed to the softmax."""
        out = self.run_outputs([self.signature.output_name], x)
        return self._softmax_input(out[0])

    def run_with_features(
        self, x: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
        """(B, C, H, W) -> logits (B, L) and, when the graph has them, features (B, D)."""
        sig = self.signature
        if sig.features_name is None:
            return self.run(x), None
        logits, feats = self.run_outputs([sig.output_name, sig.features_name], x)
        return self._softmax_input(logits), np.asarray(feats, dtype=np.float32)

    def run_batched(self, x: npt.NDArray[np.float32], batch: int = 1000) -> npt.NDArray[np.float32]:
        """`run` over a large array in chunks of `batch` images."""
        parts = [self.run(np.ascontiguousarray(x[i : i + batch])) for i in range(0, len(x), batch)]
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
