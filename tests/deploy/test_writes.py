"""The pods of deploy/k8s and deploy/kserve run with a read-only root filesystem and one
writable emptyDir at /tmp (TMPDIR): the service must write nothing anywhere else. Checked by
running `notsure serve` as an unprivileged user, who can write only into world-writable folders,
with TMPDIR pointing at a folder of its own; after every kind of request (a multipart upload big
enough to spool to disk among them) no file of that user exists outside TMPDIR. (The spooled
upload itself is an unnamed O_TMPFILE in tempfile.gettempdir(), TMPDIR here and /tmp in a pod,
so no scan can see it; what is checked is that nothing else is written.)"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from benchmarks.soak import SERVER_CALLS, build_calls
from tests.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
UID = 65534  # nobody
ROOT = Path(__file__).resolve().parents[2]


def as_nobody(argv: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", *argv]


def writable_places() -> list[str]:
    """Every folder an unprivileged user may create files in: the world-writable ones."""
    found = subprocess.run(["find", "/", "-xdev", "-type", "d", "-perm", "-0002"],
                           capture_output=True, text=True, timeout=120).stdout.split()  # fmt: skip
    return [*found, "/dev/shm"]


def files_of_nobody(places: list[str], outside: Path) -> list[str]:
    out = subprocess.run(["find", *places, "-user", str(UID)], capture_output=True, text=True,
                         timeout=120).stdout.split()  # fmt: skip
    return [f for f in out if not Path(f).is_relative_to(outside)]


@pytest.fixture
def sandbox(model_repo: Path) -> Iterator[tuple[Path, Path]]:
    """A model repository nobody can read, and a TMPDIR only nobody writes to."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the service as an unprivileged user")
    base = Path(tempfile.mkdtemp(prefix="notsure-ro-"))
    base.chmod(0o755)
    repo = base / "models"
    shutil.copytree(model_repo, repo)
    for p in [repo, *repo.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    tmp = base / "tmp"
    tmp.mkdir()
    os.chown(tmp, UID, UID)
    yield repo, tmp
    shutil.rmtree(base)


def big_png() -> bytes:
    """An 800x800 RGB noise PNG: about 1.9 MB, past Starlette's 1 MiB in-memory spool."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (800, 800, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_the_service_writes_only_under_tmpdir(sandbox: tuple[Path, Path]) -> None:
    repo, tmp = sandbox
    places = writable_places()
    assert files_of_nobody(places, tmp) == []
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTSURE_")}
    env.update(NOTSURE_HOST="127.0.0.1", NOTSURE_PORT=str(port), NOTSURE_DEVICE="cpu",
               NOTSURE_MODEL_REPOSITORY=str(repo), TMPDIR=str(tmp), HOME="/nonexistent",
               PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(ROOT))  # fmt: skip
    log = tmp.parent / "serve.log"
    with log.open("wb") as out:
        argv = as_nobody([sys.executable, "-m", "notsure.cli", "serve"])
        proc = subprocess.Popen(argv, env=env, cwd=repo, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=60) as client:
            calls = list(SERVER_CALLS)
            for i, m in enumerate(client.get("/v1/models").json()["models"]):
                calls += build_calls(m["name"], (1, 28, 28), i)
            for c in calls:
                body = c.body_prefix + b"id" + c.body_suffix if c.body_suffix else c.body_prefix
                files = list(c.files) or None
                r = client.request(c.method, c.path, content=body or None,
                                   headers=dict(c.headers), files=files)  # fmt: skip
                assert r.status_code == 200, (c.kind, r.text)
            png = big_png()
            assert len(png) > 1024 * 1024
            r = client.post("/v1/models/tiny-rce/predict/files",
                            files=[("files", ("big.png", png, "image/png"))])  # fmt: skip
            assert r.status_code < 500, r.text  # parsed (spooled), then answered
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert proc.returncode == 0, log.read_text()
    assert files_of_nobody(places, tmp) == []


def test_the_scan_finds_a_file_written_elsewhere(sandbox: tuple[Path, Path]) -> None:
    _, tmp = sandbox
    stray = Path(tempfile.gettempdir()) / f"stray-{os.getpid()}"
    code = f"open({str(stray)!r}, 'w').write('x')"
    subprocess.run(as_nobody([sys.executable, "-c", code]), check=True, timeout=60)
    try:
        assert files_of_nobody([str(stray.parent)], tmp) == [str(stray)]
    finally:
        stray.unlink()
