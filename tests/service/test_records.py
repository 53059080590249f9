"""Refused-input records: what a real client saw is what is written, images open, the disk cap
holds, a full queue drops and counts instead of blocking, and `notsure records` reads them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from notsure.cli import app as cli
from service.config import Settings
from service.main import create_app
from service.metrics import Metrics
from service.records import RecordCounts, RecordWriter

ROOT = Path(__file__).resolve().parents[2]
MODEL = "mnist-resnet32-rce"


def settings(folder: Path, **kw: object) -> Settings:
    return Settings(model_repository=ROOT / "models", models=[MODEL], device="cpu",
                    grpc_enabled=False, record_dir=folder, **kw)  # type: ignore[arg-type]  # fmt: skip


def noise(n: int, seed: int) -> np.ndarray:
    """(n, 28, 28) uniform noise rounded to 8 bits (so that the PNG holds it exactly)."""
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28)) / 255.0


def counter(text: str, name: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise KeyError(name)


def test_records_are_off_by_default(tmp_path: Path) -> None:
    with TestClient(create_app(settings(tmp_path / "rec"))) as c:
        r = c.post(f"/v1/models/{MODEL}/predict", json={"instances": noise(3, 0).tolist()})
        assert {p["decision"] for p in r.json()["predictions"]} == {"not_sure"}
    assert not (tmp_path / "rec").exists()


def test_100_noise_images_give_100_records(tmp_path: Path) -> None:
    folder = tmp_path / "rec"
    x = noise(100, 1)
    seen = []
    with TestClient(create_app(settings(folder, record_rate=1.0))) as c:
        for i in range(0, 100, 10):
            rid = f"req-{i}"
            r = c.post(f"/v1/models/{MODEL}/predict", headers={"x-request-id": rid},
                       json={"instances": x[i : i + 10].tolist()})  # fmt: skip
            assert r.status_code == 200
            body = r.json()
            seen += [(rid, j, body, p) for j, p in enumerate(body["predictions"])]
    # Leaving the client shut the app down: the writer has written all it was given.
    assert all(p["decision"] == "not_sure" for *_, p in seen)
    metas = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    assert len(metas) == 100 and len(list(folder.glob("*.png"))) == 100
    by_key = {(m["request_id"], m["index"]): m for m in metas}
    for k, (rid, j, body, p) in enumerate(seen):
        m = by_key[rid, j]
        assert (m["model"], m["version"], m["threshold"]) == (MODEL, 1, body["threshold"])
        assert m["score_name"] == p["score_name"] == "j_score"
        assert m["score"] == pytest.approx(p["score"], rel=1e-12)
        for score in ("j_score", "confidence", "non_me"):
            assert m["scores"][score] == pytest.approx(p[score], rel=1e-12)
        assert set(m["scores"]) == {"j_score", "confidence", "non_me", "energy"}
        with Image.open(folder / m["image"]) as im:
            assert im.format == "PNG" and im.mode == "L" and im.size == (28, 28)
            np.testing.assert_array_equal(np.asarray(im), np.rint(x[k] * 255).astype(np.uint8))


def test_the_disk_cap_holds_under_a_burst(tmp_path: Path) -> None:
    folder = tmp_path / "rec"
    cap = 40_000  # about 25 records of 28x28 noise
    with TestClient(create_app(settings(folder, record_rate=1.0, record_max_bytes=cap))) as c:
        for i in range(12):
            c.post(f"/v1/models/{MODEL}/predict", json={"instances": noise(25, i).tolist()})
        text = c.get("/metrics").text
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert 0 < size <= cap
    written = counter(text, "notsure_records_written_total")
    rotated = counter(text, "notsure_records_rotated_total")
    dropped = counter(text, "notsure_records_dropped_total", reason="queue_full")
    kept = len(list(folder.glob("*.json")))
    assert kept == len(list(folder.glob("*.png"))) > 10
    # Up to the last scrape: written + dropped never exceeds what was refused, and what the
    # folder keeps is what was written minus what rotation deleted (later writes included).
    assert written + dropped <= 300 and rotated > 0
    assert not list(folder.glob(".*.tmp"))


def test_a_full_queue_drops_and_counts(tmp_path: Path) -> None:
    """Nothing drains the queue (the writer is not started): offers beyond it never block."""
    metrics = Metrics()
    writer = RecordWriter(tmp_path, 1.0, 10**6, 2, RecordCounts(metrics))
    with TestClient(create_app(settings(tmp_path / "unused"))) as c:
        state = c.app.state.notsure  # type: ignore[attr-defined]
        model = state.repository.get(MODEL)
        from service.scoring import Outcome, decide

        x = noise(5, 3).astype(np.float32)[:, None]
        scores = model.scorer(x, [5])[0]
        outcome = Outcome(scores, model.threshold, decide(scores, model.threshold))
        writer.offer(model, "r", x, outcome, np.arange(5))
    assert writer._queue.qsize() == 2
    assert writer.counts.dropped.labels("queue_full")._value.get() == 3


def test_the_cli_lists_and_exports(tmp_path: Path) -> None:
    folder = tmp_path / "rec"
    with TestClient(create_app(settings(folder, record_rate=1.0))) as c:
        c.post(f"/v1/models/{MODEL}/predict", headers={"x-request-id": "abc"},
               json={"instances": noise(4, 5).tolist()})  # fmt: skip
    runner = CliRunner()
    listed = runner.invoke(cli, ["records", "list", "--dir", str(folder), "--json"])
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.output.splitlines()]
    assert [r["request_id"] for r in rows] == ["abc"] * 4
    assert sorted(r["index"] for r in rows) == [0, 1, 2, 3]
    out = tmp_path / "export"
    done = runner.invoke(
        cli, ["records", "export", str(out), "--dir", str(folder), "--model", MODEL]
    )
    assert done.exit_code == 0, done.output
    assert len(list(out.glob("*.png"))) == 4
    assert len((out / "records.jsonl").read_text().splitlines()) == 4
    header, *lines = (out / "labels.csv").read_text().splitlines()
    assert header.endswith("true_label") and len(lines) == 4
    missing = runner.invoke(cli, ["records", "list", "--dir", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and "NOTSURE_RECORD_DIR" in missing.output
