"""The Kubernetes and KServe manifests, offline: schemas (built-in kinds and vendored CRDs),
kustomize builds, the PrometheusRule generated from the one alerts file, and agreement with the
service (routes, ports, settings, metrics of a live /metrics). Each check is also shown to fail
on a manifest broken on purpose."""

from __future__ import annotations

import copy
import gzip
import hashlib
import importlib.util
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from service.config import Settings
from service.main import create_app
from tests.deploy import test_dashboard
from tests.deploy.conftest import PROMETHEUS_DIR
from tests.deploy.k8s import (
    CRD_FILES,
    CRDS,
    K8S,
    KSERVE,
    KUSTOMIZATIONS,
    Doc,
    containers,
    hpa_metric_problems,
    kustomize_build,
    load_all,
    metric_problems,
    queries,
    resource_files,
    schema_problems,
    service_problems,
)
from tests.deploy.test_dashboard import Exported

ADAPTER_CONFIG = K8S / "prometheus-adapter" / "config.yaml"
# /metrics of a live service after accepted, NOT SURE and rejected requests (the fixture the
# dashboard's checks use).
exported = test_dashboard.exported


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prometheusrule", K8S / "prometheusrule.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built() -> dict[str, list[Doc]]:
    """kustomize output of the base, every overlay and the adapter's ConfigMap."""
    return {str(k.relative_to(K8S)): kustomize_build(k) for k in KUSTOMIZATIONS}


@pytest.fixture(scope="module")
def app_facts() -> tuple[set[str], dict[str, Any], set[str]]:
    """GET routes of the real app (from its OpenAPI schema), Settings defaults, setting names."""
    app = create_app(Settings(model_repository=Path("/nonexistent")))
    routes = {path for path, ops in app.openapi()["paths"].items() if "get" in ops}
    defaults = {name: f.default for name, f in Settings.model_fields.items()}
    return routes, defaults, set(Settings.model_fields)


def adapter() -> Doc:
    doc: Doc = yaml.safe_load(ADAPTER_CONFIG.read_text())
    return doc


# --- schemas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", resource_files(), ids=lambda p: str(p.relative_to(K8S.parent)))
def test_every_manifest_validates_against_its_schema(path: Path) -> None:
    docs = load_all(path)
    assert docs
    problems = [p for d in docs for p in schema_problems(d, path.name)]
    assert not problems, "\n".join(problems)


def test_kustomize_output_validates_against_the_schemas(built: dict[str, list[Doc]]) -> None:
    kinds = {name: sorted(d["kind"] for d in docs) for name, docs in built.items()}
    base = ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "PrometheusRule",
            "Service", "ServiceMonitor"]  # fmt: skip
    assert kinds["base"] == base
    assert all(kinds[f"overlays/{o}"] == base for o in ("gpu", "custom-metrics", "model-volume"))
    assert kinds["prometheus-adapter"] == ["ConfigMap"]
    problems = [p for name, docs in built.items() for d in docs
                for p in schema_problems(d, f"{name}: {d['kind']}")]  # fmt: skip
    assert not problems, "\n".join(problems)


def test_the_overlays_change_what_they_say(built: dict[str, list[Doc]]) -> None:
    def one(name: str, kind: str) -> Doc:
        (doc,) = [d for d in built[name] if d["kind"] == kind]
        return doc

    gpu = one("overlays/gpu", "Deployment")["spec"]["template"]["spec"]
    (c,) = gpu["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"] == "notsure:gpu"
    assert {"name": "NOTSURE_DEVICE", "value": "cuda"} in c["env"]
    assert gpu["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert c["readinessProbe"] == one("base", "Deployment")["spec"]["template"]["spec"][
        "containers"][0]["readinessProbe"]  # fmt: skip
    custom = one("overlays/custom-metrics", "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert [m["type"] for m in custom] == ["Pods", "Pods"]  # CPU replaced, not added to
    vol = one("overlays/model-volume", "Deployment")["spec"]["template"]["spec"]
    assert {"name": "NOTSURE_MODEL_REPOSITORY", "value": "/models"} in vol["containers"][0]["env"]
    assert {v["name"] for v in vol["volumes"]} == {"tmp", "models"}
    config = one("prometheus-adapter", "ConfigMap")["data"]["config.yaml"]
    assert config == ADAPTER_CONFIG.read_text()


def test_pods_are_locked_down(built: dict[str, list[Doc]]) -> None:
    """Non-root, read-only root filesystem, no privilege escalation: the only writable path is
    the /tmp emptyDir (where TMPDIR points)."""
    docs = [d for docs in built.values() for d in docs] + kserve_docs()
    assert {"ClusterServingRuntime", "InferenceService"} <= {d["kind"] for d in docs}
    for _, pod, c in containers(docs):
        sc = {**pod.get("securityContext", {}), **c["securityContext"]}
        assert sc["runAsNonRoot"] and sc["runAsUser"] == 10001, sc
        assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"], sc
        assert sc["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert {"name": "TMPDIR", "value": "/tmp"} in c["env"]
        (tmp,) = [v for v in pod["volumes"] if v["name"] == mounts["/tmp"]]
        assert "emptyDir" in tmp
        assert all(m.get("readOnly") for p, m in
                   ((m["mountPath"], m) for m in c["volumeMounts"]) if p != "/tmp")  # fmt: skip


def test_the_schema_checks_catch_broken_manifests() -> None:
    (dep,) = load_all(K8S / "base" / "deployment.yaml")
    bad = copy.deepcopy(dep)
    bad["spec"]["replicas"] = "two"
    assert any("replicas" in p for p in schema_problems(bad, "deployment"))
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    assert any("httpGett" in p for p in schema_problems(bad, "deployment"))
    (sm,) = load_all(K8S / "base" / "servicemonitor.yaml")
    sm["spec"]["endpoints"][0]["intervall"] = "15s"  # a typo the API server would drop
    assert any("intervall" in p for p in schema_problems(sm, "servicemonitor"))
    (isvc,) = load_all(KSERVE / "inferenceservice.yaml")
    isvc["spec"]["predictor"]["scaleMetric"] = "gpu"
    assert any("scaleMetric" in p for p in schema_problems(isvc, "isvc"))


def test_vendored_crds_are_the_upstream_files() -> None:
    readme = (CRDS / "README.md").read_text()
    for name in CRD_FILES.values():
        raw = (CRDS / name).read_bytes()
        text = gzip.decompress(raw) if name.endswith(".gz") else raw
        m = re.search(rf"`{re.escape(name)}`.*`([0-9a-f]{{64}})`", readme)
        assert m, f"{name} is not listed in deploy/crds/README.md"
        assert hashlib.sha256(text).hexdigest() == m.group(1), name


# --- one source for the alerts -----------------------------------------------------------------


def test_prometheusrule_is_generated_from_the_alerts_file() -> None:
    gen = generator()
    committed = (K8S / "base" / "prometheusrule.yaml").read_text()
    assert committed == gen.render()
    (rule,) = load_all(K8S / "base" / "prometheusrule.yaml")
    alerts = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    assert gen.main(["--check"]) == 0


def test_a_stale_prometheusrule_is_detected(tmp_path: Path) -> None:
    alerts = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    alerts["groups"][1]["rules"][0]["for"] = "1h"
    edited = tmp_path / "alerts.yml"
    edited.write_text(yaml.safe_dump(alerts))
    assert generator().render(edited) != (K8S / "base" / "prometheusrule.yaml").read_text()


# --- agreement with the service ------------------------------------------------------------------


def kserve_docs() -> list[Doc]:
    return [d for f in sorted(KSERVE.glob("*.yaml")) for d in load_all(f)]


def all_docs(built: dict[str, list[Doc]]) -> list[tuple[str, list[Doc]]]:
    return [*built.items(), ("kserve", kserve_docs())]


def test_the_storage_inferenceservice_runs_on_the_notsure_runtime() -> None:
    """The runtime-based InferenceService selects the ClusterServingRuntime by model format and
    name, asks for a protocol the runtime declares, and the runtime serves what the storage
    initializer mounts; the custom-container one declares the V2 protocol the way KServe reads
    it for custom predictors (the PROTOCOL variable)."""
    (runtime,) = load_all(KSERVE / "servingruntime.yaml")
    (isvc,) = load_all(KSERVE / "inferenceservice-storage.yaml")
    model = isvc["spec"]["predictor"]["model"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert set(runtime["spec"]["protocolVersions"]) == {"v2", "grpc-v2"}
    (c,) = runtime["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["NOTSURE_MODEL_REPOSITORY"] == "/mnt/models"  # KServe's model mount path
    for doc in (isvc, *load_all(KSERVE / "inferenceservice.yaml")):
        # KServe v0.15+ reads "Standard" (the deprecated "RawDeployment" still maps to it).
        assert doc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    (custom,) = load_all(KSERVE / "inferenceservice.yaml")
    (cc,) = custom["spec"]["predictor"]["containers"]
    assert {"name": "PROTOCOL", "value": "v2"} in cc["env"]
    broken = copy.deepcopy(runtime)
    broken["spec"]["supportedModelFormats"][0]["autoselect"] = True  # a typo KServe would drop
    assert any("autoselect" in p for p in schema_problems(broken, "runtime"))


def test_probes_ports_and_settings_match_the_service(
    built: dict[str, list[Doc]], app_facts: tuple[set[str], dict[str, Any], set[str]]
) -> None:
    routes, defaults, settings = app_facts
    assert {"/v2/health/live", "/v2/health/ready", "/metrics"} <= routes
    assert (defaults["port"], defaults["grpc_port"]) == (8000, 8001)
    problems = [f"{name}: {p}" for name, docs in all_docs(built)
                for p in service_problems(docs, routes, defaults, settings)]  # fmt: skip
    assert not problems, "\n".join(problems)


def test_the_service_check_catches_a_wrong_probe_port_or_setting(
    built: dict[str, list[Doc]], app_facts: tuple[set[str], dict[str, Any], set[str]]
) -> None:
    routes, defaults, settings = app_facts
    docs = copy.deepcopy(built["base"])
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    c["readinessProbe"]["httpGet"]["path"] = "/healthz"
    c["livenessProbe"]["httpGet"]["path"] = "/v2/health/ready"  # restarts pods while they load
    c["ports"][1]["containerPort"] = 9001
    c["env"].append({"name": "NOTSURE_MAX_CONECTIONS", "value": "10"})
    problems = "\n".join(service_problems(docs, routes, defaults, settings))
    assert "readinessProbe path /healthz is not a route" in problems
    assert "livenessProbe should probe /v2/health/live" in problems
    assert "container ports [8000, 9001]" in problems
    assert "NOTSURE_MAX_CONECTIONS is not a setting" in problems
    assert "targetPort grpc" not in problems  # the named port still exists...
    c["ports"][1]["name"] = "grpc-x"
    assert "targetPort grpc is no container's port" in "\n".join(
        service_problems(docs, routes, defaults, settings)
    )  # ...until it is renamed


def test_queries_select_only_metrics_the_service_exports(
    built: dict[str, list[Doc]], exported: Exported
) -> None:
    docs = built["base"]
    exprs = queries(docs, adapter())
    assert len(exprs) >= 8 + 4  # the rules and both adapter rules
    recorded = {w for w, _ in exprs if ":" in w}  # recording rules: level:metric:operations
    problems = metric_problems(exprs, exported.labels, recorded)
    assert not problems, "\n".join(problems)
    for name, docs in built.items():
        assert not hpa_metric_problems(docs, adapter()), name


def test_the_metric_checks_catch_a_missing_metric(
    built: dict[str, list[Doc]], exported: Exported
) -> None:
    bad = adapter()
    bad["rules"][0]["seriesQuery"] = 'notsure_request_total{namespace!="",pod!=""}'
    bad["rules"][1]["metricsQuery"] = bad["rules"][1]["metricsQuery"].replace(
        "notsure_queue_wait_seconds_count{", 'notsure_queue_wait_seconds_count{reason="x",'
    )
    problems = "\n".join(metric_problems(queries([], bad), exported.labels, set()))
    assert "notsure_request_total is not exported" in problems
    assert "notsure_queue_wait_seconds_count has no label ['reason']" in problems
    docs = copy.deepcopy(built["overlays/custom-metrics"])
    (hpa,) = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] = "notsure_rps"
    assert hpa_metric_problems(docs, adapter()) == [
        "HorizontalPodAutoscaler/notsure: notsure_rps is served by no prometheus-adapter rule"
    ]
