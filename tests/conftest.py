"""Shared fixtures: a tiny *real* model repository (trained, exported to ONNX, calibrated by
`training.tiny`, the same builder every --dry-run uses).

Nothing is mocked: a ResNet-8 learns the synthetic set in a few seconds, goes through the same
export and calibration code as the bundled models, and the service tests serve it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from training.tiny import TINY_MODELS, tiny_repo

__all__ = ["TINY_MODELS"]


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only-by-convention model repository with tiny-rce/1 and tiny-ce/1."""
    base = tmp_path_factory.mktemp("repo")
    return tiny_repo(base / "models", base / "runs", threads=2)


@pytest.fixture
def writable_repo(model_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the model repository that a test may corrupt."""
    import shutil

    dst = tmp_path / "models"
    shutil.copytree(model_repo, dst)
    return dst


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No NOTSURE_* variable from the developer's shell leaks into a test."""
    for key in list(os.environ):
        if key.startswith("NOTSURE_"):
            monkeypatch.delenv(key)
    yield


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """A real uvicorn server for the service on 127.0.0.1, in a thread."""

    def __init__(self, settings: object) -> None:
        import threading

        from service.config import Settings
        from service.server import build_server

        assert isinstance(settings, Settings)
        self.port, self.grpc_port = free_port(), free_port()
        self.settings = settings.model_copy(
            update={"host": "127.0.0.1", "port": self.port, "grpc_port": self.grpc_port}
        )
        self.server = build_server(self.settings)
        self.app = self.server.config.app
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def __enter__(self) -> LiveServer:
        import time

        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("live server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def live_server(model_repo: Path) -> Iterator[LiveServer]:
    """The service on a free loopback port, serving the tiny repository."""
    from service.config import Settings

    with LiveServer(Settings(model_repository=model_repo)) as server:
        yield server


@pytest.fixture
def settings(model_repo: Path) -> Settings:
    """The service's settings over the tiny repository; a test module overrides this fixture to
    change them for its `client`."""
    return Settings(model_repository=model_repo)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """A TestClient of the app built with `settings`, its lifespan run (models loaded)."""
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def image_loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The sizes of the images Pillow decodes during the test (its `ImageFile.load`, spied):
    empty while only headers have been read."""
    from PIL import ImageFile

    loads: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> object:
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return loads
