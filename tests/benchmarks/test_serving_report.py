"""The serving benchmark's verdicts are computed, not typed: check them on hand-made cells."""

from __future__ import annotations

from benchmarks.serving_report import Cell, ceiling, targets

RAW = {
    "batch1-intra1": {"img_s": 1000.0, "ms_per_run": 1.0},
    "batch1-intra2": {"img_s": 1600.0, "ms_per_run": 0.6},
    "batch1-parallel": {"img_s": 2000.0},
    "batch64-intra2": {"img_s": 2100.0, "ms_per_run": 30.5},
    "batch64-parallel": {"img_s": 2080.0},
}


def _cells() -> list[Cell]:
    return [
        Cell("notsure", "native", 1, 1, 700.0, 700.0, 0.9, 2.0, 0),
        Cell("notsure", "native", 1, 32, 900.0, 900.0, 30.0, 80.0, 0, raw_img_s=1000.0),
        Cell("notsure", "native", 1, 64, 1700.0, 1700.0, 30.0, 80.0, 0),  # no raw: the run's
        Cell("notsure", "v2-json", 1, 1, 650.0, 650.0, 1.1, 2.0, 0),
        Cell("notsure", "v2-binary", 64, 8, 30.0, 1920.0, 250.0, 280.0, 0, raw_img_s=2000.0),
        Cell("notsure", "v2-binary", 64, 32, 28.0, 1792.0, 250.0, 280.0, 0, raw_img_s=2000.0),
        Cell("no-batching", "native", 1, 32, 580.0, 580.0, 50.0, 70.0, 0),
        Cell("pytriton", "v2-json-u8", 1, 1, 250.0, 250.0, 4.0, 6.0, 0),
        Cell("pytriton", "v2-binary-u8", 64, 32, 29.0, 1856.0, 4.0, 6.0, 0),
        Cell("fastapi-lean", "native", 1, 32, 950.0, 950.0, 40.0, 400.0, 0),
        Cell("fastapi-lean", "native-float", 1, 32, 500.0, 500.0, 40.0, 400.0, 0),  # no pair
    ]


def test_ceiling_is_best_batched_over_best_batch_one() -> None:
    assert ceiling(RAW).endswith("2100 img/s vs best batch-1 2000 img/s = 1.05x.")


def test_targets_from_cells() -> None:
    got = {name: (measured, ok) for name, measured, ok in targets(_cells(), RAW)}
    # Each peer cell against notsure's cell carrying the same request, same images and c.
    assert got["1-image v2-json c=1 ahead of pytriton (v2-json-u8)"] == ("650 vs 250 req/s", True)
    assert got["64-image v2-binary c=32 ahead of pytriton (v2-binary-u8)"] == (
        "28 vs 29 req/s",
        False,
    )
    assert got["1-image native c=32 ahead of fastapi-lean (native)"] == ("900 vs 950 req/s", False)
    assert not any("native-float" in name for name in got)  # notsure has no such cell here
    every = got["ahead of every compared server at every concurrency, every body kind"]
    assert every == ("closest: 900 vs 950 req/s (fastapi-lean native, 1-image, c=32, 0.95x)", False)
    # c >= 32 only; the ceiling measured just before the cell, else the run's parallel figure.
    assert got["1-image native >= 80% of the batch-1 ceiling at c >= 32"] == (
        "worst 1700 vs 2000 img/s (85%) at c=64",
        True,
    )
    assert got["64-image v2-binary >= 90% of the batch-64 ceiling at every concurrency"] == (
        "worst 1792 vs 2000 img/s (90%) at c=32",
        False,  # 89.6%
    )
    assert got["1-image c=32 >= 1.5x batching off"] == ("900 vs 580 req/s (1.55x)", True)
    # The lowest batch-1 run time of the raw table is the latency budget's base.
    assert got["p50 at c=1 (native) within 0.4 ms of raw onnxruntime batch 1"] == (
        "0.90 ms vs 0.60 + 0.4 ms",
        True,
    )
    assert got["p50 at c=1 (v2-json) within 0.4 ms of raw onnxruntime batch 1"] == (
        "1.10 ms vs 0.60 + 0.4 ms",
        False,
    )


def test_alternating_pairs_overrule_the_single_cells() -> None:
    ab = {
        "median_on": 820.0,
        "median_off": 660.0,
        "median_ratio": 1.24,
        "min_ratio": 1.13,
        "max_ratio": 1.36,
        "pairs": [{}] * 6,
    }
    rows = [r for r in targets(_cells(), RAW, ab) if "batching off" in r[0]]
    assert rows == [
        (
            "1-image c=32 >= 1.5x batching off (median of alternating pairs)",
            "820 vs 660 req/s, ratio median 1.24x (range 1.13-1.36, 6 pairs)",
            False,
        )
    ]


def test_a_peer_cell_that_answered_nothing_is_behind_and_has_no_ratio() -> None:
    cells = [
        Cell("notsure", "v2-json", 64, 64, 11.0, 704.0, 3880.0, 4990.0, 0),
        Cell("pytriton", "v2-json-u8", 64, 64, 0.0, 0.0, 0.0, 0.0, 0),
        Cell("notsure", "v2-json", 1, 1, 650.0, 650.0, 1.1, 2.0, 0),
        Cell("pytriton", "v2-json-u8", 1, 1, 250.0, 250.0, 4.0, 6.0, 0),
    ]
    got = {name: (measured, ok) for name, measured, ok in targets(cells, RAW)}
    assert got["64-image v2-json c=64 ahead of pytriton (v2-json-u8)"] == ("11 vs 0 req/s", True)
    every = got["ahead of every compared server at every concurrency, every body kind"]
    assert every == ("closest: 650 vs 250 req/s (pytriton v2-json-u8, 1-image, c=1, 2.60x)", True)


def test_cpu_per_image_against_onnxruntimes_own() -> None:
    """Server CPU per image over onnxruntime's at the batch the server could form; the target
    looks at c >= 8 only and names the worst cell."""
    cells = [
        # 2.4 ms of server CPU per 1-image request vs 2.0 ms/img at batch 32: 1.2x
        Cell(
            "notsure",
            "native",
            1,
            32,
            900.0,
            900.0,
            30.0,
            80.0,
            0,
            cpu_ms=2.4,
            raw_cpu_ms_per_img=2.0,
            raw_cpu_batch=32,
        ),
        # 64 images: 140.8 ms of CPU per request = 2.2 ms/img vs 1.6: 1.375x, the worst
        Cell(
            "notsure",
            "v2-binary",
            64,
            8,
            30.0,
            1920.0,
            250.0,
            280.0,
            0,
            cpu_ms=140.8,
            raw_cpu_ms_per_img=1.6,
            raw_cpu_batch=64,
        ),
        # c=1 is not held to the target (nothing to batch), however costly
        Cell(
            "notsure",
            "native",
            1,
            1,
            700.0,
            700.0,
            0.9,
            2.0,
            0,
            cpu_ms=9.0,
            raw_cpu_ms_per_img=2.5,
            raw_cpu_batch=1,
        ),
    ]
    assert cells[0].cpu_ratio == 1.2 and abs(cells[1].cpu_ratio - 1.375) < 1e-12  # type: ignore[operator]
    got = {name: (measured, ok) for name, measured, ok in targets(cells, RAW)}
    assert got["server CPU per image <= 1.3x onnxruntime's own at c >= 8, every body kind"] == (
        "worst 1.38x (v2-binary, 64-image, c=8: 2.200 vs 1.600 ms at batch 64)",
        False,
    )
    assert Cell("x", "native", 1, 8, 1.0, 1.0, 1.0, 1.0, 0).cpu_ratio is None  # not measured
