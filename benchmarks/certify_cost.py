"""What a certificate costs: the IBP bound graph (certify.onnx) against the plain forward pass
(model.onnx), per image, with onnxruntime on the CPU, one intra-op thread.

The bound graph is exported from the model's weights into a temporary folder (or read from
`certify.onnx` beside the model when it is there). Both graphs run in alternating rounds on the
same random images, so that the machine's drift (a shared 2-core machine) hits both alike; each
round gives a ratio, and the median is the figure to quote.

    python benchmarks/certify_cost.py --model models/mnist-cnn-ce-at/1 --batch 1 --batch 32
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _session(path: Path) -> object:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _seconds_per_run(sess: object, feeds: dict[str, np.ndarray], seconds: float) -> float:
    run = sess.run  # type: ignore[attr-defined]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run(None, feeds)
        n += 1
    return (time.perf_counter() - t0) / n


def measure(
    model_dir: Path, certify_path: Path, batch: int, rounds: int, seconds: float
) -> dict[str, float]:
    """Median ms per image of each graph and the median of the per-round ratios."""
    from service.manifest import MODEL_FILE, Manifest

    shape = Manifest.load(model_dir / "manifest.json").input_shape
    x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
    plain, bound = _session(model_dir / MODEL_FILE), _session(certify_path)
    plain_feeds = {"input": x}
    bound_feeds = {"input": x, "eps": np.full((batch,), 0.1, np.float32)}
    for _ in range(5):  # warm-up: first runs allocate
        plain.run(None, plain_feeds)  # type: ignore[attr-defined]
        bound.run(None, bound_feeds)  # type: ignore[attr-defined]
    plain_ms, bound_ms, ratios = [], [], []
    for _ in range(rounds):
        p = _seconds_per_run(plain, plain_feeds, seconds)
        b = _seconds_per_run(bound, bound_feeds, seconds)
        plain_ms.append(p * 1000 / batch)
        bound_ms.append(b * 1000 / batch)
        ratios.append(b / p)
    return {
        "batch": batch,
        "plain_ms_per_image": statistics.median(plain_ms),
        "certify_ms_per_image": statistics.median(bound_ms),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def _certify_graph(model_dir: Path, tmp: Path) -> Path:
    from service.manifest import CERTIFY_FILE
    from training.certify.graph import export_certify_graph
    from training.modelio import load_torch_model

    beside = model_dir / CERTIFY_FILE
    if beside.exists():
        return beside
    net, manifest = load_torch_model(model_dir)
    path = tmp / CERTIFY_FILE
    export_certify_graph(net, manifest.objective, manifest.input_shape, path)  # type: ignore[arg-type]
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models/mnist-cnn-ce-at/1")
    parser.add_argument("--batch", type=int, action="append", help="repeatable; default 1, 32")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=1.0, help="per graph per round")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU",
        "load_average": os.getloadavg(),
        "model": str(args.model),
    }
    print(f"{meta['date']}  {meta['machine']}  load {meta['load_average'][0]:.1f}  "
          f"{args.model}")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        certify_path = _certify_graph(args.model, Path(tmp))
        for batch in args.batch or [1, 32]:
            r = measure(args.model, certify_path, batch, args.rounds, args.seconds)
            rows.append(r)
            print(f"batch {batch:3d}: plain {r['plain_ms_per_image']:.3f} ms/img, certificate "
                  f"{r['certify_ms_per_image']:.3f} ms/img, ratio {r['ratio']:.2f} "
                  f"(rounds {r['ratio_min']:.2f}-{r['ratio_max']:.2f})")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
