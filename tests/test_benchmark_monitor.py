"""The monitoring benchmarks' dry runs, end to end: a live service, a real Prometheus with the
deploy rules (the replay), the record folder under a burst."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.monitor_replay import ReplayConfig, replay, report
from benchmarks.records_burst import BurstConfig, burst

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_replay_stays_quiet_on_clean_images_and_fires_on_a_shift(model_repo: Path) -> None:
    """Synthetic digits the tiny model was calibrated on, then 30% uniform noise mixed in."""
    cfg = replace(ReplayConfig.tiny(model_repo), prometheus=shutil.which("prometheus") is not None)
    result = replay(cfg)
    clean, mixed = result.phases
    assert clean.requests == cfg.clean and clean.refused > 0
    assert clean.test_crossed_at is None and clean.alert_fired_at is None
    assert mixed.test_crossed_at is not None and mixed.test_crossed_at < cfg.mixed
    if cfg.prometheus:  # Prometheus sees the service's window after the client does
        assert mixed.alert_fired_at is not None and mixed.alert_fired_at >= mixed.test_crossed_at
    assert mixed.psi["j_score"] > clean.psi["j_score"]
    assert mixed.window_refuse_rate > clean.window_refuse_rate
    text = report(result)
    assert "| clean | 500 |" in text and result.date in text


def test_the_record_cap_holds_under_a_burst() -> None:
    cfg = BurstConfig.tiny()
    r = burst(cfg)
    assert r.refused_images > 0 and r.written > 0 and r.rotated > 0
    assert r.written + r.dropped_queue_full == r.refused_images
    assert 0 < r.max_folder_bytes <= cfg.cap_bytes and r.final_folder_bytes <= cfg.cap_bytes
