"""The Grafana dashboard (and the alert rules) query only metrics and labels that the service
really exports: checked against a live /metrics of the service after real traffic."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TINY_MODELS
from tests.deploy.conftest import (
    DEPLOY,
    PROMETHEUS_DIR,
    ServiceProcess,
    dashboard,
    dashboard_targets,
    noise_instances,
    predict,
)
from tests.deploy.promql import selectors

# Labels Prometheus attaches to every scraped series, and its own per-target series.
TARGET_LABELS = {"job", "instance"}
PROMETHEUS_SERIES = {"up"}


class Exported:
    """Sample names of a /metrics page and the labels seen on each."""

    def __init__(self, text: str) -> None:
        self.labels: dict[str, set[str]] = defaultdict(set)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        for family in text_string_to_metric_families(text):
            # A labelled metric with no children yet is declared (HELP/TYPE) without samples.
            for suffix in suffixes.get(family.type, ("",)):
                self.labels.setdefault(family.name + suffix, set())
            for sample in family.samples:
                self.labels[sample.name].update(sample.labels)

    def __contains__(self, name: str) -> bool:
        return name in self.labels


@pytest.fixture(scope="module")
def exported(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """/metrics of the service serving the tiny repository after accepted, NOT SURE and
    rejected (4xx) requests to both models."""
    env = {"NOTSURE_MODEL_REPOSITORY": str(model_repo), "NOTSURE_DEVICE": "cpu",
           "NOTSURE_ALLOW_REQUEST_THRESHOLD": "true"}  # fmt: skip
    with ServiceProcess(tmp_path_factory.mktemp("metrics"), env) as service:
        for i, model in enumerate(TINY_MODELS):
            images = noise_instances(model_repo, model, 3, seed=i)
            assert set(predict(service.url, model, images, threshold=0.0)) == {"accepted"}
            assert set(predict(service.url, model, images, threshold=1.0)) == {"not_sure"}
            bad = httpx.post(f"{service.url}/v1/models/{model}/predict",
                             json={"instances": [[[2.0, -1.0]]]}, timeout=30)  # fmt: skip
            assert 400 <= bad.status_code < 500, bad.text
        text = httpx.get(f"{service.url}/metrics", timeout=10).text
    return Exported(text)


def check_query(expr: str, exported: Exported, where: str, recorded: frozenset[str] = frozenset()
                ) -> None:  # fmt: skip
    """Every metric of `expr` is exported (or Prometheus' own, or a recording rule of ours), with
    the labels its matchers and groupings use."""
    sel = selectors(expr)
    assert sel.metrics, f"{where}: no metric in {expr!r}"
    available: set[str] = set(TARGET_LABELS)
    ours = PROMETHEUS_SERIES | recorded
    for name, matcher_labels in sel.metrics.items():
        if name in ours:
            available |= recorded_labels().get(name, set())
            continue
        assert name in exported, f"{where}: {name} is not exported by the service"
        known = exported.labels[name]
        if known:  # labels are known once the metric has a sample
            unknown = matcher_labels - known - TARGET_LABELS
            assert not unknown, f"{where}: {name} has no label {unknown} (it has {known})"
        available |= known
    if all(exported.labels.get(n) for n in sel.metrics if n not in ours):
        assert sel.grouping <= available, f"{where}: grouping by {sel.grouping - available}"


def recorded_rules() -> frozenset[str]:
    return frozenset(recorded_labels())


def recorded_labels() -> dict[str, set[str]]:
    """The labels each recording rule of alerts.yml keeps: those of its `by` clauses and of the
    recorded series it is computed from (rules refer only to rules above them)."""
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    out: dict[str, set[str]] = {}
    for rule in (r for g in groups for r in g["rules"] if "record" in r):
        sel = selectors(rule["expr"])
        out[rule["record"]] = sel.grouping.union(*(out.get(n, set()) for n in sel.metrics))
    return out


def test_dashboard_queries_only_exported_metrics(exported: Exported) -> None:
    """Every series a panel reads is exported by the service or recorded by alerts.yml."""
    targets = dashboard_targets()
    assert len(targets) >= 10
    for t in targets:
        check_query(t.expr, exported, f"panel {t.panel!r} query {t.ref}", recorded_rules())
    for var in dashboard()["templating"]["list"]:
        m = re.fullmatch(r"label_values\((\w+), *(\w+)\)", var["query"]["query"])
        assert m, var["query"]
        assert m.group(2) in exported.labels[m.group(1)]


def test_alert_rules_query_only_exported_metrics(exported: Exported) -> None:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    recorded = recorded_rules()
    for g in groups:
        for rule in g["rules"]:
            name = rule.get("alert") or rule["record"]
            check_query(rule["expr"], exported, name, recorded)


def test_the_metric_check_catches_a_typo(exported: Exported) -> None:
    with pytest.raises(AssertionError, match="not exported"):
        check_query("rate(notsure_prediction_total[5m])", exported, "typo")
    with pytest.raises(AssertionError, match="no label"):
        check_query('notsure_predictions_total{decison="not_sure"}', exported, "typo")


def _norm(expr: str) -> str:
    expr = expr.replace(', model=~"$model"', "").replace('{model=~"$model"}', "")
    return re.sub(r"\s+", " ", expr).strip()


def test_refuse_rate_panel_plots_the_alerts_expression() -> None:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    rules = {r["record"]: r["expr"] for g in groups for r in g["rules"] if "record" in r}
    panel = [t for t in dashboard_targets() if t.panel == "Refuse rate per model"]
    assert [_norm(t.expr) for t in panel] == [
        _norm(rules["model:notsure_refuse_rate:ratio_rate5m"]),
        _norm(rules["model:notsure_refuse_rate:ratio_rate1d"]),
    ]


def test_dashboard_has_the_panels_operators_need() -> None:
    by_title: dict[str, list[Any]] = defaultdict(list)
    for t in dashboard_targets():
        by_title[t.panel].append(t)
    panel_types = {p["title"]: p["type"] for p in dashboard()["panels"]}

    def uses(title: str, *needles: str) -> None:
        text = " ".join(t.expr for t in by_title[title])
        for needle in needles:
            assert needle in text, (title, needle)

    uses("Refuse rate per model", 'decision="not_sure"')
    assert panel_types["J-score distribution"] == "heatmap"
    (heat,) = by_title["J-score distribution"]
    assert heat.format == "heatmap" and "notsure_j_score_bucket" in heat.expr
    assert "by (le)" in heat.expr
    uses("Request rate", "rate(notsure_requests_total")
    uses("Latency quantiles", "histogram_quantile(0.5", "histogram_quantile(0.99",
         "notsure_request_duration_seconds_bucket")  # fmt: skip
    uses("Batch size", "notsure_batch_size")
    uses("Queue wait and inference time", "notsure_queue_wait_seconds_bucket")
    uses("Server error ratio", 'code=~"5.."')
    uses("Shed requests and batch failures", "notsure_shed_requests_total",
         "notsure_batch_failures_total")  # fmt: skip
    uses("Window refuse rate vs calibrated", "notsure_window_not_sure", "notsure_window_images",
         "notsure_calibrated_refuse_rate")  # fmt: skip
    uses("Refuse-rate excess over the calibration (z)", "model_version:notsure_refuse_excess:z")
    uses("Score drift (PSI)", "notsure_score_drift_psi")
    for title, family in (("Confidence distribution", "notsure_confidence_bucket"),
                          ("Energy distribution", "notsure_energy_bucket")):  # fmt: skip
        (heat,) = by_title[title]
        assert panel_types[title] == "heatmap" and family in heat.expr and "by (le)" in heat.expr


def test_no_panel_adds_up_different_scores(exported: Exported) -> None:
    """A series with a `score` label is never aggregated without keeping that label: a J-score,
    a confidence and an energy do not share a scale."""
    aggregations = re.compile(r"\b(sum|avg|max|min|count)\b")
    for t in dashboard_targets():
        sel = selectors(t.expr)
        scored = [n for n in sel.metrics if "score" in exported.labels.get(n, set())]
        if scored and aggregations.search(t.expr):
            assert "score" in sel.grouping, (t.panel, t.expr)
    # Each score's histogram is its own family: the per-score buckets differ.
    assert "notsure_score_bucket" not in exported
    for family in ("notsure_j_score", "notsure_confidence", "notsure_energy"):
        assert "score" not in exported.labels[family + "_bucket"]


def test_dashboard_layout_and_data_source() -> None:
    d = dashboard()
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    panels = d["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        xs, ys = range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])
        mine = {(x, y) for x in xs for y in ys}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] != "row":
            assert p["datasource"]["uid"] == uid, p["title"]
            assert p.get("description"), f"panel {p['title']!r} does not say what it shows"
            for t in p["targets"]:
                assert t["datasource"]["uid"] == uid
