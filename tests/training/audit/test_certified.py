"""The audit with certified answers, on the tiny models: tiny-ce gets a bound graph whose
certificate its decision requires, tiny-rce none. Wins are the service's decisions, the
certificate included; a certified win whose ball holds its correctly labelled clean original
stops the audit; the certified plan's rows agree with independent figures.

Expected certificates come from the torch bounds (`training.certify.bounds.ibp`), independent of
the ONNX bound graph the audit runs; images whose smallest margin is within float32 rounding of
0 are left out of exact comparisons."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from service.scoring import score_logits
from training.audit import plans, store
from training.audit.jobs import plan_jobs
from training.audit.soundness import UnsoundCertificate, check_certified_wins
from training.audit.subject import AuditConfig, Model, Models, decided_wins
from training.certify.bounds import ibp
from training.certify.graph import export_model
from training.modelio import load_torch_model

MODELS = ("tiny-rce", "tiny-ce")
N = 64  # the dry run's test images


def _torch_certified(folder: Path, x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(labels, certified) of the served argmax from the torch net and its torch bounds;
    certified is -1 where the smallest margin is within float32 rounding of 0."""
    net, manifest = load_torch_model(folder)
    with torch.no_grad():
        z = net(torch.from_numpy(x)).numpy()
        margins = ibp(net, torch.from_numpy(x), eps, manifest.objective).margins.numpy()
    labels = (-z if manifest.objective == "rce" else z).argmax(axis=1)
    m = margins[np.arange(len(x)), labels]  # (N, L): the answer against every class
    m[np.arange(len(x)), labels] = np.inf
    least = m.min(axis=1)
    tol = 1e-5 * max(1.0, float(np.abs(margins).max()))
    return labels, np.where(np.abs(least) <= tol, -1, least > 0).astype(np.int64)


def _cfg(repo: Path, work: Path, **given: object) -> AuditConfig:
    base = AuditConfig(plan="headline", models=MODELS, models_dir=repo, work_dir=work / "work",
                       out_json=work / "adaptive.json", chunk=4, dry_run=True)  # fmt: skip
    return replace(base, **given)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def certified_repo(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, float]:
    """A copy of the tiny repository where tiny-ce has a bound graph that its decision
    requires, at a radius that certifies some but not all of its test images."""
    repo = tmp_path_factory.mktemp("certified-audit") / "models"
    shutil.copytree(model_repo, repo)
    folder = repo / "tiny-ce" / "1"
    x = Models(_cfg(repo, repo.parent))["tiny-ce"].data.x.numpy()
    for eps in (1e-5, 3e-6, 1e-6, 3e-7, 1e-7):  # the tiny ResNet-8s: only tiny radii
        _, cert = _torch_certified(folder, x, eps)
        if (cert == 1).sum() >= 8 and (cert == 0).sum() >= 8:
            break
    else:
        pytest.fail("no radius certifies some but not all of the tiny-ce test images")
    export_model(folder, parity_images=8, eps=eps, required=True)
    return repo, eps


@pytest.fixture(scope="module")
def audited(
    certified_repo: tuple[Path, float], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Models, list[dict[str, object]]]:
    """The headline plan run on the certified repository; its models and rows."""
    cfg = _cfg(certified_repo[0], tmp_path_factory.mktemp("audited"))
    models = Models(cfg)
    return models, plans.run(cfg, models)


class Liar:
    """A certifier that certifies every answer on a ball of radius 0.5: wrong answers too."""

    eps, required = 0.5, True

    def certify(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return np.ones(len(x), dtype=bool)


def test_a_certified_win_inside_the_ball_raises_and_one_outside_does_not(
    model_repo: Path, tmp_path: Path
) -> None:
    model = Models(_cfg(model_repo, tmp_path))["tiny-ce"]
    idx = np.array([3, 5, 9])
    linf = np.array([0.1, 0.2, 0.25])
    won = np.array([False, True, True])
    certified = np.array([True, False, True])
    with pytest.raises(UnsoundCertificate, match=r"tiny-ce, job some-job, image 9") as err:
        check_certified_wins(model, "some-job", idx, won, certified, linf, 0.3)
    assert (err.value.model, err.value.job, err.value.image) == ("tiny-ce", "some-job", 9)
    assert err.value.margin == pytest.approx(0.05)
    # The same win with its clean original outside the ball: the certificate says nothing.
    assert check_certified_wins(model, "j", idx, won, certified, linf, 0.2) == 0
    # ... or with a clean original the model labels wrongly (the claim may hold).
    y = model.data.y.clone()
    y[9] = (y[9] + 1) % 10
    wrong = Model(model.name, model.manifest, model.net, model.onnx, replace(model.data, y=y))
    assert check_certified_wins(wrong, "j", idx, won, certified, linf, 0.3) == 1


def test_a_certifier_that_certifies_wrong_answers_stops_the_audit(
    model_repo: Path, tmp_path: Path
) -> None:
    """A monkeypatched certifier says every answer is certified on a ball of radius 0.5: the
    first accepted wrong answer of an attack at eps <= 0.3 from its correct clean original is a
    counter-example, and the run stops on it with the saved image left to look at."""
    cfg = _cfg(model_repo, tmp_path, models=("tiny-ce",))
    models = Models(cfg)
    model = models["tiny-ce"]
    model.certifier = Liar()  # type: ignore[assignment]
    with pytest.raises(UnsoundCertificate) as err:
        plans.run(cfg, models)
    e = err.value
    job = next(j for j in plan_jobs("headline", ("tiny-ce",), True, models.served())
               if j.name == e.job)  # fmt: skip
    assert e.model == "tiny-ce" and 0 <= e.image < job.n and e.eps == 0.5
    assert 0 < e.linf <= job.attack.eps + 1e-6 and e.margin == pytest.approx(0.5 - e.linf)
    saved = store.load_chunks(store.job_dir(cfg, model, job))
    assert saved is not None
    i = int(np.flatnonzero(saved["idx"] == e.image)[0])
    assert saved["served_won"][i] and saved["certified"][i]
    clean = model.data.x[e.image : e.image + 1].numpy()
    assert model.served(clean, certify=False).label[0] == int(model.data.y[e.image])
    assert np.abs(saved["adv"][i] - clean[0]).max() == pytest.approx(e.linf)


def test_wins_need_a_certified_answer_where_the_model_requires_one(
    certified_repo: tuple[Path, float], audited: tuple[Models, list[dict[str, object]]]
) -> None:
    """The saved wins are the service's decisions: score at T, wrong, and certified by the
    bounds at the manifest's radius; without the certificate some of them would be wins."""
    repo, eps = certified_repo
    models, rows = audited
    model = models["tiny-ce"]
    assert model.certifier is not None and model.key != model.manifest.sha256
    refused_for_the_certificate = 0
    for job in plan_jobs("headline", ("tiny-ce",), True, models.served()):
        saved = store.load_chunks(store.job_dir(models.cfg, model, job))
        assert saved is not None
        y = model.data.y[: len(saved["idx"])].numpy()
        s = score_logits(model.onnx.run(saved["adv"]), model.manifest.kernel.to_kernel(),
                         "confidence")  # fmt: skip
        labels, cert = _torch_certified(repo / "tiny-ce" / "1", saved["adv"], eps)
        np.testing.assert_array_equal(labels, s.label)
        sure = cert >= 0
        np.testing.assert_array_equal(saved["certified"][sure], cert[sure] == 1)
        at_t = (s.label != y) & (s.confidence >= model.manifest.threshold)
        np.testing.assert_array_equal(saved["served_won"], at_t & saved["certified"])
        assert (saved["certify_eps"] == eps).all()
        refused_for_the_certificate += int((at_t & sure & (cert == 0)).sum())
    assert refused_for_the_certificate > 0  # the certificate changed some decisions
    for r in rows:
        if r["model"] == "tiny-ce":
            assert r["certify_eps"] == eps and r["certificate_required"] is True
        else:
            assert "certify_eps" not in r  # tiny-rce has no bound graph


def test_the_check_passes_on_the_real_bounds(
    certified_repo: tuple[Path, float], audited: tuple[Models, list[dict[str, object]]]
) -> None:
    """The real bound graph: answers to images within the radius of their clean originals are
    certified and right; certified wrong answers exist, on images far from the clean originals
    they are counted against, which the check leaves alone."""
    _, eps = certified_repo
    model = audited[0]["tiny-ce"]
    x, y = model.data.x.numpy(), model.data.y.numpy()
    idx = np.arange(len(x))
    rng = np.random.default_rng(0)
    near = np.clip(x + eps / 2 * rng.choice([-1.0, 1.0], size=x.shape), 0, 1).astype(np.float32)
    far = x[np.roll(idx, 1)]  # another image, labelled as the next one's original
    for adv in (near, far):
        s = model.served(adv)
        assert s.certified is not None
        won = decided_wins(s, y, "confidence", model.manifest.threshold)
        linf = np.abs(adv - x).reshape(len(x), -1).max(axis=1)
        assert check_certified_wins(model, "real", idx, won, s.certified, linf, eps) == 0
        if adv is near:
            assert (s.certified & (linf <= eps)).sum() >= 8 and not won.any()
        else:
            assert (won & s.certified).any() and (linf > eps).all()


def test_the_certified_plan_sets_the_bounds_beside_the_worst_case(
    certified_repo: tuple[Path, float], audited: tuple[Models, list[dict[str, object]]]
) -> None:
    repo, eps = certified_repo
    models, rows = audited
    plans.run(replace(models.cfg, plan="certified"), models)
    path = models.cfg.out_json.with_name("certified.json")
    got = json.loads(path.read_text())
    assert [(r["model"], r["eps"]) for r in got] == [
        ("tiny-ce", e) for e in sorted({eps, 0.1, 0.2, 0.3})
    ]
    model = models["tiny-ce"]
    x, y = model.data.x.numpy(), model.data.y.numpy()
    clean = score_logits(model.onnx.run(x), model.manifest.kernel.to_kernel(), "confidence")
    accepted = clean.confidence >= model.manifest.threshold
    for r in got:
        assert set(r["run"]) == {"date", "machine"} and r["images"] == N
        assert r["served_radius"] == (r["eps"] == eps) and r["certificate_required"] is True
        labels, cert = _torch_certified(repo / "tiny-ce" / "1", x, float(r["eps"]))
        sure, yes = cert >= 0, cert == 1
        right = labels == y
        # Certified: every image of the ball labelled y (the clean label is right here).
        lo, hi = (yes & right).sum() / N, ((yes | ~sure) & right).sum() / N
        assert lo - 1e-4 <= r["certified_accuracy"] <= hi + 1e-4
        assert r["certified_handled"] >= r["certified_accuracy"] - 1e-4
        # The policy's extra clean refusals: accepted at T, label not certified at eps.
        lo, hi = (accepted & (cert == 0)).sum() / N, (accepted & (cert != 1)).sum() / N
        assert lo - 1e-4 <= r["policy_clean_refusals"] <= hi + 1e-4
        wc = [w for w in rows if w["model"] == "tiny-ce" and w["attack"] == "worst-case"
              and w["norm"] == "linf" and w["eps"] == r["eps"] and w["clean_refusal"] is None
              and w["score"] == "confidence"]  # fmt: skip
        if r["eps"] == eps:  # no attack at the certificate's own radius
            assert not wc and r["worst_case_handled"] is None
        else:
            [w] = wc
            assert (r["worst_case_handled"], r["worst_case_n"]) == (w["handled"], w["n"])
    refusals = [r["policy_clean_refusals"] for r in got]
    assert max(refusals) > 0  # the certificate refuses clean answers that T accepts
    table = path.with_suffix(".md").read_text()
    assert table.startswith("| model | eps | certified (bounds) |")
    assert table.count("| tiny-ce") == len(got) and "tiny-rce" not in table


@pytest.mark.slow
def test_dry_run_of_the_plan_from_the_command_line(model_repo: Path, tmp_path: Path) -> None:
    """`notsure audit --dry-run --plan certified` gives the tiny models their bound graphs
    (required, at the dry run's radius) and reports both; no attack has run at the new key."""
    from typer.testing import CliRunner

    from notsure.cli import app
    from training.audit.certified import DRY_RUN_EPS

    work = tmp_path / "audit"
    shutil.copytree(model_repo, work / "dry-run-models")  # built already: no training here
    result = CliRunner().invoke(app, ["audit", "--dry-run", "--plan", "certified",
                                      "--work-dir", str(work)])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads((work / "certified.json").read_text())
    assert {(r["model"], r["eps"]) for r in rows} == {
        (m, e) for m in MODELS for e in (DRY_RUN_EPS, 0.1, 0.2, 0.3)
    }
    assert all(r["worst_case_handled"] is None for r in rows)
    assert "tiny-ce eps 0.3: certified handled 0.0% (n 64)" in result.output
    assert f"rows: {work / 'certified.json'}" in result.output


@pytest.mark.integration
def test_the_live_service_decides_and_certifies_as_the_audit(
    audited: tuple[Models, list[dict[str, object]]],
) -> None:
    """The saved images replayed through a running service with the bound graph: the same
    wins and, image by image, the same certificates as the audit saved."""
    from service.config import Settings
    from tests.conftest import LiveServer

    models, _ = audited
    with LiveServer(Settings(model_repository=models.cfg.models_dir)) as server:
        plans.run(replace(models.cfg, plan="live", url=server.url), models)
    rows = json.loads(models.cfg.out_json.with_name("live.json").read_text())
    ce = [r for r in rows if r["model"] == "tiny-ce"]
    assert len(ce) == 4 and all(r["disagree"] == 0 and r["certified_disagree"] == 0 for r in ce)
    assert sum(r["live_certified"] for r in ce) > 0
    assert all("live_certified" not in r for r in rows if r["model"] == "tiny-rce")


@pytest.mark.integration
def test_a_service_that_certifies_wrong_answers_stops_the_live_replay(
    certified_repo: tuple[Path, float], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bound graph monkeypatched to certify everything, with tiny-ce's radius 0.5: the
    rows built offline stop on it, and so does the replay of the saved images through the
    service, on the service's own `certified` output."""
    from service.certify import CertifyGraph
    from service.config import Settings
    from tests.conftest import LiveServer

    repo = tmp_path / "models"
    shutil.copytree(certified_repo[0], repo)
    path = repo / "tiny-ce" / "1" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "certify_eps": 0.5}))
    monkeypatch.setattr(CertifyGraph, "certify", lambda self, x, labels: np.ones(len(x), bool))
    cfg = _cfg(repo, tmp_path, models=("tiny-ce",))
    models = Models(cfg)
    with pytest.raises(UnsoundCertificate):
        plans.run(cfg, models)  # the chunk with the counter-example is saved first
    with (
        LiveServer(Settings(model_repository=repo)) as server,
        pytest.raises(UnsoundCertificate, match=r"\(live\)") as err,
    ):
        plans.run(replace(cfg, plan="live", url=server.url), models)
    assert err.value.model == "tiny-ce" and err.value.eps == 0.5
