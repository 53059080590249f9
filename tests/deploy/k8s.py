"""Offline checks of the Kubernetes and KServe manifests: built-in kinds against the Kubernetes
schemas (kubernetes-validate), custom resources against the openAPIV3Schema of their vendored
CRDs, kustomize output the same way, and the manifests' probes, ports, settings and metric
names against what the service really exposes. Each check returns the problems it finds, so a
test can also show it failing on a broken manifest."""

from __future__ import annotations

import copy
import gzip
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import DEPLOY
from tests.deploy.promql import selectors

K8S = DEPLOY / "k8s"
KSERVE = DEPLOY / "kserve"
CRDS = DEPLOY / "crds"
KUSTOMIZATIONS = [K8S / "base", *sorted((K8S / "overlays").iterdir()), K8S / "prometheus-adapter"]
# The oldest Kubernetes release the manifests are written for, and the newest schemas bundled.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CRD_FILES = {
    (
        "serving.kserve.io/v1beta1",
        "InferenceService",
    ): "serving.kserve.io_inferenceservices.yaml.gz",
    (
        "serving.kserve.io/v1alpha1",
        "ClusterServingRuntime",
    ): "serving.kserve.io_clusterservingruntimes.yaml.gz",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}
# Labels Prometheus attaches to series scraped through a ServiceMonitor (target labels).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container"}
Doc = dict[str, Any]


def load_all(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def resource_files() -> list[Path]:
    """Manifests applied as they are: every YAML a kustomization lists under `resources`, and
    the KServe folder (patches are partial and are checked inside kustomize's output)."""
    files = []
    for k in KUSTOMIZATIONS:
        spec = yaml.safe_load((k / "kustomization.yaml").read_text())
        files += [k / r for r in spec.get("resources", []) if (k / r).is_file()]
    return files + sorted(KSERVE.glob("*.yaml"))


def kustomize_command() -> list[str]:
    """`kustomize build`, or kubectl's built-in copy of it."""
    if found := shutil.which("kustomize"):
        return [found, "build"]
    if found := shutil.which("kubectl"):
        return [found, "kustomize"]
    pytest.fail("neither kustomize nor kubectl is installed: install kustomize v5 or kubectl 1.27+")


def kustomize_build(path: Path) -> list[Doc]:
    proc = subprocess.run([*kustomize_command(), str(path)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0, f"kustomize build {path} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


# --- schemas ---------------------------------------------------------------------------------


def _closed(schema: Any) -> Any:
    """The schema with unknown properties rejected wherever it lists properties and does not
    ask to keep unknown fields (the API server would prune them silently; a typo would vanish)."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    path = CRDS / CRD_FILES[api_version, kind]
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    crd = yaml.safe_load(text)
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind, path
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _closed(copy.deepcopy(v["schema"]["openAPIV3Schema"]))
    # metadata is validated by the API server itself; the CRD only says "object".
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def schema_problems(doc: Doc, where: str) -> list[str]:
    """Why `doc` would be refused by a cluster (strict field validation), or nothing."""
    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    if key in CRD_FILES:
        return [f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in crd_validator(*key).iter_errors(doc)]  # fmt: skip
    problems = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(map(str, e.path))
            problems.append(f"{where} (Kubernetes {version}): {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{where}: no schema for {e.kind} {e.api_version}")
    return problems


# --- the pod specs and what the service exposes -------------------------------------------------


def containers(docs: Iterable[Doc]) -> Iterator[tuple[str, Doc, Doc]]:
    """(where, pod spec, container) for every Deployment, InferenceService predictor with its
    own containers, and ServingRuntime."""
    for d in docs:
        if d["kind"] == "Deployment":
            pod = d["spec"]["template"]["spec"]
        elif d["kind"] == "InferenceService":
            pod = d["spec"]["predictor"]
        elif d["kind"] == "ClusterServingRuntime":
            pod = d["spec"]
        else:
            continue
        for c in pod.get("containers", []):
            yield f"{d['kind']}/{d['metadata']['name']}/{c['name']}", pod, c


def port_number(container: Doc, port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in container.get("ports", []) if p["name"] == port), None)


def service_problems(
    docs: list[Doc], routes: set[str], defaults: dict[str, Any], settings: set[str]
) -> list[str]:
    """Probes on the service's real health routes and HTTP port, container ports equal to the
    settings they are configured with, NOTSURE_* variables that exist, Services that target a
    declared port."""
    problems = []
    want = {"livenessProbe": "/v2/health/live", "readinessProbe": "/v2/health/ready",
            "startupProbe": "/v2/health/ready"}  # fmt: skip
    for where, _, c in containers(docs):
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        for name in env:
            field = name.removeprefix("NOTSURE_").lower()
            if name.startswith("NOTSURE_") and field not in settings:
                problems.append(f"{where}: {name} is not a setting of the service")
        http = int(env.get("NOTSURE_PORT") or defaults["port"])
        grpc = int(env.get("NOTSURE_GRPC_PORT") or defaults["grpc_port"])
        ports = {p["containerPort"] for p in c.get("ports", [])}
        if ports != {http, grpc}:
            problems.append(f"{where}: container ports {sorted(ports)}, service listens on "
                            f"HTTP {http} and gRPC {grpc}")  # fmt: skip
        for probe, path in want.items():
            get = c.get(probe, {}).get("httpGet")
            if get is None:
                problems.append(f"{where}: no {probe}")
                continue
            if get["path"] not in routes:
                problems.append(f"{where}: {probe} path {get['path']} is not a route of the app")
            elif get["path"] != path:
                problems.append(f"{where}: {probe} should probe {path}, not {get['path']}")
            if port_number(c, get["port"]) != http:
                problems.append(f"{where}: {probe} port {get['port']} is not HTTP port {http}")
    pod_containers = [c for _, _, c in containers(docs)]
    service_ports = {p["name"] for d in docs if d["kind"] == "Service" for p in d["spec"]["ports"]}
    for d in docs:
        if d["kind"] != "ServiceMonitor":
            continue
        for e in d["spec"]["endpoints"]:
            if e["port"] not in service_ports:
                problems.append(f"ServiceMonitor: port {e['port']} is no Service port's name")
            if e.get("path", "/metrics") not in routes:
                problems.append(f"ServiceMonitor: path {e.get('path')} is not a route of the app")
    for d in docs:
        if d["kind"] != "Service":
            continue
        for p in d["spec"]["ports"]:
            if not any(port_number(c, p["targetPort"]) for c in pod_containers):
                problems.append(f"Service/{d['metadata']['name']}: targetPort {p['targetPort']} "
                                "is no container's port")  # fmt: skip
    return problems


def queries(docs: list[Doc], adapter: Doc) -> list[tuple[str, str]]:
    """(where, PromQL) of every query the deployment runs: alerts and recording rules of the
    PrometheusRule, and the adapter rules with their templates filled in as the adapter does."""
    out = []
    for d in docs:
        if d["kind"] == "PrometheusRule":
            for g in d["spec"]["groups"]:
                for r in g["rules"]:
                    out.append((r.get("alert") or r["record"], r["expr"]))
    for rule in adapter["rules"]:
        (series,) = selectors(rule["seriesQuery"]).metrics
        expr = (rule["metricsQuery"].replace("<<.Series>>", series)
                .replace("<<.LabelMatchers>>", 'namespace="default",pod="notsure-0"')
                .replace("<<.GroupBy>>", "pod"))  # fmt: skip
        out += [(f"adapter {rule['name']['as']}", rule["seriesQuery"]),
                (f"adapter {rule['name']['as']}", expr)]  # fmt: skip
    return out


def metric_problems(
    exprs: list[tuple[str, str]], exported: dict[str, set[str]], recorded: set[str]
) -> list[str]:
    """Every metric a query selects is on the live /metrics (or a recording rule, or `up`),
    and every label its matchers name is one the series carry."""
    problems = []
    for where, expr in exprs:
        for name, labels in selectors(expr).metrics.items():
            if name in recorded or name == "up":
                continue
            if name not in exported:
                problems.append(f"{where}: {name} is not exported by the service")
            elif exported[name] and (unknown := labels - exported[name] - TARGET_LABELS):
                problems.append(f"{where}: {name} has no label {sorted(unknown)}")
    return problems


def hpa_metric_problems(docs: list[Doc], adapter: Doc) -> list[str]:
    """Custom metrics an HPA asks for are served by an adapter rule."""
    served = {r["name"]["as"] for r in adapter["rules"]}
    return [f"HorizontalPodAutoscaler/{d['metadata']['name']}: {m['pods']['metric']['name']} "
            "is served by no prometheus-adapter rule"
            for d in docs if d["kind"] == "HorizontalPodAutoscaler"
            for m in d["spec"]["metrics"]
            if m["type"] == "Pods" and m["pods"]["metric"]["name"] not in served]  # fmt: skip
