"""Closed-loop gRPC load for KServe V2 `ModelInfer`: `concurrency` callers, each sending the next
request as soon as the last one is answered, for `duration` seconds. wrk speaks only HTTP, so
gRPC cells are loaded by this client instead (grpc.aio, one prebuilt request, in its own
process); its own CPU cost is part of what the cell measures, on this 2-core machine too.

    python -m benchmarks.grpc_load --target 127.0.0.1:8001 --model mnist-resnet32-rce \\
        --images 64 --concurrency 32 --duration 8

Prints one JSON line: req_s, p50_ms, p99_ms, errors (status name -> count).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb


@dataclass
class Load:
    req_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)


def request(model: str, images: int, shape: list[int], input_name: str, datatype: str) -> bytes:
    """A serialized ModelInferRequest of `images` random images in raw_input_contents."""
    rng = np.random.default_rng(0)
    if datatype == "UINT8":
        x = rng.integers(0, 256, (images, *shape), dtype=np.uint8)
    else:
        x = rng.random((images, *shape), dtype=np.float32)
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name=input_name, datatype=datatype, shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return bytes(req.SerializeToString())


async def run(target: str, body: bytes, concurrency: int, duration_s: float) -> Load:
    # One channel per 8 callers: a single HTTP/2 connection serialises its frames on one
    # socket, which would cap high concurrency at the client, not the server.
    channels = [grpc.aio.insecure_channel(target) for _ in range(max(1, concurrency // 8))]
    calls = [
        ch.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=None,
            response_deserializer=None,
        )
        for ch in channels
    ]
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    stop = time.perf_counter() + duration_s

    async def caller(i: int) -> None:
        call = calls[i % len(calls)]
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                await call(body, timeout=30)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                continue
            latencies.append(time.perf_counter() - t0)

    for ch in channels:  # connect before the clock starts
        await asyncio.wait_for(ch.channel_ready(), 30)
    t_start = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - t_start
    for ch in channels:
        await ch.close()
    if not latencies:
        return Load(errors=dict(errors))
    ms = np.asarray(latencies) * 1000
    return Load(len(latencies) / elapsed, float(np.percentile(ms, 50)),
                float(np.percentile(ms, 99)), dict(errors))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--target", required=True, help="host:port")
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", type=int, default=1, help="images per request")
    ap.add_argument("--shape", type=int, nargs="+", default=[1, 28, 28], help="one image")
    ap.add_argument("--input", default="input", help="input tensor name")
    ap.add_argument("--datatype", default="FP32", choices=["FP32", "UINT8"])
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--duration", type=float, default=8.0)
    args = ap.parse_args()
    body = request(args.model, args.images, args.shape, args.input, args.datatype)
    load = asyncio.run(run(args.target, body, args.concurrency, args.duration))
    print(json.dumps(asdict(load)))


if __name__ == "__main__":
    main()
