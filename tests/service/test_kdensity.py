"""K-density against values computed by hand, one kernel term at a time."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.kdensity import KernelSet, build_kernel_set, k_density, log_k_density

# Two classes, two training features each, in 2-D.
KSET = KernelSet(
    features=np.array([[[0.0, 0.0], [1.0, 0.0]], [[3.0, 3.0], [3.0, 4.0]]], np.float32),
    sigma2=0.5,
)


def hand_kd(f: tuple[float, float], refs: list[tuple[float, float]], sigma2: float) -> float:
    terms = [math.exp(-((f[0] - a) ** 2 + (f[1] - b) ** 2) / sigma2) for a, b in refs]
    return sum(terms) / len(terms)


def test_k_density_matches_hand_computation() -> None:
    f = np.array([[0.5, 0.5], [3.0, 3.5], [0.0, 0.0]])
    labels = np.array([0, 1, 1])
    got = k_density(f, labels, KSET)
    # [0.5, 0.5] to (0, 0) and (1, 0): squared distances 0.5 and 0.5 -> exp(-1).
    assert got[0] == pytest.approx(math.exp(-1.0))
    assert got[1] == pytest.approx(hand_kd((3.0, 3.5), [(3, 3), (3, 4)], 0.5))
    assert got[2] == pytest.approx(hand_kd((0.0, 0.0), [(3, 3), (3, 4)], 0.5), rel=1e-9)


def test_log_k_density_stays_finite_far_away() -> None:
    # 100 units away, exp(-20000) underflows to 0; the log keeps the value: -d^2 / sigma^2.
    f = np.array([[100.0, 0.0]])
    lk = log_k_density(f, np.array([0]), KernelSet(KSET.features[:, :1], 0.5))
    assert lk[0] == pytest.approx(-(100.0**2) / 0.5)
    assert k_density(f, np.array([0]), KSET)[0] == 0.0


def test_shape_errors_name_the_expected_shape() -> None:
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        k_density(np.zeros((3, 5)), np.zeros(3, np.int64), KSET)
    with pytest.raises(ValueError, match="sigma2"):
        KernelSet(KSET.features, 0.0)


def test_build_kernel_set_takes_the_first_per_class() -> None:
    f = np.arange(12, dtype=np.float32).reshape(6, 2)
    labels = np.array([1, 0, 1, 0, 1, 0])
    ks = build_kernel_set(f, labels, 2, 2, 1.0)
    assert ks.features.tolist() == [[[2, 3], [6, 7]], [[0, 1], [4, 5]]]
    with pytest.raises(ValueError, match="class 2"):
        build_kernel_set(f, labels, 3, 2, 1.0)


def npy_bytes(a: np.ndarray, **kw: bool) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a, **kw)
    return buf.getvalue()


def test_read_kernel_array_round_trips_and_refuses_anything_else() -> None:
    from service.kdensity import read_kernel_array

    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert np.array_equal(read_kernel_array(npy_bytes(a)), a)
    with pytest.raises(ValueError, match="float32"):
        read_kernel_array(npy_bytes(a.astype(np.float64)))
    with pytest.raises(ValueError, match="data bytes"):
        read_kernel_array(npy_bytes(a)[:-4])
    with pytest.raises(ValueError, match="float32"):
        read_kernel_array(npy_bytes(np.array([{"x": 1}], dtype=object), allow_pickle=True))
    with pytest.raises(ValueError, match=r"not a \.npy"):
        read_kernel_array(b"PK\x03\x04 not an npy file at all")


def test_scores_k_density_per_request_rows_match_the_whole_batch() -> None:
    """What a request reads from its rows of a batch equals K-density over the whole batch,
    sliced (the same numbers whichever way the batch was cut)."""
    from service.scoring import Kernel, score_logits

    rng = np.random.default_rng(3)
    kset = KernelSet(rng.normal(size=(3, 20, 4)).astype(np.float32), sigma2=0.5)
    logits = rng.normal(size=(7, 3)).astype(np.float32)
    feats = rng.normal(size=(7, 4)).astype(np.float32)
    s = score_logits(logits, Kernel(mu=math.log(2), sigma=0.3), "j_score", feats, kset)
    want = k_density(feats, logits.argmax(1), kset)
    assert s.k_density is not None
    np.testing.assert_allclose(s.k_density, want, rtol=1e-12)
    parts = [s.rows(0, 2), s.rows(2, 3), s.rows(3, 7)]
    np.testing.assert_allclose(np.concatenate([p.named("k_density") for p in parts]), want)
    assert score_logits(logits, Kernel(mu=math.log(2), sigma=0.3)).k_density is None
