"""Batch observation counts exactly what the library's own observe() counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import J_BUCKETS, Children, observe_many, observe_one


def _hist() -> tuple[CollectorRegistry, Histogram]:
    r = CollectorRegistry()
    return r, Histogram("h", "test", ["model"], buckets=J_BUCKETS, registry=r)


def _samples(r: CollectorRegistry) -> dict[tuple[str, str], float]:
    """Bucket counts, count and sum by (sample name, le); creation times left out."""
    text = generate_latest(r).decode()
    return {
        (s.name, s.labels.get("le", "")): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if not s.name.endswith("_created")
    }


def _same(ref: CollectorRegistry, got: CollectorRegistry) -> None:
    want, have = _samples(ref), _samples(got)
    assert want.keys() == have.keys()
    for key, v in want.items():
        if key[0] == "h_sum":  # summed in another order: equal up to rounding
            assert have[key] == pytest.approx(v, rel=1e-12) or math.isnan(v) == math.isnan(
                have[key]
            )
        else:
            assert have[key] == v, key


def test_observe_many_matches_observe_one_by_one() -> None:
    rng = np.random.default_rng(0)
    # Values on bucket bounds, between them, below the first, above the last (+Inf) and NaN.
    values = np.concatenate(
        [rng.random(200), np.asarray(J_BUCKETS), [-1.0, 0.0, 1.5, 1e9, float("nan")]]
    )
    ref_registry, ref = _hist()
    got_registry, got = _hist()
    for v in values.tolist():
        ref.labels("m").observe(v)
    observe_many(got.labels("m"), values[:100])
    observe_many(got.labels("m"), values[100:-7])
    for one in values[-7:]:  # the few-values path, NaN included
        observe_many(got.labels("m"), [one])
    observe_many(got.labels("m"), [])
    _same(ref_registry, got_registry)
    assert _samples(got_registry)[("h_bucket", "+Inf")] == len(values) - 1  # all but NaN


def test_observe_one_matches_observe() -> None:
    """Bisection finds the bucket observe() finds by scanning: on the bounds, between them,
    below the first, past the last (+Inf), and none for NaN; from numpy scalars too."""
    rng = np.random.default_rng(1)
    values = [*rng.random(50).tolist(), *J_BUCKETS, -1.0, 0.0, 1.5, 1e9, float("inf"),
              float("nan"), np.float32(0.35), np.float64(0.05)]  # fmt: skip
    ref_registry, ref = _hist()
    got_registry, got = _hist()
    for v in values:
        ref.labels("m").observe(float(v))
        observe_one(got.labels("m"), float(v))
    _same(ref_registry, got_registry)


def test_sum_and_count_without_nan() -> None:
    ref_registry, ref = _hist()
    got_registry, got = _hist()
    values = [0.05, 0.051, 0.3, 2.0]
    for v in values:
        ref.labels("m").observe(v)
    observe_many(got.labels("m"), values)
    _same(ref_registry, got_registry)
    assert _samples(got_registry)[("h_sum", "")] == pytest.approx(sum(values))


def test_children_are_looked_up_once() -> None:
    _, h = _hist()
    of = Children(h)
    assert of("a") is of("a") is h.labels("a") and of("b") is not of("a")
