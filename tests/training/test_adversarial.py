"""Adversarial training: the inner attack against a reference library, the ball it stays in, the
collapse guard, and `notsure train --adversarial` end to end."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from notsure.cli import app
from service.manifest import MANIFEST_FILE, Manifest
from training.adversarial import (
    AdversarialConfig,
    Adversary,
    linf_pgd,
    robust_accuracy,
    served_loss,
    trades_attack,
    trades_kl,
)
from training.data import synthetic
from training.nets import build_net
from training.train import TrainConfig, evaluate, lr_at, train

torchattacks = pytest.importorskip("torchattacks")


class Negated(nn.Module):
    """Serves softmax(-Z), as an RCE net does, to a library that applies softmax to the output."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.net(x)


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small MLP fitted to the synthetic set in a second: attacks have something to break."""
    torch.manual_seed(0)
    data = synthetic(256, seed=3)
    net = build_net("mlp", (1, 28, 28), 10)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(60):
        loss = nn.functional.cross_entropy(net(data.x), data.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval(), data.x[:64], data.y[:64]


def test_served_loss_is_cross_entropy_of_the_served_softmax() -> None:
    z = torch.tensor([[1.0, 2.0, 3.0]])
    y = torch.tensor([0])
    # By hand: CE net serves softmax(Z); RCE net serves softmax(-Z).
    ce = -math.log(math.exp(1) / (math.exp(1) + math.exp(2) + math.exp(3)))
    rce = -math.log(math.exp(-1) / (math.exp(-1) + math.exp(-2) + math.exp(-3)))
    assert served_loss("ce", z, y).item() == pytest.approx(ce, rel=1e-6)
    assert served_loss("rce", z, y).item() == pytest.approx(rce, rel=1e-6)


@pytest.mark.parametrize("objective", ["ce", "rce"])
def test_pgd_without_random_start_equals_torchattacks(
    trained: tuple[nn.Module, torch.Tensor, torch.Tensor], objective: str
) -> None:
    net, x, y = trained
    eps, steps, alpha = 0.1, 7, 0.03
    ours = linf_pgd(net, x, y, objective, eps, steps, alpha, random_start=False)  # type: ignore[arg-type]
    served = net if objective == "ce" else Negated(net)
    ref = torchattacks.PGD(served, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    assert torch.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 10])
def test_attack_stays_in_the_ball_and_the_pixel_range(
    trained: tuple[nn.Module, torch.Tensor, torch.Tensor], steps: int
) -> None:
    net, x, y = trained
    gen = torch.Generator().manual_seed(1)
    adv = linf_pgd(net, x, y, "rce", 0.2, steps, 0.25, random_start=True, generator=gen)
    assert (adv - x).abs().max() <= 0.2 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert not torch.equal(adv, x)


def test_robust_accuracy_falls_with_eps(
    trained: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    net, x, y = trained
    accs = [robust_accuracy(net, x, y, "ce", eps, steps=10) for eps in (0.0, 0.1, 0.3)]
    assert accs[0] > 0.9  # eps 0: clean accuracy of a fitted net
    assert accs[0] >= accs[1] >= accs[2]
    assert accs[2] < accs[0] - 0.3


def test_default_step_sizes_follow_the_papers() -> None:
    assert AdversarialConfig(kind="fgsm-rs", eps=0.3).default_step_size() == pytest.approx(0.375)
    assert AdversarialConfig(kind="pgd", eps=0.3, steps=40).default_step_size() == pytest.approx(
        2.5 * 0.3 / 40
    )
    ramp = AdversarialConfig(kind="pgd", eps=0.3, ramp_steps=100)
    assert ramp.eps_at(0) == pytest.approx(0.003) and ramp.eps_at(99) == pytest.approx(0.3)
    assert ramp.eps_at(500) == 0.3


@pytest.mark.parametrize("guard", ["backoff", "stop"])
def test_guard_restores_the_last_good_weights_on_a_collapse(
    trained: tuple[nn.Module, torch.Tensor, torch.Tensor], guard: str
) -> None:
    net, x, y = trained
    net = build_net("mlp", (1, 28, 28), 10)
    net.load_state_dict(trained[0].state_dict())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    cfg = AdversarialConfig(kind="fgsm-rs", eps=0.05, guard=guard, guard_images=64, guard_drop=0.2)  # type: ignore[arg-type]
    adversary = Adversary(cfg, "ce", seed=0)
    good = adversary.check(net, opt, x, y, step=10)
    assert good > 0.5  # a fitted net keeps most answers at this small eps
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():  # a collapsed net: every answer the same class
        for p in net.parameters():
            p.zero_()
    adversary.check(net, opt, x, y, step=20)
    assert adversary.checks[-1].get("collapsed") == 1.0
    for k, v in net.state_dict().items():
        assert torch.equal(v, saved[k]), k
    if guard == "stop":
        assert adversary.stopped
    else:
        assert not adversary.stopped
        assert adversary.step_size == pytest.approx(cfg.default_step_size() / 2)


def test_guard_off_never_restores(trained: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    net, x, y = trained
    net = build_net("mlp", (1, 28, 28), 10)
    net.load_state_dict(trained[0].state_dict())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    adversary = Adversary(AdversarialConfig(kind="pgd", eps=0.05, guard="off"), "ce", seed=0)
    adversary.check(net, opt, x, y, step=1)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    adversary.check(net, opt, x, y, step=2)
    assert "collapsed" not in adversary.checks[-1]
    assert all(bool((p == 0).all()) for p in net.parameters())


BASE = TrainConfig(
    dataset="synthetic",
    arch="mlp",
    steps=60,
    batch_size=32,
    optimizer="adam",
    lr=3e-3,
    weight_decay=0.0,
    eval_every=60,
    checkpoint_every=30,
    dry_run=True,
    threads=1,
)


@pytest.mark.parametrize("kind", ["pgd", "trades", "fgsm-rs"])
def test_adversarial_training_makes_the_net_more_robust(tmp_path: Path, kind: str) -> None:
    """Same data, steps and seed: adversarial training beats standard training under PGD."""
    from training.export import load_run

    eps = 0.2  # erases much of the synthetic classes' +0.7 bands; plain training falls to ~30%
    cfg = replace(BASE, steps=100, lr_drops=(), eval_every=100)
    adv = AdversarialConfig(kind=kind, eps=eps, steps=5, guard_every=50, guard_images=128)  # type: ignore[arg-type]
    plain = train(replace(cfg, out_dir=tmp_path / "plain"))
    robust = train(replace(cfg, out_dir=tmp_path / "robust", adversarial=adv))
    test = synthetic(256, seed=1)
    accs = {}
    for name, out in (("plain", plain.out_dir), ("robust", robust.out_dir)):
        net, _, _ = load_run(out)
        accs[name] = robust_accuracy(net, test.x, test.y, "rce", eps, steps=20)
    assert accs["robust"] > accs["plain"] + 0.3, accs
    assert len(robust.guard_checks) == 2 and not robust.stopped_early
    assert robust.test_accuracy > 0.9  # robust, and still right on clean images


def test_cli_adversarial_dry_run_to_manifest(tmp_path: Path) -> None:
    runner = CliRunner()
    run, models = tmp_path / "run", tmp_path / "models"
    argv = ["train", "--dry-run", "--arch", "mlp", "--out", str(run), "--threads", "1",
            "--adversarial", "fgsm-rs", "--adv-eps", "0.1"]  # fmt: skip
    r = runner.invoke(app, argv)
    assert r.exit_code == 0, r.output
    result = json.loads((run / "result.json").read_text())
    assert result["config"]["adversarial"]["kind"] == "fgsm-rs"
    assert len(result["guard_checks"]) == 2  # every 10 of the 20 dry-run steps
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["adversary"]["step_size"] == pytest.approx(0.125)
    assert runner.invoke(app, ["export", str(run), "--name", "dry-at", "--models-dir",
                               str(models)]).exit_code == 0  # fmt: skip
    r = runner.invoke(app, ["calibrate", str(models / "dry-at" / "1")])
    assert r.exit_code == 0, r.output
    m = Manifest.load(models / "dry-at" / "1" / MANIFEST_FILE)
    assert m.training is not None
    assert m.training.adversarial.startswith("fgsm-rs eps 0.1 step 0.125")


def test_cli_rejects_an_unknown_training_attack(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["train", "--dry-run", "--adversarial", "cw", "--out",
                                 str(tmp_path)])  # fmt: skip
    assert r.exit_code != 0
    assert "none, pgd, trades, fgsm-rs" in r.output


@pytest.mark.parametrize("objective", ["ce", "rce"])
def test_trades_attack_stays_in_the_ball_and_raises_the_kl_term(
    trained: tuple[nn.Module, torch.Tensor, torch.Tensor], objective: str
) -> None:
    net, x, _ = trained
    eps = 0.1
    gen = torch.Generator().manual_seed(0)
    adv = trades_attack(net, x, objective, eps, steps=10, step_size=0.025, generator=gen)  # type: ignore[arg-type]
    assert float((adv - x).abs().max()) <= eps + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    with torch.no_grad():
        served = net(x) if objective == "ce" else -net(x)
        served_adv = net(adv) if objective == "ce" else -net(adv)
        noise = (x + eps * (2 * torch.rand(x.shape, generator=gen) - 1)).clamp(0, 1)
        served_noise = net(noise) if objective == "ce" else -net(noise)
    # The attack's KL divergence from the clean prediction beats random points of the same ball
    # by a wide margin (it starts next to x, where the KL term is ~0).
    assert float(trades_kl(served_adv, served)) > 5 * float(trades_kl(served_noise, served))


def test_trades_kl_matches_the_definition() -> None:
    a, b = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[2.0, 1.0, 0.0]])
    p, q = torch.softmax(b, 1), torch.softmax(a, 1)  # KL(p_clean || p_adv), clean = b
    expected = float((p * (p / q).log()).sum())
    assert float(trades_kl(a, b)) == pytest.approx(expected, rel=1e-6)


def test_trades_loss_is_natural_loss_plus_beta_kl(
    trained: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    net, x, y = trained
    adversary = Adversary(AdversarialConfig(kind="trades", eps=0.0, beta=6.0), "ce", seed=0)
    # eps 0: the adversarial images are the clean ones, the KL term is 0, the loss is plain CE.
    loss, logits = adversary.loss(net, x, y, step=0)
    with torch.no_grad():
        plain = float(nn.functional.cross_entropy(net(x), y))
    assert float(loss.detach()) == pytest.approx(plain, rel=1e-5)
    assert logits.shape == (len(x), 10)


def test_learning_rate_schedules() -> None:
    cyc = TrainConfig(lr=0.01, steps=100, lr_schedule="cyclic", lr_peak=0.4)
    assert lr_at(cyc, 0) == pytest.approx(0.01 / 40)
    assert lr_at(cyc, 39) == pytest.approx(0.01)  # the peak at 40% of the steps
    assert lr_at(cyc, 70) == pytest.approx(0.01 * 30 / 60)
    assert lr_at(cyc, 100) == 0.0
    cos = TrainConfig(lr=0.1, steps=100, lr_schedule="cosine")
    assert lr_at(cos, 0) == pytest.approx(0.1)
    assert lr_at(cos, 50) == pytest.approx(0.05)
    step = TrainConfig(lr=0.1, steps=100)
    assert [lr_at(step, s) for s in (49, 50, 75)] == pytest.approx([0.1, 0.01, 0.001])


def test_keep_best_writes_the_weights_of_the_best_check(tmp_path: Path) -> None:
    """The in-training check flags its best epoch and saves its weights; the run keeps those or
    the last ones, whichever the final check on the whole held-out split prefers."""
    from safetensors.torch import load_file

    adv = AdversarialConfig(kind="pgd", eps=0.2, steps=3, guard="off", guard_every=10,
                            guard_images=64)  # fmt: skip
    cfg = replace(BASE, steps=40, lr_drops=(), eval_every=40, adversarial=adv, keep="best")
    result = train(replace(cfg, out_dir=tmp_path / "run"))
    checks = [c["guard_pgd_accuracy"] for c in result.guard_checks]
    assert len(checks) == 4
    log = [
        json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    ]
    flagged = [r for r in log if r.get("best")]
    assert flagged and flagged[-1]["guard_pgd_accuracy"] == max(checks)
    assert all(
        "guard_clean_accuracy" in r and "epoch" in r for r in log if "guard_pgd_accuracy" in r
    )
    kept = load_file(str(tmp_path / "run" / "weights.safetensors"))
    summary = json.loads((tmp_path / "run" / "result.json").read_text())["kept"]
    want = (
        load_file(str(tmp_path / "run" / "best.safetensors"))
        if summary["choice"] == "best"
        else torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    )
    assert all(torch.equal(kept[k], want[k]) for k in kept)


def test_cli_trades_dry_run_records_the_recipe(tmp_path: Path) -> None:
    run = tmp_path / "run"
    argv = ["train", "--dry-run", "--arch", "mlp", "--out", str(run), "--threads", "1",
            "--adversarial", "trades", "--adv-eps", "0.1", "--adv-beta", "3", "--keep", "best",
            "--lr-schedule", "cyclic", "--lr", "0.01", "--optimizer", "adam",
            "--lr-drops", "0.6,0.85"]  # fmt: skip
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 0, r.output
    cfg = json.loads((run / "result.json").read_text())["config"]
    assert cfg["adversarial"]["kind"] == "trades" and cfg["adversarial"]["beta"] == 3.0
    assert cfg["keep"] == "best" and cfg["lr_schedule"] == "cyclic" and cfg["steps"] == 20
    assert cfg["lr_drops"] == [0.6, 0.85]
    assert (
        AdversarialConfig(**cfg["adversarial"])
        .describe()
        .startswith("trades eps 0.1 steps 10 step 0.025 beta 3")
    )


def test_manifest_records_epochs_hardware_and_the_kept_check(tmp_path: Path) -> None:
    """A run kept at its best held-out check: the manifest says which step that was, why, how
    many passes over the data the run made and where it trained."""
    runner = CliRunner()
    run, models = tmp_path / "run", tmp_path / "models"
    argv = ["train", "--dry-run", "--arch", "mlp", "--out", str(run), "--threads", "1",
            "--adversarial", "pgd", "--adv-eps", "0.1", "--adv-steps", "2", "--adv-guard", "off",
            "--keep", "best"]  # fmt: skip
    assert runner.invoke(app, argv).exit_code == 0
    result = json.loads((run / "result.json").read_text())
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    flagged = [r for r in log if r.get("best")][-1]
    kept, figures = result["kept"], result["kept"]["candidates"]
    assert figures["best"]["step"] == flagged["step"] and figures["last"]["step"] == 20
    # The larger final check decides, the last weights on a tie.
    pgd = {k: v["held_out_pgd"] for k, v in figures.items()}
    assert kept["choice"] == ("best" if pgd["best"] > pgd["last"] else "last")
    assert kept["step"] == figures[kept["choice"]]["step"]
    assert runner.invoke(app, ["export", str(run), "--name", "dry-kept", "--models-dir",
                               str(models)]).exit_code == 0  # fmt: skip
    assert runner.invoke(app, ["calibrate", str(models / "dry-kept" / "1")]).exit_code == 0
    info = Manifest.load(models / "dry-kept" / "1" / MANIFEST_FILE).training
    assert info is not None
    passes = result["steps"] * result["config"]["batch_size"] / result["train_samples"]
    assert info.epochs == pytest.approx(passes, abs=0.01)
    assert "CPU cores" in info.hardware and info.hardware.endswith("torch on cpu")
    assert info.kept.startswith(f"step {kept['step']} (epoch {kept['epoch']:.1f}): ")
    assert f"held-out PGD-20 accuracy {pgd[kept['choice']]:.2%} at eps 0.1" in info.kept


def test_the_final_check_keeps_the_weights_that_hold_better(tmp_path: Path) -> None:
    """Between the in-training check's best epoch and the last weights, the one with the
    higher robust accuracy on the whole held-out split is loaded, whichever it is."""
    from training.export import load_run
    from training.keep import keep_best_or_last

    adv = AdversarialConfig(kind="pgd", eps=0.2, steps=5, guard_steps=2, guard_every=50,
                            guard_images=128)  # fmt: skip
    cfg = replace(BASE, steps=100, lr_drops=(), eval_every=100)
    held = synthetic(256, seed=1)
    nets = {
        "plain": load_run(train(replace(cfg, out_dir=tmp_path / "plain")).out_dir)[0],
        "robust": load_run(
            train(replace(cfg, out_dir=tmp_path / "robust", adversarial=adv)).out_dir
        )[0],
    }
    acc = {k: robust_accuracy(n, held.x, held.y, "rce", 0.2, 4) for k, n in nets.items()}
    assert acc["robust"] > acc["plain"]
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"step": 7, "epoch": 1.5, "best": 1.0}) + "\n")
    for best, last, want in (("robust", "plain", "best"), ("plain", "robust", "last")):
        net = build_net("mlp", (1, 28, 28), 10)
        net.load_state_dict(nets[last].state_dict())
        kept = keep_best_or_last(net, nets[best].state_dict(), 60, 30.0, log, held, "rce", adv,
                                 torch.device("cpu"))  # fmt: skip
        assert kept["choice"] == want, kept
        assert kept["step"] == (7 if want == "best" else 60)
        chosen = nets[best] if want == "best" else nets[last]
        want_state = chosen.state_dict()
        assert all(torch.equal(v, want_state[k]) for k, v in net.state_dict().items())
        assert kept["candidates"]["best"]["held_out_pgd"] == pytest.approx(
            robust_accuracy(nets[best], held.x, held.y, "rce", 0.2, 4)
        )
        assert kept["candidates"]["last"]["held_out_clean"] == pytest.approx(
            evaluate(nets[last], held, "rce", torch.device("cpu"))
        )
