"""Raw in-process onnxruntime throughput: the baseline the serving benchmark compares with."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def raw_parallel(
    model_path: Path, shape: tuple[int, ...], batch: int, seconds: float, workers: int
) -> float:
    """In-process onnxruntime, `workers` threads each running batches (intra-op 1): img/s."""
    return raw_parallel_cpu(model_path, shape, batch, seconds, workers)[0]


def raw_parallel_cpu(
    model_path: Path, shape: tuple[int, ...], batch: int, seconds: float, workers: int
) -> tuple[float, float]:
    """As `raw_parallel`: (img/s, CPU ms per image), the CPU time of this process (every
    thread) over the runs: what onnxruntime itself costs per image at this batch size, the
    floor a server's CPU per image is compared with."""
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

    t0, cpu0 = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    images = sum(counts) * batch
    return images / wall, 1000 * cpu / images if images else 0.0


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
