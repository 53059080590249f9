"""docker-compose.yml: valid against the Compose Specification schema (check-jsonschema's vendored
copy), and wired together: names, ports, mounts and settings agree across the files."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import Settings
from tests.deploy.conftest import COMPOSE, DEPLOY, ROOT, dockerfile_stages, tool


def compose() -> dict[str, Any]:
    # PyYAML resolves the `<<` merge keys the way Compose does.
    with COMPOSE.open() as f:
        data: dict[str, Any] = yaml.safe_load(f)
    return data


def default_of(value: str) -> str:
    """The value Compose substitutes for ${VAR:-default} when VAR is unset."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_compose_file_follows_the_compose_specification() -> None:
    r = check_compose_schema(COMPOSE)
    assert r.returncode == 0, r.stdout + r.stderr


def test_schema_check_rejects_a_misspelt_key(tmp_path: Path) -> None:
    """The validator really applies the schema (a key Compose does not know is an error)."""
    broken = tmp_path / "docker-compose.yml"
    text = COMPOSE.read_text()
    assert "\n    deploy:\n" in text
    broken.write_text(text.replace("\n    deploy:\n", "\n    deploi:\n", 1))
    r = check_compose_schema(broken)
    assert r.returncode == 1
    assert "deploi" in r.stdout + r.stderr


def test_default_service_reserves_a_gpu_and_cpu_profile_does_not() -> None:
    services = compose()["services"]
    gpu, cpu = services["notsure"], services["notsure-cpu"]
    # `docker compose up` starts the GPU service: it has no profile.
    assert "profiles" not in gpu
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert gpu["build"]["args"]["VARIANT"] == "gpu"
    assert cpu["profiles"] == ["cpu"]
    assert "deploy" not in cpu
    assert cpu["build"]["args"]["VARIANT"] == "cpu"
    assert cpu["environment"]["NOTSURE_DEVICE"] == "cpu"
    # Prometheus scrapes `notsure`, whichever variant runs.
    assert "notsure" in cpu["networks"]["default"]["aliases"]
    stages = {st.name for st in dockerfile_stages()}
    for svc in (gpu, cpu):
        assert f"base-{svc['build']['args']['VARIANT']}" in stages
        assert svc["build"]["context"] == "."


@pytest.mark.parametrize("name", ["notsure", "notsure-cpu"])
def test_service_environment_names_real_settings(name: str) -> None:
    svc = compose()["services"][name]
    env = svc["environment"]
    fields = {f"NOTSURE_{f.upper()}" for f in Settings.model_fields}
    unknown = {k for k in env if k.startswith("NOTSURE_")} - fields
    assert not unknown, f"not NOTSURE_* settings: {unknown}"
    # Thresholds and API keys pass through from the shell or .env when set, else stay unset
    # (an empty string would not parse as JSON).
    for key in ("NOTSURE_THRESHOLDS", "NOTSURE_API_KEYS", "NOTSURE_MODELS"):
        assert key in env and env[key] is None, key
    assert env["NOTSURE_HOST"] == "0.0.0.0"
    # The model repository is a mounted volume, read-only.
    (mount,) = [v for v in svc["volumes"] if v["target"] == env["NOTSURE_MODEL_REPOSITORY"]]
    assert mount["read_only"] is True
    assert (ROOT / default_of(mount["source"])).resolve() == (ROOT / "models").resolve()
    # The published ports are the ones the service listens on: HTTP, then gRPC.
    http, grpc = svc["ports"]
    assert default_of(http).split(":")[-1] == env["NOTSURE_PORT"]
    assert default_of(grpc).split(":")[-1] == env["NOTSURE_GRPC_PORT"]


def test_thresholds_as_compose_passes_them_reach_the_settings(monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:  # fmt: skip
    monkeypatch.setenv("NOTSURE_THRESHOLDS", '{"mnist-resnet32-rce": 0.6}')
    monkeypatch.setenv("NOTSURE_MODEL_REPOSITORY", "/models")
    s = Settings()
    assert s.thresholds == {"mnist-resnet32-rce": 0.6}
    assert s.model_repository == Path("/models")


def test_prometheus_scrapes_the_service_and_loads_the_alerts() -> None:
    services = compose()["services"]
    prom = services["prometheus"]
    mounts = {v["target"]: v for v in prom["volumes"] if isinstance(v, dict)}
    conf_dir = mounts["/etc/prometheus"]
    assert (ROOT / conf_dir["source"]).resolve() == (DEPLOY / "prometheus").resolve()
    assert conf_dir["read_only"] is True
    flags = dict(a.lstrip("-").split("=", 1) for a in prom["command"])
    config_file = Path(flags["config.file"])
    assert config_file.parent == Path("/etc/prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus" / config_file.name).read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "notsure"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in services and port == services[host]["environment"]["NOTSURE_PORT"]
    assert job["metrics_path"] == "/metrics"


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    services = compose()["services"]
    graf = services["grafana"]
    mounts = {v["target"]: v for v in graf["volumes"] if isinstance(v, dict)}
    prov = mounts["/etc/grafana/provisioning"]
    assert (ROOT / prov["source"]).resolve() == (DEPLOY / "grafana" / "provisioning").resolve()
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090" and "prometheus" in services
    dash = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/notsure.yml").read_text())
    (provider,) = dash["providers"]
    folder = mounts[provider["options"]["path"]]
    assert (ROOT / folder["source"]).resolve() == (DEPLOY / "grafana" / "dashboards").resolve()
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent == Path(provider["options"]["path"])
    assert (DEPLOY / "grafana" / "dashboards" / Path(home).name).is_file()
