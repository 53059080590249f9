"""Model control (Triton's model repository extension) with the real tritonclient, HTTP and
gRPC, against live servers: the index, load, unload and reload, polling, refused versions and
requests in flight while a version is replaced or unloaded."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

tritonclient_http = pytest.importorskip("tritonclient.http")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
import grpc  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as pb_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from benchmarks.model_control import add_version  # noqa: E402
from service.config import Settings  # noqa: E402
from service.manifest import MANIFEST_FILE, MODEL_FILE, Manifest  # noqa: E402
from service.runner import LoadedModel  # noqa: E402
from tests.conftest import LiveServer  # noqa: E402
from tests.reliability.conftest import RCE, app_state, loaded_model  # noqa: E402
from training.data import synthetic  # noqa: E402

CE = "tiny-ce"
X = synthetic(16, seed=3).x.numpy()  # (16, 1, 28, 28) float32 digits the tiny models know


@contextmanager
def serving(repo: Path, **settings: Any) -> Iterator[tuple[LiveServer, Any, Any]]:
    """A live server over `repo` and tritonclient's HTTP and gRPC clients of it."""
    with LiveServer(Settings(model_repository=repo, **settings)) as server:
        http = tritonclient_http.InferenceServerClient(f"127.0.0.1:{server.port}")
        grpc_client = tritonclient_grpc.InferenceServerClient(server.grpc_target)
        try:
            yield server, http, grpc_client
        finally:
            http.close()
            grpc_client.close()


def index(http: Any) -> list[tuple[str, str, str, str]]:
    return [
        (e["name"], e["version"], e["state"], e["reason"])
        for e in http.get_model_repository_index()
    ]


def grpc_index(client: Any) -> list[tuple[str, str, str, str]]:
    return [
        (m.name, m.version, m.state, m.reason) for m in client.get_model_repository_index().models
    ]


def infer(http: Any, model: str = RCE, version: str = "") -> tuple[dict[str, Any], Any]:
    """tritonclient's infer of X: the response's JSON header and its result."""
    inp = tritonclient_http.InferInput("input", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    result = http.infer(model, [inp], model_version=version)
    return result.get_response(), result


def series(server: LiveServer, name: str, **labels: str) -> list[float]:
    """The values of a metric's series that carry these labels (empty when there is none)."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return [
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def wait_for(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_none_lists_the_repository_and_refuses_load_and_unload(live_server: LiveServer) -> None:
    http = tritonclient_http.InferenceServerClient(f"127.0.0.1:{live_server.port}")
    client = tritonclient_grpc.InferenceServerClient(live_server.grpc_target)
    try:
        want = [(CE, "1", "READY", ""), (RCE, "1", "READY", "")]
        assert index(http) == want and grpc_index(client) == want
        assert "model_repository" in http.get_server_metadata()["extensions"]
        # {"ready": true} (tritonclient has no argument for it): the same two, both ready.
        r = httpx.post(f"{live_server.url}/v2/repository/index", json={"ready": True})
        assert [(e["name"], e["state"]) for e in r.json()] == [(CE, "READY"), (RCE, "READY")]
        for bad in ({"ready": 0}, {"ready": "yes"}, {"ready": True, "all": True}):
            r = httpx.post(f"{live_server.url}/v2/repository/index", json=bad)
            assert r.status_code == 400 and "error" in r.json(), r.text
        for call in (http.load_model, http.unload_model, client.load_model, client.unload_model):
            with pytest.raises(InferenceServerException, match="model_control=none"):
                call(RCE)
        assert http.is_model_ready(RCE) and http.is_server_ready()
        with grpc.insecure_channel(live_server.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=RCE))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "NOTSURE_MODEL_CONTROL=explicit" in str(err.value.details())
    finally:
        http.close()
        client.close()


def test_the_repository_routes_want_the_api_key(model_repo: Path) -> None:
    with serving(model_repo, api_keys=["s3cret"]) as (server, http, client):
        for call in (http.get_model_repository_index, client.get_model_repository_index):
            with pytest.raises(InferenceServerException, match="missing or unknown API key"):
                call()
        r = httpx.post(f"{server.url}/v2/repository/models/{RCE}/load")
        assert r.status_code == 401 and r.json()["field"] == "Authorization"
        keyed = http.get_model_repository_index(headers={"Authorization": "Bearer s3cret"})
        assert [e["name"] for e in keyed] == [CE, RCE]
        grpc_keyed = client.get_model_repository_index(headers={"x-api-key": "s3cret"})
        assert [m.name for m in grpc_keyed.models] == [CE, RCE]


def test_model_control_needs_one_worker_process() -> None:
    for mode in ("poll", "explicit"):
        with pytest.raises(ValidationError, match=f"model_control={mode} needs workers=1"):
            Settings(model_control=mode, workers=2)
    assert Settings(model_control="none", workers=2).workers == 2


def test_explicit_load_serves_a_copied_version_and_unload_stops_the_model(
    writable_repo: Path,
) -> None:
    with serving(writable_repo, model_control="explicit", models=[RCE]) as (server, http, client):
        # tiny-ce is in the repository but not loaded (not in `models`).
        assert index(http) == [(CE, "1", "UNAVAILABLE", "not loaded"), (RCE, "1", "READY", "")]
        add_version(writable_repo, RCE, 1, 2)
        assert (RCE, "2", "UNAVAILABLE", "not loaded") in index(http)
        with pytest.raises(InferenceServerException, match="has no version 2"):
            infer(http, version="2")
        http.load_model(RCE)
        assert index(http)[1:] == [(RCE, "1", "READY", ""), (RCE, "2", "READY", "")]
        latest, r2 = infer(http)  # no version: the highest ready one
        _, r1 = infer(http, version="1")
        assert latest["model_version"] == "2"
        np.testing.assert_array_equal(r2.as_numpy("label"), r1.as_numpy("label"))  # same files
        assert series(server, "notsure_model_info", model=RCE, version="2") == [1.0]
        assert series(server, "notsure_model_ready", model=RCE, version="2") == [1.0]

        client.unload_model(RCE)
        assert grpc_index(client)[1:] == [
            (RCE, "1", "UNAVAILABLE", "unloaded"),
            (RCE, "2", "UNAVAILABLE", "unloaded"),
        ]
        assert not http.is_model_ready(RCE) and not client.is_model_ready(RCE, "2")
        with pytest.raises(InferenceServerException, match="has no ready version"):
            infer(http)
        for name in ("notsure_model_info", "notsure_model_ready", "notsure_threshold"):
            assert series(server, name, model=RCE) == [], name
        assert http.is_server_ready()  # unloaded on request: readiness does not wait for it

        client.load_model(CE)  # any model of the repository, not only those loaded at start
        assert infer(http, CE)[0]["model_version"] == "1"
        assert series(server, "notsure_model_info", model=CE, version="1") == [1.0]
        with pytest.raises(InferenceServerException, match="no model named 'nope'"):
            http.load_model("nope")
        with pytest.raises(InferenceServerException, match="'config' is not supported"):
            http.load_model(CE, config="{}")


def test_reload_picks_up_a_changed_threshold(writable_repo: Path) -> None:
    with serving(writable_repo, model_control="explicit", models=[RCE]) as (server, http, _):
        before, r = infer(http)
        manifest = Manifest.load(writable_repo / RCE / "1" / MANIFEST_FILE)
        assert before["parameters"]["threshold"] == pytest.approx(manifest.threshold)
        j = r.as_numpy("j_score")
        new_t = float(np.median(j))  # half of these images on each side of the new T
        assert new_t != pytest.approx(manifest.threshold)
        path = writable_repo / RCE / "1" / MANIFEST_FILE
        manifest.model_copy(update={"threshold": new_t}).save(path)
        http.load_model(RCE)
        after, r = infer(http)
        assert after["model_version"] == "1"
        assert after["parameters"]["threshold"] == pytest.approx(new_t)
        want = np.where(r.as_numpy("j_score") >= new_t, r.as_numpy("probabilities").argmax(1), -1)
        np.testing.assert_array_equal(r.as_numpy("label"), want)
        assert (want == -1).any() and (want != -1).any()
        t_series = series(server, "notsure_threshold", model=RCE, version="1", score="j_score")
        assert t_series == [pytest.approx(new_t)]


def test_a_version_with_a_wrong_checksum_is_refused_and_the_served_one_keeps_answering(
    writable_repo: Path,
) -> None:
    with serving(writable_repo, model_control="explicit", models=[RCE]) as (server, http, client):
        add_version(writable_repo, RCE, 1, 2, sha256="0" * 64)
        with pytest.raises(
            InferenceServerException, match=r"version 2: model\.onnx does not match"
        ):
            http.load_model(RCE)
        entries = {(n, v): (state, reason) for n, v, state, reason in index(http)}
        assert entries[(RCE, "1")] == ("READY", "")
        state, reason = entries[(RCE, "2")]
        assert state == "UNAVAILABLE" and "does not match the manifest's sha256" in reason
        assert infer(http)[0]["model_version"] == "1"
        assert http.is_server_ready() and not http.is_model_ready(RCE, "2")
        assert series(server, "notsure_model_ready", model=RCE, version="2") == [0.0]

        # A version that serves keeps serving what it loaded when its new files are refused.
        shutil.rmtree(writable_repo / RCE / "2")
        with (writable_repo / RCE / "1" / MODEL_FILE).open("ab") as f:
            f.write(b"tampered")
        with pytest.raises(InferenceServerException, match="version 1: new files refused"):
            client.load_model(RCE)
        assert grpc_index(client)[-1][:3] == (RCE, "1", "READY")
        assert "does not match the manifest's sha256" in grpc_index(client)[-1][3]
        assert infer(http, version="1")[0]["model_version"] == "1"


def test_poll_loads_a_copied_version_reloads_changes_and_unloads_a_removed_one(
    writable_repo: Path,
) -> None:
    settings = {"model_control": "poll", "repository_poll_s": 0.2, "models": [RCE]}
    with serving(writable_repo, **settings) as (_, http, client):
        add_version(writable_repo, RCE, 1, 2)
        wait_for(lambda: (RCE, "2", "READY", "") in index(http))
        assert infer(http)[0]["model_version"] == "2"

        manifest = Manifest.load(writable_repo / RCE / "2" / MANIFEST_FILE)
        new_t = round(manifest.threshold / 2, 6)
        manifest.model_copy(update={"threshold": new_t}).save(
            writable_repo / RCE / "2" / MANIFEST_FILE
        )
        wait_for(lambda: infer(http)[0]["parameters"]["threshold"] == pytest.approx(new_t))

        shutil.rmtree(writable_repo / RCE / "2")
        wait_for(lambda: [v for n, v, _, _ in index(http) if n == RCE] == ["1"])
        assert infer(http)[0]["model_version"] == "1"
        with pytest.raises(InferenceServerException, match="has no version 2"):
            infer(http, version="2")
        assert index(http) == [(RCE, "1", "READY", "")]  # tiny-ce: not in `models`
        with pytest.raises(InferenceServerException, match="model_control=poll"):
            client.load_model(RCE)


def hold_batches(monkeypatch: pytest.MonkeyPatch, model: LoadedModel) -> threading.Event:
    """Every batch of this version waits for the returned event before it runs."""
    gate, session = threading.Event(), model.scorer.onnx
    for method in ("run", "run_with_features"):
        real = getattr(session, method)

        def held(x: Any, real: Any = real) -> Any:
            assert gate.wait(30), "the test never opened the gate"
            return real(x)

        monkeypatch.setattr(session, method, held)
    return gate


def test_requests_in_flight_finish_when_their_version_is_replaced_or_unloaded(
    writable_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One inference thread and no lone-batch session: every batch runs on the held session, in
    # the executor (requests of 4 images: a quiet server runs batches of 2 on the event loop).
    settings = {"model_control": "explicit", "models": [RCE], "inference_threads": 1,
                "lone_batch_all_cores": False}  # fmt: skip
    with serving(writable_repo, **settings) as (server, http, client):
        n, entry = 6, app_state(server).repository.versions[RCE][1]

        def one(i: int) -> str:
            c = tritonclient_http.InferenceServerClient(f"127.0.0.1:{server.port}")
            try:
                inp = tritonclient_http.InferInput("input", [4, 1, 28, 28], "FP32")
                inp.set_data_from_numpy(X[i : i + 4])
                rid: str = c.infer(RCE, [inp], request_id=f"r{i}").get_response()["id"]
                return rid
            finally:
                c.close()

        def reload(name: str) -> None:  # tritonclient.http serves the thread that made it
            c = tritonclient_http.InferenceServerClient(f"127.0.0.1:{server.port}")
            try:
                c.load_model(name)
            finally:
                c.close()

        for change in (reload, client.unload_model):  # a reload (HTTP), an unload (gRPC)
            model = loaded_model(server)
            gate = hold_batches(monkeypatch, model)
            with ThreadPoolExecutor(n + 1) as pool:
                futures = [pool.submit(one, i) for i in range(n)]
                wait_for(lambda m=model: m.batcher.holders == n)  # type: ignore[misc]
                changed = pool.submit(change, RCE)
                wait_for(lambda m=model: entry.loaded is not m)  # type: ignore[misc]
                # No new request reaches the old version now, and the change waits for those
                # admitted for it.
                time.sleep(0.2)
                assert not changed.done() and model.batcher.holders == n
                gate.set()
                changed.result(timeout=30)
                assert model.batcher.holders == 0  # it answered once they all had theirs
                results = [f.result() for f in futures]  # raises if any request failed
            assert sorted(results) == [f"r{i}" for i in range(n)]
        assert entry.state == "UNAVAILABLE"
        with pytest.raises(InferenceServerException, match="has no ready version"):
            infer(http)
