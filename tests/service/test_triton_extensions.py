"""Triton's model configuration and statistics extensions, read by the real tritonclient (HTTP
and gRPC) from a live server on 127.0.0.1: the configuration against the manifest, the ONNX
graph and the tensors inference answers; the statistics against the requests sent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

tritonclient_http = pytest.importorskip("tritonclient.http")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from fastapi.testclient import TestClient  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from service.batch_timing import note_inferred  # noqa: E402
from service.batching import Batcher  # noqa: E402
from service.config import BatchingSettings, Settings  # noqa: E402
from service.errors import InferenceFailed  # noqa: E402
from service.main import create_app  # noqa: E402
from service.manifest import MANIFEST_FILE, MODEL_FILE, Manifest  # noqa: E402
from service.stats import ModelStats  # noqa: E402
from tests.conftest import LiveServer  # noqa: E402
from tests.training.graphs import linear_classifier  # noqa: E402
from training.data import synthetic  # noqa: E402
from training.importer import ImportConfig, import_model  # noqa: E402

RCE, CE = "tiny-rce", "tiny-ce"
CE_BATCHING = BatchingSettings(max_batch_size=8, max_queue_delay_ms=0.5)


@pytest.fixture(scope="module")
def server(model_repo: Path) -> Iterator[LiveServer]:
    # tiny-ce batches by its own settings.
    with LiveServer(_settings(model_repo)) as s:
        yield s


def _settings(model_repo: Path) -> Settings:
    return Settings(model_repository=model_repo, batching_overrides={CE: CE_BATCHING})


@pytest.fixture
def http(server: LiveServer) -> Iterator[Any]:
    c = tritonclient_http.InferenceServerClient(f"127.0.0.1:{server.port}", concurrency=8)
    yield c
    c.close()


@pytest.fixture
def grpc(server: LiveServer) -> Iterator[Any]:
    c = tritonclient_grpc.InferenceServerClient(server.grpc_target)
    yield c
    c.close()


def _graph_dims(path: Path) -> tuple[list[int | str], list[int | str]]:
    """The ONNX graph's first input and first output shapes (symbolic axes by name)."""
    graph = onnx.load(path).graph

    def dims(v: onnx.ValueInfoProto) -> list[int | str]:
        return [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]

    return dims(graph.input[0]), dims(graph.output[0])


def _inputs(n: int, seed: int, module: Any = tritonclient_http) -> list[Any]:
    x = synthetic(n, seed=seed).x.numpy()
    inp = module.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


@pytest.mark.parametrize(("name", "batching"), [(RCE, BatchingSettings()), (CE, CE_BATCHING)])
def test_config_matches_the_manifest_the_graph_and_the_answers(
    http: Any, grpc: Any, model_repo: Path, name: str, batching: BatchingSettings
) -> None:
    vdir = model_repo / name / "1"
    manifest = Manifest.load(vdir / MANIFEST_FILE)
    graph_in, graph_out = _graph_dims(vdir / MODEL_FILE)
    config = http.get_model_config(name)
    assert http.get_model_config(name, "1") == config
    assert config["name"] == name and config["platform"] == "onnxruntime_onnx"
    assert config["backend"] == "onnxruntime"
    assert config["max_batch_size"] == batching.max_batch_size
    assert config["dynamic_batching"] == {
        "preferred_batch_size": [batching.max_batch_size],
        "max_queue_delay_microseconds": round(batching.max_queue_delay_ms * 1000),
    }
    (inp,) = config["input"]
    assert inp["dims"] == list(manifest.input_shape) == graph_in[1:]
    assert isinstance(graph_in[0], str)  # the graph's batch axis is the one dims leave out
    assert (inp["name"], inp["data_type"], inp["format"]) == ("input", "TYPE_FP32", "FORMAT_NCHW")
    meta = http.get_model_metadata(name)
    outputs = {o["name"]: o for o in config["output"]}
    assert list(outputs) == [o["name"] for o in meta["outputs"]]
    assert all(outputs[o["name"]]["data_type"] == f"TYPE_{o['datatype']}" for o in meta["outputs"])
    assert outputs["probabilities"]["dims"] == [manifest.num_classes] == graph_out[1:]
    params = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert float(params["threshold"]) == manifest.threshold and params["score"] == manifest.score
    # Triton's rule: an answer of B images has shape [B] + (reshape's shape, else dims).
    result = http.infer(name, _inputs(3, seed=1))
    for out_name, out in outputs.items():
        want = [3, *out.get("reshape", {"shape": out["dims"]})["shape"]]
        assert list(result.as_numpy(out_name).shape) == want, out_name
    # gRPC answers the same configuration as a ModelConfig message.
    via_grpc = grpc.get_model_config(name).config
    assert via_grpc == json_format.ParseDict(config, mc.ModelConfig())
    assert via_grpc.input[0].data_type == mc.TYPE_FP32 and via_grpc.max_batch_size > 0


def test_unknown_models_are_refused_on_both_protocols(http: Any, grpc: Any) -> None:
    for call in (
        lambda: http.get_model_config("nope"),
        lambda: http.get_inference_statistics("nope"),
        lambda: http.get_inference_statistics(RCE, "7"),
        lambda: grpc.get_model_config("nope"),
        lambda: grpc.get_inference_statistics("nope"),
        lambda: grpc.get_inference_statistics(RCE, "7"),
    ):
        with pytest.raises(InferenceServerException, match=r"no model named|has no version 7"):
            call()


def _stat(http: Any, name: str) -> dict[str, Any]:
    (stat,) = http.get_inference_statistics(name, "1")["model_stats"]
    assert stat["name"] == name and stat["version"] == "1"
    return stat


@pytest.fixture
def fresh(model_repo: Path) -> Iterator[tuple[Any, Any]]:
    """HTTP and gRPC clients of a server of its own: nothing else counts in its statistics."""
    with LiveServer(_settings(model_repo)) as s:
        http = tritonclient_http.InferenceServerClient(f"127.0.0.1:{s.port}", concurrency=8)
        grpc = tritonclient_grpc.InferenceServerClient(s.grpc_target)
        yield http, grpc
        http.close()
        grpc.close()


def test_statistics_count_what_was_sent(fresh: tuple[Any, Any]) -> None:
    http, grpc = fresh
    assert _stat(http, CE)["inference_count"] == 0  # nothing sent yet: counts start at load
    started_ms = time.time_ns() // 1_000_000
    # One request at a time: each runs as a batch of its own.
    http_sizes, grpc_sizes = [1, 3, 5, 2], [4, 8]
    for i, n in enumerate(http_sizes):
        http.infer(CE, _inputs(n, seed=i))
    for i, n in enumerate(grpc_sizes):
        grpc.infer(CE, _inputs(n, seed=10 + i, module=tritonclient_grpc))
    stat = _stat(http, CE)
    sizes = http_sizes + grpc_sizes
    assert stat["inference_count"] == sum(sizes)
    assert stat["execution_count"] == len(sizes)
    assert {b["batch_size"]: b["compute_infer"]["count"] for b in stat["batch_stats"]} == {
        n: sizes.count(n) for n in sizes
    }
    steps = stat["inference_stats"]
    assert steps["success"]["count"] == len(sizes) and steps["fail"]["count"] == 0
    parts = ("queue", "compute_input", "compute_infer", "compute_output")
    for step in parts:
        assert steps[step]["count"] == len(sizes), step
    for step in ("success", "compute_input", "compute_infer", "compute_output"):
        assert steps[step]["ns"] > 0, step
    # A request's time in the server covers its queueing and its batch's computing.
    assert steps["success"]["ns"] >= sum(steps[s]["ns"] for s in parts)
    assert started_ms <= stat["last_inference"] <= time.time_ns() // 1_000_000

    # Eight single images at once: the batcher may join them (at most 8 images a batch).
    pending = [http.async_infer(CE, _inputs(1, seed=20 + i)) for i in range(8)]
    for p in pending:
        p.get_result()
    stat = _stat(http, CE)
    sent = len(sizes) + 8
    assert stat["inference_count"] == sum(sizes) + 8
    assert stat["inference_stats"]["success"]["count"] == sent
    assert len(sizes) + 1 <= stat["execution_count"] <= sent
    batches = stat["batch_stats"]
    assert sum(b["compute_infer"]["count"] for b in batches) == stat["execution_count"]
    assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in batches) == sum(sizes) + 8
    assert all(b["batch_size"] <= CE_BATCHING.max_batch_size for b in batches)
    # Queueing and computing count once per request, however the requests were batched.
    assert all(stat["inference_stats"][step]["count"] == sent for step in parts)

    # Refused requests count as failures, on either protocol, and nowhere else.
    bad = tritonclient_http.InferInput("input", [1, 1, 28, 29], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 1, 28, 29), np.float32))
    with pytest.raises(InferenceServerException, match="28"):
        http.infer(CE, [bad])
    bad_grpc = tritonclient_grpc.InferInput("wrong", [1, 1, 28, 28], "FP32")
    bad_grpc.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
    with pytest.raises(InferenceServerException, match="unknown input"):
        grpc.infer(CE, [bad_grpc])
    after = _stat(http, CE)
    assert after["inference_stats"]["fail"]["count"] == 2
    assert after["inference_stats"]["fail"]["ns"] > 0
    assert after["inference_count"] == stat["inference_count"]
    assert after["inference_stats"]["success"] == stat["inference_stats"]["success"]

    # Both protocols answer the same numbers, for one version, one model or all of them.
    for args in ((CE, "1"), (CE,), ()):
        via_http = http.get_inference_statistics(*args)
        via_grpc = grpc.get_inference_statistics(*args)
        assert via_grpc == json_format.ParseDict(via_http, pb.ModelStatisticsResponse()), args
    everything = http.get_inference_statistics()["model_stats"]
    assert [(s["name"], s["version"]) for s in everything] == [(CE, "1"), (RCE, "1")]
    assert http.get_inference_statistics(CE)["model_stats"] == [after]


def test_server_metadata_lists_the_extensions(http: Any, grpc: Any) -> None:
    want = {"binary_tensor_data", "model_repository", "model_configuration", "statistics"}
    assert set(http.get_server_metadata()["extensions"]) == want
    assert set(grpc.get_server_metadata().extensions) == want


def test_fixed_batch_and_unbatched_configurations(tmp_path: Path) -> None:
    """A graph with a fixed batch of 1 reports max_batch_size 1; without dynamic batching the
    configuration has no dynamic_batching."""
    linear_classifier(tmp_path / "f.onnx", (1, 1, 6, 6), 3)
    repo = tmp_path / "models"
    import_model(ImportConfig(model=tmp_path / "f.onnx", name="fixed", threshold=0.5,
                              repository=repo))  # fmt: skip
    with TestClient(create_app(Settings(model_repository=repo))) as c:
        config = c.get("/v2/models/fixed/config").json()
        assert config["max_batch_size"] == 1 and config["input"][0]["dims"] == [1, 6, 6]
        assert config["dynamic_batching"]["preferred_batch_size"] == [1]
        assert config["parameters"]["calibrated"] == {"string_value": "false"}
    with TestClient(create_app(Settings(model_repository=repo, batching=False))) as c:
        config = c.get("/v2/models/fixed/versions/1/config").json()
        assert config["max_batch_size"] == 1 and "dynamic_batching" not in config


def test_batch_steps_are_timed_where_they_happen() -> None:
    """The model's run (up to note_inferred) is compute_infer, what follows compute_output; a
    failed batch counts as no execution."""
    stats = ModelStats()

    def run(x: np.ndarray, sizes: list[int]) -> list[int]:
        if x[0, 0, 0, 0] < 0:
            raise RuntimeError("model failed")
        time.sleep(0.05)  # "the model"
        note_inferred()
        time.sleep(0.005)  # "scoring"
        return sizes

    async def scenario(executor: ThreadPoolExecutor) -> None:
        b: Batcher[int] = Batcher(run, executor, max_batch=8, max_delay_s=0.0,
                                  max_queue_images=100, observers=(stats,))  # fmt: skip
        assert await b.submit(np.zeros((3, 1, 2, 2), np.float32), 5.0) == 3
        with pytest.raises(InferenceFailed, match="inference failed"):
            await b.submit(np.full((2, 1, 2, 2), -1, np.float32), 5.0)

    with ThreadPoolExecutor(1) as executor:
        asyncio.run(scenario(executor))
    snap = stats.snapshot()
    assert snap.execution_count == 1 and list(snap.batches) == [3]
    infer, output = snap.steps["compute_infer"], snap.steps["compute_output"]
    assert infer.count == output.count == 1
    assert infer.ns >= 50e6 and 5e6 <= output.ns < 50e6
    assert snap.batches[3].compute_infer == infer
