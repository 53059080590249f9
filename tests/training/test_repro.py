"""`notsure repro`: every experiment's --dry-run code path end to end, and its building blocks.

The experiments run on the synthetic set (learnable in a few steps), so the assertions are about
real behaviour: the nets learn it, the report sections are written and replaced, the JSON is
strict, and the aggregation (sweeps, AUC, predictive averaging) matches brute-force formulas.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from service.manifest import MANIFEST_FILE, Manifest
from training.evaluation import refuse_at_clean_rate, roc_auc
from training.repro import bnn, cnn_pair, table1, tsne
from training.repro.common import Output, update_section, write_json
from training.repro.detection import sweep
from training.repro.posterior import PosteriorPredictive

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _output(root: Path) -> Output:
    (root / "out").mkdir(parents=True, exist_ok=True)
    return Output(root / "out", root / "reproduction.md")


def _strict_json(path: Path) -> dict[str, object]:
    def reject(token: str) -> None:
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(path.read_text(), parse_constant=reject)  # type: ignore[arg-type]


def _section(report: Path, name: str) -> str:
    text = report.read_text()
    begin, end = f"<!-- BEGIN repro:{name} -->", f"<!-- END repro:{name} -->"
    assert text.count(begin) == 1 and text.count(end) == 1
    return text[text.index(begin) : text.index(end)]


# --- building blocks -------------------------------------------------------------------------


def test_update_section_replaces_its_block_and_keeps_hand_written_text(tmp_path: Path) -> None:
    report = tmp_path / "r.md"
    update_section(report, "a", "Section A", "first")
    report.write_text(report.read_text() + "\nhand-written note\n")
    update_section(report, "b", "Section B", "bee")
    update_section(report, "a", "Section A", "second")
    text = report.read_text()
    assert "second" in text and "first" not in text
    assert text.count("## Section A") == 1 and "hand-written note" in text and "bee" in text
    assert text.index("second") < text.index("hand-written note") < text.index("bee")


def test_write_json_is_strict(tmp_path: Path) -> None:
    write_json(tmp_path / "x.json", {"a": float("nan"), "b": np.float32(0.5), "c": np.arange(3)})
    saved = _strict_json(tmp_path / "x.json")
    run = saved.pop("run")  # every results file says when and where it was measured
    assert saved == {"a": None, "b": 0.5, "c": [0, 1, 2]}
    assert set(run) == {"date", "machine"} and "CPU cores" in run["machine"]


def test_roc_auc_is_the_pairwise_ordering_probability() -> None:
    rng = np.random.default_rng(0)
    normal, adv = rng.normal(1.0, 1.0, 60), rng.normal(0.0, 1.0, 40)
    adv[:5] = normal[:5]  # ties count one half
    pairs = normal[:, None] - adv[None, :]
    expected = ((pairs > 0).sum() + 0.5 * (pairs == 0).sum()) / pairs.size
    assert roc_auc(normal, adv) == pytest.approx(expected)
    assert math.isnan(roc_auc(normal, adv[:0]))


def test_sweep_matches_a_per_threshold_loop() -> None:
    rng = np.random.default_rng(1)
    scores = rng.random(200)
    correct = rng.random(200) < 0.7
    is_adv = np.arange(200) >= 100
    grid = np.array([0.0, 0.3, 0.9, 2.0])
    out = sweep(scores, correct, is_adv, grid)
    for i, t in enumerate(grid):
        acc = scores >= t
        expected_acc = correct[acc].mean() if acc.any() else float("nan")
        assert out["refuse_rate"][i] == pytest.approx(1 - acc.mean(), abs=1e-6)
        assert out["refuse_rate_adversarial"][i] == pytest.approx(1 - acc[100:].mean(), abs=1e-6)
        assert out["refuse_rate_clean"][i] == pytest.approx(1 - acc[:100].mean(), abs=1e-6)
        assert out["accuracy_of_output"][i] == pytest.approx(expected_acc, abs=1e-6, nan_ok=True)


def test_refuse_at_clean_rate_refuses_that_share_of_clean() -> None:
    clean = np.linspace(0.0, 1.0, 101)
    t, refused = refuse_at_clean_rate(clean, np.array([0.01, 0.2, 0.5]), 0.10)
    assert (clean < t).mean() == pytest.approx(0.10, abs=0.01)
    assert refused == pytest.approx(1 / 3)  # only 0.01 is below T ~ 0.1


def test_posterior_predictive_is_the_mean_of_softmaxes() -> None:
    torch.manual_seed(0)
    nets = [torch.nn.Linear(4, 3) for _ in range(5)]
    x = torch.randn(7, 4)
    expected = torch.stack([torch.softmax(n(x), -1) for n in nets]).mean(0)
    with torch.no_grad():
        got = torch.softmax(PosteriorPredictive(nets)(x), -1)
    assert torch.allclose(got, expected, atol=1e-6)


def test_knn_accuracy_matches_brute_force() -> None:
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(80, 3))
    labels = rng.integers(0, 3, 80)
    feats[labels == 1] += 3.0
    d = ((feats[:, None] - feats[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nn5 = np.argsort(d, axis=1)[:, :5]
    pred = np.array([np.bincount(labels[i], minlength=3).argmax() for i in nn5])
    assert tsne.knn_accuracy(feats, labels) == pytest.approx((pred == labels).mean())


# --- experiments, --dry-run -------------------------------------------------------------------


@pytest.fixture(scope="module")
def table4_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, object], Output]:
    root = tmp_path_factory.mktemp("table4")
    out = _output(root)
    cfg = cnn_pair.CnnPairConfig.tiny(runs_dir=root / "runs")
    return cnn_pair.run(cfg, out, "table4"), out


def test_table4_dry_run_trains_both_cnns_and_writes_its_report(
    table4_run: tuple[dict[str, object], Output],
) -> None:
    summary, out = table4_run
    saved = _strict_json(out.json_path("table4"))
    assert saved["paper"] == {"ce": 0.9881, "rce": 0.9879}
    for obj in ("ce", "rce"):
        m = summary["models"][obj]  # type: ignore[index]
        assert m["steps"] == 30 and m["test_accuracy"] >= 0.9  # the synthetic set is learnable
        assert [r["eps"] for r in m["fgsm"]] == [0.1, 0.3]
        # A bigger FGSM step fools at least as many images.
        assert m["fgsm"][1]["adversarial_accuracy"] <= m["fgsm"][0]["adversarial_accuracy"]
    assert out.png_path("table4").read_bytes()[:8] == PNG_MAGIC
    section = _section(out.report, "table4")
    assert "98.81%" in section and "(out/table4.png)" in section


def test_table4_rerun_resumes_and_replaces_its_section(
    table4_run: tuple[dict[str, object], Output], tmp_path: Path
) -> None:
    summary, out = table4_run
    first = summary["models"]["ce"]["run_dir"]  # type: ignore[index]
    cfg = cnn_pair.CnnPairConfig.tiny(runs_dir=Path(first).parent, eps=(0.2,))
    again = cnn_pair.run(cfg, out, "table4")
    # Resumed from the finished checkpoint: same weights, same accuracy, no new steps.
    assert again["models"]["ce"]["test_accuracy"] == summary["models"]["ce"]["test_accuracy"]  # type: ignore[index]
    assert "| CE | 0.2 |" in _section(out.report, "table4")
    assert "| CE | 0.1 |" not in _section(out.report, "table4")


def test_bnn_dry_run_compares_three_models_on_the_mixed_set(tmp_path: Path) -> None:
    out = _output(tmp_path)
    summary = bnn.run(bnn.BnnConfig.tiny(runs_dir=tmp_path / "runs"), out)
    models = summary["models"]
    assert set(models) == {"ce", "rce", "bnn"}  # type: ignore[arg-type]
    for r in models.values():  # type: ignore[attr-defined]
        for m in ("confidence", "j_score"):
            s = r[f"sweep_{m}"]
            assert s["threshold"][0] == 0.0 and s["refuse_rate"][0] == 0.0
            # At T = 0 every answer is returned: accuracy of the mixed set.
            mixed = (r["clean_accuracy"] + r["adversarial_accuracy"]) / 2
            assert s["accuracy_of_output"][0] == pytest.approx(mixed, abs=1e-5)
            assert np.all(np.diff(s["refuse_rate"]) >= 0)
    assert models["bnn"]["samples"] == 4  # type: ignore[index]
    _strict_json(out.json_path("bnn"))
    assert out.png_path("bnn").read_bytes()[:8] == PNG_MAGIC
    assert "SGNHT" in _section(out.report, "bnn")


def test_tsne_on_a_model_repository_checks_weights(model_repo: Path, tmp_path: Path) -> None:
    out = _output(tmp_path)
    cfg = tsne.TsneConfig.tiny((model_repo / "tiny-ce" / "1", model_repo / "tiny-rce" / "1"))
    summary = tsne.run(cfg, out)
    for obj in ("ce", "rce"):
        r = summary["models"][obj]  # type: ignore[index]
        assert np.asarray(r["embedding"]).shape == (2, 120)
        assert r["knn5_accuracy_features"] >= 0.9  # the tiny models separate the synthetic set
        assert -1.0 <= r["silhouette_embedding"] <= 1.0
        assert "sha256 checked" in r["model"]
    assert "silhouette" in _section(out.report, "tsne")


def test_tsne_refuses_weights_that_do_not_match_the_manifest(
    writable_repo: Path, tmp_path: Path
) -> None:
    from training.modelio import WeightsMismatch

    weights = writable_repo / "tiny-ce" / "1" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    cfg = tsne.TsneConfig.tiny((writable_repo / "tiny-ce" / "1", writable_repo / "tiny-rce" / "1"))
    with pytest.raises(WeightsMismatch):
        tsne.run(cfg, _output(tmp_path))


def test_table1_collects_manifests_and_the_attack_report(model_repo: Path, tmp_path: Path) -> None:
    out = _output(tmp_path)
    attack_dir = tmp_path / "attack"
    cfg = table1.Table1Config(models_dir=model_repo, attack_dir=attack_dir)
    summary = table1.run(cfg, out)
    got = {r["model"]: r["clean_test_accuracy"] for r in summary["models"]}  # type: ignore[attr-defined]
    for name in ("tiny-ce", "tiny-rce"):
        m = Manifest.load(model_repo / name / "1" / MANIFEST_FILE)
        assert got[f"{name}/1"] == m.metrics["clean_test_accuracy"]
    assert "does not exist yet" in _section(out.report, "table1")

    attack_dir.mkdir()
    attack = {"name": "tiny-rce", "objective": "rce", "attacks": {"ce@0.1": {
        "adversarial_accuracy": 0.25, "auc_correct_and_successful": {"j_score": 0.875},
        "fixed_clean_refuse": {"0.05": {"j_score": {"refuse_adversarial": 0.5}}}}}}  # fmt: skip
    (attack_dir / "report.json").write_text(json.dumps({"attack": {}, "models": [attack]}))
    (attack_dir / "auc-ce.png").write_bytes(PNG_MAGIC)
    (attack_dir / "sweep-tiny-rce-ce.png").write_bytes(PNG_MAGIC)
    table1.run(cfg, out)
    section = _section(out.report, "table1")
    assert "(attack/report.json)" in section and "![auc-ce](attack/auc-ce.png)" in section
    assert "sweep-tiny" not in section  # per-model figures stay in the tool's own report
    assert "| tiny-rce | ce@0.1 | 25.0% | n/a | 0.875 | n/a | 50.0% |" in section


def test_table4_runs_on_cifar10_batches(tmp_path: Path) -> None:
    """The same command trains Table 2's CIFAR-10 CNN from the python batches (a tiny fake set)."""
    import pickle

    rng = np.random.default_rng(3)
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, 20).tolist()}  # fmt: skip
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))
    cfg = cnn_pair.CnnPairConfig(dataset="cifar10", data_dir=tmp_path / "data", steps=3,
                                 batch_size=20, eps=(0.1,), runs_dir=tmp_path / "runs")  # fmt: skip
    summary = cnn_pair.run(cfg, _output(tmp_path), "table4-cifar10")
    settings = summary["settings"]
    assert settings["train_samples"] == 100 and settings["test_samples"] == 20  # type: ignore[index]
    assert summary["paper"] is None  # Table 4's numbers are MNIST's
    assert "the simple CNN on cifar10" in (tmp_path / "reproduction.md").read_text()
