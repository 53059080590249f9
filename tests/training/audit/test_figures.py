"""The K-density table of the audit page, from hand-built rows."""

from __future__ import annotations

from pathlib import Path

from training.audit.figures import k_density_markdown


def _row(score: str, attack: str, eps: float, success: float, n: int, **extra: object) -> dict:
    return {"model": "m-rce", "score": score, "attack": attack, "eps": eps, "n": n,
            "planned_n": n, "attack_success": success, "norm": "linf", "threshold": 0.0481,
            "steps": 200, "restarts": 5,
            "clean_refusal": 0.05 if score == "k_density" else None, **extra}  # fmt: skip


def test_k_density_table_shows_each_attack_the_largest_run_and_j_beside_it() -> None:
    rows = [
        _row("k_density", "lagrangian", 0.3, 1.0, 100),
        _row("k_density", "lagrangian", 0.3, 0.99, 1000),
        _row("k_density", "worst-case", 0.3, 0.99, 1000),
        _row("k_density", "selective", 0.1, 0.91, 100),
        _row("k_density", "lagrangian", 0.1, 0.92, 100),
        _row("k_density", "none", 0.0, 0.0002, 5000),
        _row("k_density", "lagrangian", 0.1, 0.93, 100, steps=1000, restarts=1),
        _row("j", "worst-case", 0.1, 0.92, 1000),
        _row("k_density", "cw-l2", 1.0, 0.5, 100, norm="l2"),
    ]
    text = k_density_markdown(rows)
    lines = [line for line in text.splitlines() if line.startswith("| m-rce")]
    assert lines == [
        "| m-rce | 0.1 | 0.0481 | - | 92.0% (n 100) | 91.0% (n 100) | - | 93.0% (n 100) "
        "| 92.0% (n 1000) |",
        "| m-rce | 0.3 | 0.0481 | 99.0% (n 1000) | 99.0% (n 1000) | - | - | - | - |",
    ]


def test_k_density_table_says_when_nothing_ran() -> None:
    assert k_density_markdown([]) == "(not run yet)"


def test_k_density_vs_j_figure_is_written(tmp_path: Path) -> None:
    from PIL import Image

    from training.audit.figures import k_density_vs_j

    rows = [
        _row("k_density", "worst-case", 0.1, 0.92, 100),
        _row("k_density", "worst-case", 0.3, 1.0, 1000),
        _row("j", "worst-case", 0.1, 0.92, 1000),
    ]
    k_density_vs_j(rows, tmp_path / "kd.png")
    with Image.open(tmp_path / "kd.png") as im:
        assert im.format == "PNG" and im.width > 200
