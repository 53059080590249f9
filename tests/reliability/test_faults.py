"""Faults: broken model files, an onnxruntime error inside a batch, clients that vanish, SIGTERM
under load. Each test shows that no accepted request is lost and the process stays up (or
drains and exits 0)."""

from __future__ import annotations

import json
import logging
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from fastapi.testclient import TestClient

from benchmarks.soak import ServeProcess
from service.config import Settings
from service.main import create_app
from service.manifest import MANIFEST_FILE, MODEL_FILE, sha256_file
from tests.conftest import LiveServer
from tests.reliability.conftest import RCE, app_state, loaded_model, pixels, slow_down, v2_binary
from tests.reliability.test_overload import metric

CE = "tiny-ce"


def _flip_byte(vdir: Path) -> None:
    data = bytearray((vdir / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (vdir / MODEL_FILE).write_bytes(bytes(data))


def _garbage_with_matching_sha(vdir: Path) -> None:
    """Not an ONNX graph, but the manifest vouches for it: onnxruntime itself must refuse it."""
    (vdir / MODEL_FILE).write_bytes(b"\x08\x07" + bytes(range(256)) * 40)
    _edit_manifest(vdir, sha256=sha256_file(vdir / MODEL_FILE))


def _overwrite(path: Path, text: str) -> None:
    path.write_text(text)


def _edit_manifest(vdir: Path, **changes: object) -> None:
    m = json.loads((vdir / MANIFEST_FILE).read_text())
    m.update(changes)
    (vdir / MANIFEST_FILE).write_text(json.dumps(m))


BREAKAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    # name: (what is done to tiny-ce/1, what its error must say)
    "flipped_byte": (_flip_byte, "does not match the manifest's sha256"),
    "model_missing": (lambda d: (d / MODEL_FILE).unlink(), "model.onnx is missing"),
    "garbage_with_matching_sha": (_garbage_with_matching_sha, "failed to load"),
    "input_shape_differs": (
        lambda d: _edit_manifest(d, input_shape=[1, 32, 32]),
        "does not match the manifest's input_shape",
    ),
    "class_count_differs": (
        lambda d: _edit_manifest(d, classes=["a", "b", "c"]),
        "does not have the manifest's 3 classes",
    ),
    "manifest_not_json": (lambda d: _overwrite(d / MANIFEST_FILE, "{oops"), "manifest.json is"),
    "manifest_missing": (lambda d: (d / MANIFEST_FILE).unlink(), "manifest.json is missing"),
}


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_broken_model_version_is_reported_and_the_rest_serves(
    writable_repo: Path, name: str
) -> None:
    breakage, needle = BREAKAGES[name]
    breakage(writable_repo / CE / "1")
    x = {"instances": pixels(2)[:, 0].tolist()}
    with TestClient(create_app(Settings(model_repository=writable_repo))) as c:
        ready = c.get("/v2/health/ready")
        assert ready.status_code == 503 and needle in ready.json()["models"][f"{CE}/1"]
        listed = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        assert not listed[CE]["ready"] and needle in listed[CE]["error"]
        r = c.post(f"/v1/models/{CE}/predict", json=x)
        assert r.status_code == 503 and "no ready version" in r.json()["error"]
        assert c.get(f"/v2/models/{CE}/ready").status_code == 503
        assert c.post(f"/v1/models/{RCE}/predict", json=x).status_code == 200  # the rest serves
        for text in (ready.text, c.get("/v1/models").text, r.text):
            assert str(writable_repo) not in text and "Traceback" not in text


def _wrong_dtype(model_run: Callable[..., object], session: object) -> Callable[..., object]:
    """A model.run whose first call makes onnxruntime itself raise (a float64 input)."""
    calls = {"n": 0}

    def run(x: npt.NDArray[np.float32]) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            inp = session.get_inputs()[0].name  # type: ignore[attr-defined]
            return session.run(None, {inp: x.astype(np.float64)})  # type: ignore[attr-defined]
        return model_run(x)

    return run


def test_onnxruntime_error_fails_only_its_batch(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    settings = Settings(model_repository=model_repo, inference_threads=1, max_batch_size=64)
    with LiveServer(settings) as server:
        model = loaded_model(server)
        slow_down(monkeypatch, model, 0.1)  # so requests pile up into shared batches
        onnx = model.scorer.onnx  # every batch runs here: slow_down checked there is no other
        monkeypatch.setattr(onnx, "run", _wrong_dtype(onnx.run, onnx.session))
        # Models with a K-density kernel set run logits and features in one call.
        monkeypatch.setattr(onnx, "run_with_features",
                            _wrong_dtype(onnx.run_with_features, onnx.session))  # fmt: skip

        def call(i: int) -> httpx.Response:
            body, headers = v2_binary(pixels(2, seed=i), f"r{i}")
            return httpx.post(
                f"{server.url}/v2/models/{RCE}/infer",
                content=body,
                headers={**headers, "X-Request-ID": f"r{i}"},
                timeout=30,
            )

        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(call, range(12)))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 500} and 500 in codes and 200 in codes, codes
        for i, r in enumerate(responses):  # every request answered once, with its own id
            assert r.headers["x-request-id"] == f"r{i}"
            if r.status_code == 500:
                assert r.json() == {
                    "error": "inference failed for this batch; the server keeps serving"
                }
        assert call(99).status_code == 200  # the process and the model still serve
        text = httpx.get(f"{server.url}/metrics").text
        assert metric(text, "notsure_batch_failures_total", model=RCE) == 1
    # Clients get a generic message; the cause (onnxruntime's own) is in the log, with ids.
    logged = caplog.text
    assert "batch of" in logged and "tensor(double)" in logged
    assert all(f"id=r{i}" in logged for i, c in enumerate(codes) if c == 500)


def _send_raw(
    port: int, body: bytes, path: str, headers: dict[str, str], content_length: int | None = None
) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    length = len(body) if content_length is None else content_length
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n{head}\r\n".encode() + body
    )
    return sock


def test_clients_that_vanish_lose_nothing_for_the_others(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(model_repository=model_repo, inference_threads=1, max_batch_size=4)
    with LiveServer(settings) as server:
        model = loaded_model(server)
        state = app_state(server)
        batches = slow_down(monkeypatch, model, 0.3)
        url = f"{server.url}/v2/models/{RCE}/infer"
        with ThreadPoolExecutor(2) as pool:
            body, headers = v2_binary(pixels(4), "first")
            first = pool.submit(httpx.post, url, content=body, headers=headers, timeout=30)
            time.sleep(0.1)  # the first batch is running; what comes next waits in the queue
            body, headers = v2_binary(pixels(4, seed=1), "gone")
            gone = _send_raw(server.port, body, f"/v2/models/{RCE}/infer", headers)
            # A client that dies half-way through its upload, and one that hangs up queued.
            half = _send_raw(
                server.port,
                body[:100],
                f"/v2/models/{RCE}/infer",
                headers,
                content_length=len(body),
            )
            time.sleep(0.05)
            gone.close()
            half.close()
            body, headers = v2_binary(pixels(4, seed=2), "last")
            last = pool.submit(httpx.post, url, content=body, headers=headers, timeout=30)
            assert first.result().status_code == 200 and first.result().json()["id"] == "first"
            assert last.result().status_code == 200 and last.result().json()["id"] == "last"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (model.batcher.queued_images or state.arrivals.count):
            time.sleep(0.05)
        # Nothing is stuck: the queue is empty, no request counts as arriving (which would make
        # the batcher wait for it), no 500 was recorded, and the server still answers.
        assert model.batcher.queued_images == 0 and state.arrivals.count == 0
        assert all(n == 4 for n in batches) and len(batches) in (2, 3)  # the vanished one may run
        text = httpx.get(f"{server.url}/metrics").text
        assert metric(text, "notsure_requests_total", code="500") == 0
        assert metric(text, "notsure_requests_total", code="499") == 1  # the half upload
        assert metric(text, "notsure_inflight_requests", model=RCE) == 0
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


@pytest.mark.slow
def test_sigterm_under_load_drains_refuses_new_and_exits_0(
    serve: Callable[..., ServeProcess],
) -> None:
    # A request timeout well above the work queued: this test is about draining, and on a slow
    # machine the last requests waited past the default 10 s and were answered 504 (rightly).
    server = serve(inference_threads="1", max_batch_size="64", max_queue_images="32768",
                   max_instances="2048", request_timeout_s="60")  # fmt: skip
    url = f"{server.url}/v2/models/{RCE}/infer"
    # ~25,000 images behind one inference thread: seconds of work even for the tiny model on a
    # quiet machine, so requests are still queued when the signal comes.
    n, images = 12, 2048

    def call(i: int) -> tuple[str, httpx.Response | Exception, float]:
        body, headers = v2_binary(pixels(images, seed=i), f"d{i}")
        try:
            r = httpx.post(
                url, content=body, headers={**headers, "X-Request-ID": f"d{i}"}, timeout=90
            )
        except httpx.HTTPError as exc:
            return f"d{i}", exc, time.monotonic()
        return f"d{i}", r, time.monotonic()

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(call, i) for i in range(n)]
        # Signal as soon as the server holds every request (a fixed sleep let a quiet machine
        # finish them all first, and then nothing was in flight to drain).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = httpx.get(f"{server.url}/metrics").text
            if metric(text, "notsure_inflight_requests", model=RCE) >= n:
                break
            time.sleep(0.01)
        sigterm_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        probes: list[tuple[float, int | None]] = []  # (s after SIGTERM, status; None: refused)
        while server.proc.poll() is None:  # type: ignore[union-attr]
            try:
                status: int | None = httpx.get(
                    f"{server.url}/v2/health/live", timeout=2
                ).status_code
            except httpx.TransportError:
                status = None
            probes.append((time.monotonic() - sigterm_at, status))
            time.sleep(0.05)
        results = [f.result() for f in futures]
    code = server.proc.returncode  # type: ignore[union-attr]
    answered_after = sum(1 for _, _, t in results if t > sigterm_at)
    for rid, r, _ in results:  # every in-flight request finished, answered once, with its id
        assert isinstance(r, httpx.Response), (rid, r)
        assert r.status_code == 200 and r.json()["id"] == rid
        assert len(r.json()["outputs"][0]["data"]) == images
    assert answered_after > 0  # they really were in flight when the signal came
    # uvicorn notices the signal on its next 0.1 s tick; from then on new connections are refused
    # while the in-flight requests drain.
    first_refusal = next(t for t, status in probes if status is None)
    assert all(status is None for t, status in probes if t >= first_refusal), probes
    assert first_refusal < 1.0
    assert code == 0, server.log()[-2000:]
    assert "drained after signal 15" in server.log()
