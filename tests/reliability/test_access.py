"""Access: API keys (several, rotated without a restart, compared in constant time), open or
protected health and metrics, CORS off by default, names that cannot leave the repository,
request ids in the log, no internals in error bodies, nothing unpickled."""

from __future__ import annotations

import ast
import hashlib
import hmac
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import service
from benchmarks.soak import ServeProcess
from service import security
from service.config import Settings
from service.main import create_app
from service.manifest import MANIFEST_FILE, MODEL_FILE, Manifest
from tests.reliability.conftest import RCE, pixels

X = {"instances": pixels(1)[:, 0].tolist()}
GUARDED = [
    ("POST", f"/v1/models/{RCE}/predict"),
    ("POST", f"/v1/models/{RCE}/versions/1/predict"),
    ("GET", "/v1/models"),
    ("GET", f"/v2/models/{RCE}"),
    ("GET", f"/v2/models/{RCE}/ready"),
    ("POST", f"/v2/models/{RCE}/infer"),
]


Headers = Mapping[str, str] | Mapping[bytes, bytes]


def call(c: TestClient, method: str, path: str, headers: Headers | None = None) -> int:
    if method == "POST" and path.endswith("/infer"):
        body = {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 28, 28],
                    "datatype": "FP32",
                    "data": pixels(1).reshape(-1).tolist(),
                }
            ]
        }
        return c.post(path, json=body, headers=headers).status_code
    if method == "POST":
        return c.post(path, json=X, headers=headers).status_code
    return c.get(path, headers=headers).status_code


@pytest.fixture
def keyed(model_repo: Path, tmp_path: Path) -> Iterator[tuple[TestClient, Path]]:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# rotated by the operator\nfile-key-1\n\n  file-key-2  \n")
    settings = Settings(
        model_repository=model_repo, api_keys=["static-a", "static-b"], api_keys_file=keys_file
    )
    with TestClient(create_app(settings)) as c:
        yield c, keys_file


@pytest.mark.parametrize(("method", "path"), GUARDED)
def test_every_predict_and_admin_route_needs_a_key(
    keyed: tuple[TestClient, Path], method: str, path: str
) -> None:
    c, _ = keyed
    for bad in [
        None,
        {"Authorization": "Bearer nope"},
        {"X-API-Key": "static-"},
        {"Authorization": "Basic static-a"},
        {b"X-API-Key": "statïc-a".encode()},
    ]:
        assert call(c, method, path, bad) == 401, bad
    for good in [
        {"Authorization": "Bearer static-a"},
        {"X-API-Key": "static-b"},
        {"authorization": "bearer file-key-1"},
        {"X-API-Key": "file-key-2"},
    ]:
        assert call(c, method, path, good) == 200, good


def test_401_says_how_to_authenticate(keyed: tuple[TestClient, Path]) -> None:
    r = keyed[0].post(f"/v1/models/{RCE}/predict", json=X)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["field"] == "Authorization" and "X-API-Key" in r.json()["fix"]


def test_keys_file_rotates_without_restart(keyed: tuple[TestClient, Path]) -> None:
    c, keys_file = keyed
    path = f"/v1/models/{RCE}/predict"
    assert c.post(path, json=X, headers={"X-API-Key": "file-key-1"}).status_code == 200
    keys_file.write_text("file-key-3\n")
    st = keys_file.stat()  # a later mtime, as any real rewrite has
    os.utime(keys_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert c.post(path, json=X, headers={"X-API-Key": "file-key-1"}).status_code == 401
    assert c.post(path, json=X, headers={"X-API-Key": "file-key-3"}).status_code == 200
    keys_file.unlink()  # file gone: only the keys from settings are left
    assert c.post(path, json=X, headers={"X-API-Key": "file-key-3"}).status_code == 401
    assert c.post(path, json=X, headers={"X-API-Key": "static-a"}).status_code == 200


def test_every_key_is_compared_in_constant_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # what service.security calls
    ring = security.KeyRing(["k1", "k2", "k3"], None)
    assert ring.accepts("k1")  # matches the first key, yet all three are compared: no early exit
    assert [b for _, b in compared] == [b"k1", b"k2", b"k3"]
    compared.clear()
    assert not ring.accepts("k")  # a prefix of a key is not a key
    assert len(compared) == 3 and not ring.accepts("") and not ring.accepts(None)


def test_health_and_metrics_open_by_default_protected_when_asked(model_repo: Path) -> None:
    open_paths = ["/v2/health/live", "/v2/health/ready", "/v2", "/metrics"]
    with TestClient(create_app(Settings(model_repository=model_repo, api_keys=["k"]))) as c:
        assert [c.get(p).status_code for p in open_paths] == [200] * 4
    settings = Settings(model_repository=model_repo, api_keys=["k"], protect_health=True)
    with TestClient(create_app(settings)) as c:
        assert [c.get(p).status_code for p in open_paths] == [401, 401, 401, 200]
        assert c.get("/v2/health/ready", headers={"X-API-Key": "k"}).status_code == 200
    settings = Settings(model_repository=model_repo, api_keys=["k"], protect_metrics=True)
    with TestClient(create_app(settings)) as c:
        assert [c.get(p).status_code for p in open_paths] == [200, 200, 200, 401]
        assert c.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200


def test_keys_from_the_environment_in_a_real_process(serve: Callable[..., ServeProcess]) -> None:
    import httpx

    server = serve(api_keys="env-1, env-2", protect_metrics="true")
    url = f"{server.url}/v1/models/{RCE}/predict"
    assert httpx.post(url, json=X).status_code == 401
    assert httpx.post(url, json=X, headers={"X-API-Key": "env-2"}).status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 401


def test_cors_is_off_by_default_and_exact_when_configured(model_repo: Path) -> None:
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    with TestClient(create_app(Settings(model_repository=model_repo))) as c:
        r = c.post(f"/v1/models/{RCE}/predict", json=X, headers={"Origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        r = c.options(f"/v1/models/{RCE}/predict", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
    settings = Settings(model_repository=model_repo, cors_origins=["https://app.example"])
    with TestClient(create_app(settings)) as c:
        r = c.post(f"/v1/models/{RCE}/predict", json=X, headers={"Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.options(f"/v1/models/{RCE}/predict", headers=preflight)
        assert "access-control-allow-origin" not in r.headers


@pytest.fixture
def repo_with_a_neighbour(writable_repo: Path) -> Path:
    """A servable model *outside* the repository, next to it: what a traversal would reach."""
    shutil.copytree(writable_repo / RCE, writable_repo.parent / "secret")
    return writable_repo


@pytest.mark.parametrize(
    "name",
    [
        "..%2Fsecret",
        "%2e%2e%2fsecret",
        "tiny-rce%2F..%2F..%2Fsecret",
        "..%5Csecret",
        "%2Fetc%2Fpasswd",
        "secret%00",
        "Tiny-RCE",
        "a" * 65,
        ".hidden",
        "tiny-rce%20",
    ],
)
def test_model_names_cannot_leave_the_repository(repo_with_a_neighbour: Path, name: str) -> None:
    with TestClient(create_app(Settings(model_repository=repo_with_a_neighbour))) as c:
        # A name outside the pattern is a malformed request: 422 on the native API, 400 on the
        # KServe V2 routes (the Open Inference Protocol's status); an unknown one 404.
        for r, statuses in [
            (c.post(f"/v1/models/{name}/predict", json=X), (404, 422)),
            (c.get(f"/v2/models/{name}"), (400, 404)),
            (c.get(f"/v2/models/{name}/ready"), (400, 404)),
        ]:
            assert r.status_code in statuses, (name, r.status_code, r.text)
            assert str(repo_with_a_neighbour.parent) not in r.text


@pytest.mark.parametrize(
    "version", ["0", "-1", "1.5", "1e3", "99999999999", "%2E%2E", "1%2F..", "01x"]
)
def test_versions_are_positive_integers_only(model_repo: Path, version: str) -> None:
    with TestClient(create_app(Settings(model_repository=model_repo))) as c:
        r = c.post(f"/v1/models/{RCE}/versions/{version}/predict", json=X)
        assert r.status_code in (404, 422), (version, r.status_code)


def test_request_ids_reach_the_log_and_unsafe_ones_are_replaced(
    model_repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="notsure.access")
    with TestClient(create_app(Settings(model_repository=model_repo))) as c:
        r = c.post("/v1/models/nope/predict", json=X, headers={"X-Request-ID": "trace-42.a:b"})
        assert r.headers["x-request-id"] == "trace-42.a:b"
        assert "id=trace-42.a:b" in caplog.text and "-> 404" in caplog.text
        for unsafe in ["x\r\nFAKE LOG LINE", "has space", "a" * 65, "ünï"]:
            r = c.post(
                "/v1/models/nope/predict", json=X, headers={b"X-Request-ID": unsafe.encode()}
            )
            rid = r.headers["x-request-id"]
            assert len(rid) == 32 and int(rid, 16) >= 0 and f"id={rid}" in caplog.text
    assert "FAKE LOG LINE" not in caplog.text


def test_unexpected_errors_hide_their_internals(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.api.routes import native

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"secret detail at {model_repo / RCE / MODEL_FILE}")

    monkeypatch.setattr(native, "open_instance", boom)
    settings = Settings(model_repository=model_repo)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        r = c.post(f"/v1/models/{RCE}/predict", json=X, headers={"X-Request-ID": "oops-1"})
    assert r.status_code == 500
    assert r.json() == {"error": "internal error; this is a bug in notsure", "request_id": "oops-1"}


def _sessions_seen(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """What onnxruntime's InferenceSession is created from, call by call."""
    from service import runtime

    seen: list[object] = []
    real = runtime.ort.InferenceSession

    def session(model: object, *args: object, **kwargs: object) -> object:
        seen.append(model)
        return real(model, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime.ort, "InferenceSession", session)
    return seen


def test_model_files_load_only_with_a_matching_sha256(
    writable_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _sessions_seen(monkeypatch)
    onnx = writable_repo / "tiny-ce" / "1" / MODEL_FILE
    onnx.write_bytes(onnx.read_bytes() + b"\0")  # one appended byte: same graph, other sha256
    with TestClient(create_app(Settings(model_repository=writable_repo))) as c:
        assert c.get("/v2/health/ready").status_code == 503
    # onnxruntime only ever got bytes, and only the verified model's (once, or twice with the
    # every-core session for lone batches on a multi-core host).
    want = Manifest.load(writable_repo / RCE / "1" / MANIFEST_FILE).sha256
    assert len(seen) in (1, 2)
    assert all(isinstance(m, bytes) and hashlib.sha256(m).hexdigest() == want for m in seen)


def test_a_model_file_swapped_after_its_check_is_not_loaded(
    writable_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is replaced (by another valid model) the moment after it was read for the
    check: what onnxruntime loads is still the verified content."""
    seen = _sessions_seen(monkeypatch)
    onnx = writable_repo / RCE / "1" / MODEL_FILE
    verified, other = onnx.read_bytes(), (writable_repo / "tiny-ce" / "1" / MODEL_FILE).read_bytes()
    real_read = Path.read_bytes

    def read_then_swap(self: Path) -> bytes:
        data = real_read(self)
        if self == onnx:
            onnx.write_bytes(other)
        return data

    monkeypatch.setattr(Path, "read_bytes", read_then_swap)
    settings = Settings(model_repository=writable_repo, models=[RCE])
    with TestClient(create_app(settings)) as c:
        assert c.get("/v2/health/ready").status_code == 200
    assert onnx.read_bytes() == other  # the swap did happen
    assert seen and all(m == verified for m in seen)


FORBIDDEN_MODULES = {
    "pickle",
    "cPickle",
    "dill",
    "joblib",
    "cloudpickle",
    "shelve",
    "marshal",
    "torch",
}


def test_service_never_unpickles() -> None:
    """No pickle-capable loader anywhere in service/: weights arrive only as sha256-checked ONNX."""
    for path in Path(service.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                assert not {n.split(".")[0] for n in names} & FORBIDDEN_MODULES, (path, names)
            if isinstance(node, ast.Attribute) and node.attr in ("load", "loads"):
                base = ast.unparse(node.value)
                assert base not in ("np", "numpy", "pickle", "torch"), (path, ast.unparse(node))
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                pytest.fail(f"allow_pickle in {path}")
