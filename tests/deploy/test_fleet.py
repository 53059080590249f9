"""Three `notsure serve` replicas behind a real haproxy, the real Prometheus scraping each: a
short soak through the balancer while one replica is sent SIGTERM and restarted. Nothing is
lost or answered twice, no error reaches the client, each replica's counters in Prometheus
match what the client was answered by it, and the dashboard's refuse-rate query summed over the
replicas gives the share of NOT SURE the client saw. The longer run of docs/deployment.md is
`python -m benchmarks.fleet_soak`, the same code."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from benchmarks.fleet_soak import (
    FleetSoakConfig,
    FleetSoakResult,
    accounting_problems,
    run_fleet_soak,
)
from benchmarks.soak import build_calls
from service import v2codec
from service.config import Settings
from service.main import create_app
from tests.deploy.conftest import tool

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DURATION_S = 24


def split_thresholds(repo: Path, seed: int) -> dict[str, float]:
    """Per model, the median of its own score (J for RCE, confidence for CE) over the images the
    soak sends it: with that T about half of them are answered NOT SURE, so the refuse rate
    compared below is not just 0 or 1 (with their calibrated T the tiny models refuse all noise
    images, or none)."""
    with TestClient(create_app(Settings(model_repository=repo, device="cpu"))) as client:
        models = [m["name"] for m in client.get("/v1/models").json()["models"]]
        out = {}
        for i, model in enumerate(models):  # the order and seeds benchmarks.fleet_soak uses
            (v2_bin,) = [c for c in build_calls(model, (1, 28, 28), seed + i)
                         if c.kind.startswith("v2_binary_128")]  # fmt: skip
            sent = v2codec.decode(
                v2_bin.body_prefix, dict(v2_bin.headers)["inference-header-content-length"]
            )
            x = sent.tensors[sent.request.inputs[0].name]  # (128, 1, 28, 28)
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                "data": x.reshape(-1).tolist()}],
                    "outputs": [{"name": "score"}]}  # fmt: skip
            r = client.post(f"/v2/models/{model}/infer", json=body)
            assert r.status_code == 200, r.text
            (score,) = r.json()["outputs"]
            out[model] = float(np.median(score["data"]))  # (128,) scores
    return out


@pytest.fixture(scope="module")
def soak(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> FleetSoakResult:
    tool("haproxy"), tool("prometheus")  # a clear failure when a binary is missing
    thresholds = split_thresholds(model_repo, seed=0)
    cfg = FleetSoakConfig(repo=model_repo, workdir=tmp_path_factory.mktemp("fleet"),
                          duration_s=DURATION_S, concurrency=8, kill_at=0.25, restart_at=0.4,
                          settings=(("NOTSURE_THRESHOLDS", json.dumps(thresholds)),))  # fmt: skip
    res = run_fleet_soak(cfg)
    print(f"\nfleet soak {DURATION_S} s: {res.requests} requests, {res.ok} ok, lost {res.lost}, "
          f"duplicated {res.duplicated}, told to retry {res.told_to_retry}, errors {res.errors}, "
          f"by replica {res.by_replica}, haproxy {res.balancer}, events {res.events}, "
          f"refuse rate {res.refuse_rate}")  # fmt: skip
    return res


def test_nothing_is_lost_duplicated_or_refused(soak: FleetSoakResult) -> None:
    assert soak.requests > 100
    assert (soak.lost, soak.duplicated, soak.errors, soak.told_to_retry) == (0, 0, {}, 0)
    assert soak.ok == soak.requests
    assert soak.victim_exit_code == 0  # drained, not killed
    events = [e for _, e in soak.events]
    assert events == ["SIGTERM r1", "r1 exited 0", "restart r1", "r1 ready",
                      "r1 back in rotation"]  # fmt: skip


def test_every_replica_served_and_the_restarted_one_again(soak: FleetSoakResult) -> None:
    assert set(soak.by_replica) == {"r0", "r1", "r2"}
    assert {"r0#1", "r1#1", "r1#2", "r2#1"} <= set(soak.client_by_instance)
    assert soak.balancer["hrsp_5xx"] == 0


def test_prometheus_counts_what_the_client_was_answered(soak: FleetSoakResult) -> None:
    assert accounting_problems(soak) == []
    for inst in ("r0#1", "r2#1", "r1#2"):  # alive at the end: exactly equal
        assert soak.scraped_by_instance[inst] == soak.client_by_instance[inst], inst
    # The median split at least one model's images (a barely trained tiny model can give every
    # noise image the same J-score, which no T splits).
    assert any(0.2 < rr["client"] < 0.8 for rr in soak.refuse_rate.values()), soak.refuse_rate
    for model, rr in soak.refuse_rate.items():
        assert rr["dashboard"] == pytest.approx(rr["client"], abs=0.005), model


def test_the_accounting_catches_a_lost_or_miscounted_answer(soak: FleetSoakResult) -> None:
    bad = copy.deepcopy(soak)
    bad.lost = 1
    model = next(iter(bad.client_by_instance["r0#1"]))
    decision = next(iter(bad.client_by_instance["r0#1"][model]))
    bad.scraped_by_instance["r0#1"][model][decision] += 1  # the server answered one more
    bad.refuse_rate[model]["dashboard"] = bad.refuse_rate[model]["client"] + 0.05
    problems = "\n".join(accounting_problems(bad))
    assert "lost 1" in problems
    assert "r0#1: Prometheus" in problems
    assert f"{model}: refuse rate" in problems


# --- the same fleet, one replica SIGKILLed: nothing drains, haproxy resends what it held ------

KILL_DURATION_S = 12
# The tiny models answer in about a millisecond: a replica killed at a random instant seldom
# holds a request. Hung for a second first (SIGSTOP), it surely does: haproxy keeps sending it
# requests until its health check times out, and the kill then cuts them off unanswered.
FREEZE_S = 1.0


@pytest.fixture(scope="module")
def killed(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> FleetSoakResult:
    tool("haproxy"), tool("prometheus")
    cfg = FleetSoakConfig(repo=model_repo, workdir=tmp_path_factory.mktemp("fleet-kill"),
                          duration_s=KILL_DURATION_S, concurrency=8, kill_at=0.25,
                          restart_at=0.4, signal="kill", freeze_s=FREEZE_S)  # fmt: skip
    res = run_fleet_soak(cfg)
    print(f"\nfleet soak with SIGKILL, {KILL_DURATION_S} s: {res.requests} requests, {res.ok} ok, "
          f"lost {res.lost}, duplicated {res.duplicated}, errors {res.errors}, haproxy "
          f"{res.balancer}, events {res.events}, killed replica's counters "
          f"{res.killed_counters} ({res.killed_requests} requests), client from it "
          f"{res.client_by_instance.get('r1#1')} ({res.client_requests.get('r1#1')} requests), "
          f"images run twice {res.duplicated_inference_images}")  # fmt: skip
    return res


def test_a_killed_replica_costs_the_client_nothing(killed: FleetSoakResult) -> None:
    assert killed.requests > 50
    assert (killed.lost, killed.duplicated, killed.errors, killed.told_to_retry) == (0, 0, {}, 0)
    assert killed.ok == killed.requests
    assert killed.victim_exit_code == -9
    events = [e for _, e in killed.events]
    assert events == ["SIGSTOP r1", "SIGKILL r1", "r1 exited -9", "restart r1", "r1 ready",
                      "r1 back in rotation"]  # fmt: skip
    assert killed.balancer["hrsp_5xx"] == 0
    # haproxy did resend what r1 held when it was killed, and the client never saw it.
    assert killed.balancer["wretr"] >= 1, killed.balancer


def test_every_answer_is_counted_once_by_the_replica_that_gave_it(killed: FleetSoakResult) -> None:
    assert accounting_problems(killed) == []
    for inst in ("r0#1", "r2#1", "r1#2"):  # alive at the end: Prometheus equals the client
        assert killed.scraped_by_instance[inst] == killed.client_by_instance[inst], inst
        assert killed.scraped_requests[inst] == killed.client_requests[inst], inst
    # The killed instance: its own counters (read from its files) hold every image it answered;
    # any more are images it ran but died before answering, which another replica ran again.
    # haproxy resent at most wretr requests of at most 128 images each.
    answered = killed.client_by_instance["r1#1"]
    for model, by in answered.items():
        for decision, n in by.items():
            assert killed.killed_counters[model][decision] >= n, (model, decision)
    total_counted = sum(n for by in killed.killed_counters.values() for n in by.values())
    total_answered = sum(n for by in answered.values() for n in by.values())
    assert killed.duplicated_inference_images == total_counted - total_answered
    assert 0 <= killed.duplicated_inference_images <= 128 * killed.balancer["wretr"]
    # Answers are counted once sent: never more than the client got from it.
    assert 0 < killed.killed_requests <= killed.client_requests["r1#1"]


def test_the_accounting_catches_an_uncounted_answer_of_the_killed_replica(
    killed: FleetSoakResult,
) -> None:
    bad = copy.deepcopy(killed)
    model = next(iter(bad.client_by_instance["r1#1"]))
    decision, n = next(iter(bad.client_by_instance["r1#1"][model].items()))
    bad.killed_counters[model][decision] = n - 1  # one answer its counters missed
    bad.killed_requests = bad.client_requests["r1#1"] + 1
    problems = "\n".join(accounting_problems(bad))
    assert "r1#1: answered more than its own counters say" in problems
    assert "r1#1: counted" in problems


# --- gRPC through haproxy's HTTP/2 listener, one replica hung then SIGKILLed ----------------


@pytest.fixture(scope="module")
def killed_grpc(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> FleetSoakResult:
    tool("haproxy"), tool("prometheus")
    cfg = FleetSoakConfig(repo=model_repo, workdir=tmp_path_factory.mktemp("fleet-grpc"),
                          duration_s=KILL_DURATION_S, concurrency=8, kill_at=0.25,
                          restart_at=0.4, signal="kill", freeze_s=FREEZE_S,
                          protocol="grpc")  # fmt: skip
    res = run_fleet_soak(cfg)
    print(f"\ngRPC fleet soak with SIGKILL, {KILL_DURATION_S} s: {res.requests} calls, {res.ok} "
          f"ok, errors {res.errors}, haproxy {res.balancer}, events {res.events}, images run "
          f"twice {res.duplicated_inference_images}")  # fmt: skip
    return res


def test_grpc_calls_survive_a_killed_replica(killed_grpc: FleetSoakResult) -> None:
    res = killed_grpc
    assert res.requests > 50
    assert (res.lost, res.duplicated, res.errors) == (0, 0, {})
    assert res.ok == res.requests
    assert res.victim_exit_code == -9
    assert set(res.by_replica) == {"r0", "r1", "r2"}
    assert {"r0#1", "r1#1", "r1#2", "r2#1"} <= set(res.client_by_instance)
    assert res.balancer["wretr"] >= 1, res.balancer  # haproxy resent calls r1 held
    assert res.balancer["hrsp_5xx"] == 0
    # The replicas' request counters (protocol grpc) and images add up to the client's.
    assert accounting_problems(res) == []
    for inst in ("r0#1", "r2#1", "r1#2"):
        assert res.scraped_requests[inst] == res.client_requests[inst], inst
        assert res.scraped_by_instance[inst] == res.client_by_instance[inst], inst
    assert res.killed_requests <= res.client_requests["r1#1"]
    assert 0 <= res.duplicated_inference_images <= 128 * res.balancer["wretr"]
