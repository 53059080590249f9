"""Triton Inference Server (through PyTriton, dynamic batching on) serving the same ONNX model
with the same scoring, for the side-by-side benchmark.

PyTriton ships its own Triton build and pins its own dependencies, so it lives in its own venv:

    python -m venv /tmp/pytritonvenv
    /tmp/pytritonvenv/bin/pip install nvidia-pytriton onnxruntime numpy pydantic
    MODEL_DIR=models/<name>/1 PORT=8003 \\
        /tmp/pytritonvenv/bin/python -m benchmarks.others.pytriton_app   # from the repository root

It speaks KServe V2 only: POST /v2/models/<name>/infer with a UINT8 tensor "images" of shape
(N, 28, 28), N <= 64. Ready once /v2/models/<name>/ready answers 200 (/v2/health/ready
already does before the model is loaded). Metrics are off; gRPC is on only when GRPC_PORT is
set (the same tensors over KServe V2 gRPC, on 127.0.0.1).
"""

import os
import signal
import sysconfig

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from benchmarks.others.common import Scorer

scorer = Scorer(os.environ["MODEL_DIR"])


@batch
def infer(images: np.ndarray) -> dict[str, np.ndarray]:
    """(B, 28, 28) integer pixels, the requests Triton batched together -> (B, 1) outputs."""
    s = scorer.scores(images)
    return {
        "label": s.label[:, None],
        "j_score": s.j_score[:, None],
        "accepted": scorer.accepted(s)[:, None],
    }


if __name__ == "__main__":
    # SIGTERM (how the benchmark stops servers) takes the same path as Ctrl-C: Triton.serve()
    # then stops the server and removes its workspace.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # Triton's Python backend stub links libpython3.11.so.1.0 but runs this interpreter's
    # stdlib: without our LIBDIR first it finds the system's 3.11.2 library (Debian), whose
    # RLock lacks _recursion_count, and the model fails to load inside multiprocessing.
    libdir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p
    )
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=int(os.environ["PORT"]),
        # gRPC only when asked for (benchmarks.serving's pytriton-grpc cells).
        allow_grpc="GRPC_PORT" in os.environ,
        grpc_address="127.0.0.1",
        grpc_port=int(os.environ.get("GRPC_PORT", "8001")),
        allow_metrics=False,
        log_verbose=0,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=scorer.manifest.name,
            infer_func=infer,
            inputs=[
                Tensor(name="images", dtype=np.uint8, shape=tuple(scorer.manifest.input_shape[1:]))
            ],
            outputs=[
                Tensor(name="label", dtype=np.int64, shape=(1,)),
                Tensor(name="j_score", dtype=np.float64, shape=(1,)),
                Tensor(name="accepted", dtype=np.bool_, shape=(1,)),
            ],
            # Batch whatever is queued and wait at most 100 us for more (Triton's default is
            # no wait; notsure waits up to 2 ms).
            config=ModelConfig(
                max_batch_size=64,
                batcher=DynamicBatcher(max_queue_delay_microseconds=100),
            ),
        )
        triton.serve()
