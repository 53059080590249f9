"""The whole attack loop against a live server on 127.0.0.1 serving the tiny model repository.

The server is the production app (`service.server.uvicorn_config`) on a free port in a thread;
the tool is driven through its CLI. Offline scoring must give the same numbers as the service.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import typer
import uvicorn
from typer.testing import CliRunner

from notsure.attack_cli import register
from service.config import Settings
from service.server import uvicorn_config
from training.clients import OUTPUTS, ServiceError
from training.validator.run import AttackRunConfig, run

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MODELS = ("tiny-rce", "tiny-ce")
EPS = (0.1, 0.3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def live_url(model_repo: Path) -> Iterator[str]:
    settings = Settings(model_repository=model_repo, port=_free_port(), log_level="warning",
                        device="cpu", max_batch_size=16)  # fmt: skip
    server = uvicorn.Server(uvicorn_config(settings))
    thread = threading.Thread(target=server.run, name="notsure-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start within 60 s")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{settings.port}"
    server.should_exit = True
    thread.join(timeout=30)
    assert not thread.is_alive(), "the test server did not stop"


def _cli(*args: str) -> None:
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    result = CliRunner().invoke(app, ["attack", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)


def _args(url: str, repo: Path, out: Path) -> list[str]:
    return ["--model", ",".join(MODELS), "--models-dir", str(repo), "--url", url,
            "--eps", *(str(e) for e in EPS), "--n", "40", "--cost", "ce", "--cost", "rce",
            "--batch-size", "16", "--out", str(out), "--cache-dir", str(out / "cache"),
            "--threads", "1", "--timeout", "30"]  # fmt: skip


def test_live_run_reports_and_matches_offline(
    live_url: str, model_repo: Path, tmp_path: Path
) -> None:
    out = tmp_path / "live"
    _cli(*_args(live_url, model_repo, out))
    report = json.loads((out / "report.json").read_text())
    assert report["source"] == live_url
    assert [m["name"] for m in report["models"]] == list(MODELS)
    for m in report["models"]:
        assert sorted(m["attacks"]) == sorted(f"{c}@{e:g}" for c in ("ce", "rce") for e in EPS)
        for a in m["attacks"].values():
            assert a["at_manifest_T"]["service_decision_mismatches"] == 0
            assert a["at_manifest_T"]["service_T"] == pytest.approx(m["threshold"])
    for name in ("report.md", "ranking-ce.png", "auc-rce.png", "sweep-tiny-ce-ce.png",
                 "eta-tiny-rce-rce.png", "examples-tiny-rce.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name

    # The same computation in-process from the ONNX files: the very same decisions and scores.
    offline = run(AttackRunConfig(models=MODELS, eps=EPS, costs=("ce", "rce"), n=40,
                                  offline=True, models_dir=model_repo, out_dir=tmp_path / "off",
                                  cache_dir=tmp_path / "off-cache", threads=1))  # fmt: skip
    # Read back from the cache the CLI run above filled with the service's answers.
    live = run(AttackRunConfig(models=MODELS, eps=EPS, costs=("ce", "rce"), n=40, url=live_url,
                               models_dir=model_repo, out_dir=out, cache_dir=out / "cache",
                               threads=1))  # fmt: skip
    for off_rec, live_rec in zip(offline.records, live.records, strict=True):
        pairs = [(off_rec.clean, live_rec.clean)]
        pairs += [(off_rec.adv[k], live_rec.adv[k]) for k in off_rec.adv]
        for off, on in pairs:
            np.testing.assert_array_equal(off.label, on.label)
            for name in OUTPUTS[1:]:
                np.testing.assert_allclose(getattr(off, name), getattr(on, name),
                                           rtol=1e-5, atol=1e-6, err_msg=name)  # fmt: skip
            assert off.threshold == pytest.approx(on.threshold)


def test_an_interrupted_run_resumes_from_its_cache(
    live_url: str, model_repo: Path, tmp_path: Path
) -> None:
    out = tmp_path / "resume"
    _cli(*_args(live_url, model_repo, out))
    cache = sorted((out / "cache").rglob("*.npz"))
    # 2 models x (clean + 2 costs x (direction + 2 eps)).
    assert len(cache) == 2 * (1 + 2 * 3)
    lost = next(p for p in cache if p.name.startswith("rce-eps0.3"))
    lost.unlink()
    before = {p: p.stat().st_mtime_ns for p in cache if p != lost}
    first = json.loads((out / "report.json").read_text())
    _cli(*_args(live_url, model_repo, out))
    assert lost.exists()
    assert {p: p.stat().st_mtime_ns for p in before} == before
    again = json.loads((out / "report.json").read_text())
    for m0, m1 in zip(first["models"], again["models"], strict=True):
        a0, a1 = m0["attacks"]["rce@0.3"], m1["attacks"]["rce@0.3"]
        assert a1["adversarial_accuracy"] == a0["adversarial_accuracy"]
        assert a1["at_manifest_T"]["refuse_adversarial"] == pytest.approx(
            a0["at_manifest_T"]["refuse_adversarial"]
        )


def test_a_dead_service_fails_within_the_bounds(model_repo: Path, tmp_path: Path) -> None:
    cfg = AttackRunConfig(models=("tiny-rce",), eps=(0.1,), n=8, models_dir=model_repo,
                          url=f"http://127.0.0.1:{_free_port()}", timeout_s=1.0, retries=1,
                          out_dir=tmp_path, cache_dir=tmp_path / "cache")  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(ServiceError, match="not ready"):
        run(cfg)
    assert time.monotonic() - t0 < 20


def test_audit_images_replayed_through_the_live_service_get_the_offline_decisions(
    live_url: str, model_repo: Path, tmp_path: Path
) -> None:
    """`notsure audit --plan live`: every saved adversarial image goes to the
    running service over KServe V2, and the wins read from its answers must be the ones the
    audit counted offline: its own decision at the served T, its K-density and predicted
    class at the K-density jobs' T. A replayed row replaces its earlier one; others are kept."""
    from dataclasses import replace

    from training.audit import plans
    from training.audit.subject import AuditConfig, Models

    cfg = AuditConfig(plan="headline", models=MODELS, models_dir=model_repo,
                      work_dir=tmp_path / "work", out_json=tmp_path / "adaptive.json",
                      chunk=4, dry_run=True, url=live_url)  # fmt: skip
    models = Models(cfg)
    rows = plans.run(cfg, models)
    plans.run(replace(cfg, plan="k-density"), models)
    plans.run(replace(cfg, plan="secondary"), models)  # T for 1%, confidence T, L2 and C&W jobs
    earlier = {"model": "another-model", "attack": "lagrangian", "eps": 0.1, "n": 5,
               "offline_wins": 1, "live_wins": 1, "disagree": 0}  # fmt: skip
    stale = {**earlier, "model": MODELS[0], "eps": 0.3, "live_wins": 0, "disagree": 1}
    live_json = tmp_path / "live.json"
    live_json.write_text(json.dumps([earlier, stale]))
    plans.run(replace(cfg, plan="live"), models)
    live = json.loads(live_json.read_text())
    assert live[0] == earlier and stale not in live
    replayed = live[1:]
    for r in replayed:
        assert r["disagree"] == 0 and r["live_wins"] == r["offline_wins"], r
    served = [r for r in replayed if r["clean_refusal"] is None]
    assert all(r["decided_by"] == "service" for r in served)

    def ident(r: dict[str, object]) -> tuple[object, ...]:
        return r["model"], r["eps"], r["steps"], r["restarts"]

    headline = {ident(r): r for r in rows if r["attack"] == "lagrangian"}
    replayed_headline = [r for r in served if ident(r) in headline and r["norm"] == "linf"
                         and r["attack"] == "lagrangian"]  # fmt: skip
    assert len(replayed_headline) == len(headline) == 2 * 4  # both models, every eps
    for r in replayed_headline:
        h = headline[ident(r)]
        assert r["n"] == h["n"] and r["offline_wins"] == round(h["attack_success"] * h["n"])
    other = [r for r in replayed if r["clean_refusal"] is not None]
    assert {r["score"] for r in other} == {"j", "confidence", "k_density"}
    assert all(r["decided_by"] == "service's score at T" for r in other)
    # Both kinds of comparison cover accepted wins, not only refusals.
    assert sum(r["live_wins"] for r in served) > 0 and sum(r["live_wins"] for r in other) > 0
