"""The fleet soak's gRPC traffic: KServe V2 `ModelInfer` calls through haproxy's HTTP/2 listener
(benchmarks/fleet_soak.py --protocol grpc), counted like the HTTP mix.

Each call carries a unique id (the request's `id` field, echoed in the response, and the
`x-request-id` metadata); an answer counts as correct only with its own id and one label per
image. haproxy's `x-served-by` initial metadata names the replica (g0, g1, ...: the gRPC servers
of replicas r0, r1, ...)."""

from __future__ import annotations

import itertools
import time
import uuid
from collections import Counter
from typing import Any, Protocol

import grpc
import httpx
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service import v2codec

Tally = dict[str, dict[str, int]]  # model -> decision -> images


def add(tally: Tally, model: str, decision: str, n: int = 1) -> None:
    """Count n images of a model answered with this decision."""
    by = tally.setdefault(model, {})
    by[decision] = by.get(decision, 0) + n


class Traffic(Protocol):
    """What a gRPC caller reads and counts on the soak's traffic (fleet_soak.Traffic)."""

    cfg: Any
    res: Any
    seen: Counter[str]
    latencies: list[float]
    generation: list[int]
    deadline: float
    restarted: bool


BATCHES = (1, 32, 128)  # images per call, as in the HTTP mix


async def grpc_calls(url: str, seed: int) -> list[tuple[str, int, Any]]:
    """(model, images, request) for every ready model and batch size: seeded random images."""
    calls = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        models = [m for m in (await client.get("/v1/models")).json()["models"] if m["ready"]]
        for i, m in enumerate(models):
            meta = (await client.get(f"/v2/models/{m['name']}")).json()
            (spec,) = meta["inputs"]
            x = np.random.default_rng(seed + i).random((128, *spec["shape"][1:]), np.float32)
            for n in BATCHES:
                tensor = pb.ModelInferRequest.InferInputTensor(
                    name=spec["name"], datatype="FP32", shape=[n, *spec["shape"][1:]]
                )
                req = pb.ModelInferRequest(model_name=m["name"], inputs=[tensor],
                                           raw_input_contents=[x[:n].tobytes()])  # fmt: skip
                calls.append((m["name"], n, req))
    return calls


def labels_of(resp: Any) -> list[int]:
    """The `label` output of a ModelInferResponse (-1: NOT SURE)."""
    for i, out in enumerate(resp.outputs):
        if out.name == "label":
            raw = resp.raw_output_contents[i]
            return [int(v) for v in v2codec.from_bytes(raw, out.datatype, out.shape, "label")]
    raise ValueError("the response has no label output")


async def grpc_worker(traffic: Traffic, wid: int, target: str,
                      calls: list[tuple[str, int, Any]]) -> None:  # fmt: skip
    """One caller, each call sent as soon as the last one is answered, on its own channel (one
    HTTP/2 connection, as a client process would have)."""
    cfg, res = traffic.cfg, traffic.res
    rng = np.random.default_rng(cfg.seed * 1000 + wid)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for seq in itertools.count():
            if traffic.restarted and time.monotonic() >= traffic.deadline:
                return
            model, n, base = calls[int(rng.integers(len(calls)))]
            rid = f"w{wid}-{seq}-{uuid.uuid4().hex[:12]}"
            req = pb.ModelInferRequest()
            req.CopyFrom(base)
            req.id = rid
            res.requests += 1
            t0 = time.perf_counter()
            call = stub.ModelInfer(req, metadata=(("x-request-id", rid),), timeout=cfg.timeout_s)
            try:
                resp = await call
                metadata = dict(await call.initial_metadata())
            except grpc.aio.AioRpcError as exc:
                # No answer, or an error status: both reach the client, both count.
                res.lost += 1
                key = f"grpc {exc.code().name}"
                res.errors[key] = res.errors.get(key, 0) + 1
                continue
            traffic.latencies.append(time.perf_counter() - t0)
            traffic.seen[resp.id] += 1
            if traffic.seen[resp.id] > 1:
                res.duplicated += 1
            labels = labels_of(resp)
            if resp.id != rid or len(labels) != n:
                why = "request_id" if resp.id != rid else "prediction_count"
                res.errors[why] = res.errors.get(why, 0) + 1
                continue
            res.ok += 1
            server = str(metadata.get("x-served-by", "g?"))
            replica = f"r{server[1:]}"
            res.by_replica[replica] = res.by_replica.get(replica, 0) + 1
            instance = f"{replica}#{traffic.generation[int(server[1:])]}"
            res.client_requests[instance] = res.client_requests.get(instance, 0) + 1
            for label in labels:
                d = "not_sure" if label == -1 else "accepted"
                add(res.client_images, model, d)
                add(res.client_by_instance.setdefault(instance, {}), model, d)
