"""Fixtures for the reliability suite: the service as a `notsure serve` process or an in-process
live server, models made slow or failing on purpose, and request builders."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from benchmarks.soak import ServeProcess
from service import v2codec
from service.runner import LoadedModel
from service.state import AppState
from tests.conftest import LiveServer

RCE = "tiny-rce"
SHAPE = (1, 28, 28)


def pixels(n: int, seed: int = 0) -> npt.NDArray[np.float32]:
    """(n, 1, 28, 28) float32 noise in [0, 1]; decisions do not matter here, answers do."""
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)


def v2_binary(x: npt.NDArray[np.float32], rid: str | None = None) -> tuple[bytes, dict[str, str]]:
    """A KServe V2 binary-extension infer body for (B, 1, 28, 28) images, and its headers."""
    return v2codec.encode_request([("input", x)], request_id=rid)


def app_state(server: LiveServer) -> AppState:
    """The state the live server's app built in its lifespan."""
    state: AppState = server.app.state.notsure  # type: ignore[union-attr]
    return state


def loaded_model(server: LiveServer, name: str = RCE) -> LoadedModel:
    """Version 1 of the model, as the live server loaded it."""
    loaded = app_state(server).repository.versions[name][1].loaded
    assert loaded is not None, f"{name}/1 did not load"
    return loaded


def slow_down(monkeypatch: pytest.MonkeyPatch, model: LoadedModel, seconds: float) -> list[int]:
    """Make every batch of this model version take at least `seconds`; returns batch sizes run.
    Only its one-slot session is slowed: the settings must leave it no lone-batch session."""
    assert model.lone_scorer is None, "a lone batch would run on a session not slowed down"
    session = model.scorer.onnx
    run, run_with_features = session.run, session.run_with_features
    sizes: list[int] = []

    def slow(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        sizes.append(int(x.shape[0]))
        time.sleep(seconds)
        return run(x)

    def slow_with_features(x: npt.NDArray[np.float32]) -> Any:
        sizes.append(int(x.shape[0]))
        time.sleep(seconds)
        return run_with_features(x)

    # Models with a K-density kernel set run both outputs at once; slow that path down too.
    monkeypatch.setattr(session, "run", slow)
    monkeypatch.setattr(session, "run_with_features", slow_with_features)
    return sizes


@pytest.fixture
def serve(model_repo: Path, tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Start `notsure serve` subprocesses on 127.0.0.1 (stopped at teardown); settings as env."""
    started: list[ServeProcess] = []

    def start(repo: Path | None = None, **settings: str) -> ServeProcess:
        env = {f"NOTSURE_{k.upper()}": v for k, v in settings.items()}
        proc = ServeProcess(repo or model_repo, tmp_path / f"serve-{len(started)}.log", env)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()
