"""A third-party library's warning inside request handling never turns a request into a 500."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import service.api.deps as deps
from service.config import Settings
from service.main import create_app


def warn_from(module: str) -> None:
    # As a library warns about its own internals: the warning is attributed to its module.
    warnings.warn_explicit("something is deprecated", UserWarning, f"{module}.py", 1, module=module)


def test_third_party_warning_during_a_request_is_not_an_error(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = deps.check_request_key

    def warning_check(state: deps.AppState, request: deps.Request) -> None:
        warn_from("somelibrary.internals")
        real(state, request)

    monkeypatch.setattr(deps, "check_request_key", warning_check)
    settings = Settings(model_repository=model_repo, protect_health=True)
    with TestClient(create_app(settings)) as client, pytest.warns(UserWarning):
        assert client.get("/v2/health/live").status_code == 200


def test_our_own_warnings_stay_errors_in_tests() -> None:
    with pytest.raises(UserWarning):
        warn_from("service.anything")


def test_key_headers_are_not_pydantic_fields(model_repo: Path) -> None:
    """The key is read from the raw headers (both spellings), with no FastAPI Header params."""
    settings = Settings(model_repository=model_repo, api_keys=["k1"], protect_health=True)
    with TestClient(create_app(settings)) as client, warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning of any origin while checking keys
        assert client.get("/v2/health/live").status_code == 401
        assert client.get("/v2/health/live", headers={"X-API-Key": "k1"}).status_code == 200
        ok = client.get("/v2/health/live", headers={"Authorization": "Bearer k1"})
        assert ok.status_code == 200
