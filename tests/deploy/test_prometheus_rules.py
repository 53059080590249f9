"""promtool (Debian's prometheus package) checks the Prometheus config and the rules, and runs the
rules' unit tests; every alert must have a case that fires and one that must not."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from tests.deploy.conftest import PROMETHEUS_DIR, tool


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_config_is_valid() -> None:
    r = promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_rules_are_valid() -> None:
    r = promtool("check", "rules", "alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_rule_unit_tests_pass() -> None:
    r = promtool("test", "rules", "alerts_test.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == {"NotSureRefuseRateAboveCalibrated", "NotSureScoreDrift",
                      "NotSureErrorRatioHigh", "NotSureLatencyP99High", "NotSureServiceDown",
                      "NotSureModelNotReady"}  # fmt: skip
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())
    fires: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for t in case.get("alert_rule_test", []):
            (fires if t["exp_alerts"] else silent).add(t["alertname"])
    assert fires == alerts, alerts - fires
    assert silent == alerts, alerts - silent


def test_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The unit tests are not vacuous: weakening the calibrated refuse-rate alert's guard (so
    a window too small for the normal approximation could page) makes them fail."""
    text = (PROMETHEUS_DIR / "alerts.yml").read_text()
    guard = "* on (model, version) model_version:notsure_calibrated_refuse_rate:max >= 10"
    assert guard in text
    (tmp_path / "alerts.yml").write_text(text.replace(guard, guard.replace(">= 10", ">= 1")))
    (tmp_path / "alerts_test.yml").write_text((PROMETHEUS_DIR / "alerts_test.yml").read_text())
    r = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert r.returncode != 0
    assert 'model="quiet"' in r.stdout + r.stderr


def test_every_alert_links_to_its_section_of_the_deployment_doc() -> None:
    doc = (PROMETHEUS_DIR.parents[1] / "docs" / "deployment.md").read_text()
    # GitHub's anchors: lower-case heading text, spaces to dashes, punctuation dropped.
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", doc, flags=re.M)}  # fmt: skip
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    for rule in (r for g in rules["groups"] for r in g["rules"] if "alert" in r):
        path, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert path == "docs/deployment.md" and anchor in anchors, (rule["alert"], anchor)
        assert rule["labels"]["severity"] in {"warning", "critical"}
