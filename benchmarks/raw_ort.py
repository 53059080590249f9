"""Raw in-process onnxruntime throughput: the baseline the serving benchmark compares with."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def raw_parallel(
    model_path: Path, shape: tuple[int, ...], batch: int, seconds: float, workers: int
) -> float:
    """In-process onnxruntime, `workers` threads each running batches (intra-op 1): img/s."""
    import threading

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
    sess.run(None, {"input": x})
    counts = [0] * workers
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            sess.run(None, {"input": x})
            counts[i] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) * batch / (time.perf_counter() - t0)


def raw_onnxruntime(
    model_path: Path, shape: tuple[int, ...], batch: int, seconds: float, intra: int
) -> tuple[float, float]:
    """In-process onnxruntime: (images/s, ms per run) at this batch size, one session."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
    for _ in range(5):
        sess.run(None, {"input": x})
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sess.run(None, {"input": x})
        n += 1
    dt = (time.perf_counter() - t0) / n
    return batch / dt, dt * 1000
