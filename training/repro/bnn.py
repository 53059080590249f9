"""Fig. 7: RCE + thresholding versus a Bayesian neural network, on a 2x100 MLP.

Three versions of the same fully connected 784-100-100-10 network (`training.nets.MLP`):
- CE and RCE, trained with Adam like the simple CNN (training.train);
- a BNN: SGNHT (training.sgnht, Ding et al. 2014) samples the posterior under a Gaussian prior;
  its prediction is the posterior predictive p(y|x) = mean over S posterior samples of
  softmax(f_s(x)).
Each is attacked white-box with FGSM (CE cost on the classifier it serves; for the BNN, on the
predictive distribution, i.e. -log p(y|x)) and scored on the mixed set of the N clean test
images and their N adversarial versions: accuracy of the returned outputs and refuse rates
versus the threshold T, for the confidence and the J-score of each (service.scoring).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.attacks.classic import AttackConfig, attack
from training.evaluation import fit_kernel, num, pct, roc_auc, table
from training.export import load_run
from training.losses import Objective
from training.repro.common import (
    DRY_RUN_RUNS,
    Output,
    adam_run,
    load_splits,
    served_logits_np,
    update_section,
    write_json,
)
from training.repro.detection import METRICS, score, sweep
from training.repro.posterior import SamplerConfig, sample_posterior
from training.train import train

log = logging.getLogger(__name__)

NAME = "bnn"
MODELS = ("ce", "rce", "bnn")
OPERATING_POINTS = (0.01, 0.05, 0.10)  # clean refuse rates at which T is read off


@dataclass(frozen=True)
class BnnConfig:
    dataset: str = "mnist"
    data_dir: Path = Path("data")
    val_size: int = 0
    batch_size: int = 100
    steps: int = 3000  # CE/RCE with Adam lr 1e-3: 5 epochs of 60,000
    lr: float = 1e-3
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # the BNN's SGNHT chain
    eps: float = 0.1  # FGSM, pixel units
    attack_samples: int = 10_000  # clean test images; the mixed set has twice as many
    sigma_samples: int = 10_000
    runs_dir: Path = Path("runs/repro")
    seed: int = 0
    threads: int = 1
    dry_run: bool = False

    @classmethod
    def tiny(cls, **overrides: object) -> BnnConfig:
        sampler = SamplerConfig(lr=3e-3, batch_size=32, burn_in=60, num_samples=4, sample_every=10)
        base = cls(
            steps=40,
            batch_size=32,
            sampler=sampler,
            attack_samples=128,
            sigma_samples=256,
            runs_dir=DRY_RUN_RUNS,
            dry_run=True,
        )
        return replace(base, **overrides)


def _models(cfg: BnnConfig) -> dict[str, tuple[nn.Module, Objective, dict[str, object]]]:
    """CE and RCE MLPs (training.train, resumable) and the SGNHT posterior predictive."""
    out: dict[str, tuple[nn.Module, Objective, dict[str, object]]] = {}
    for objective in ("ce", "rce"):
        tcfg = adam_run(cfg, "mlp", objective, evals=5, checkpoint_every=1000)
        result = train(tcfg)
        net, _, _ = load_run(tcfg.out_dir)
        info = {
            "wall_time_s": result.wall_time_s,
            "steps": result.steps,
            "optimizer": f"adam lr {cfg.lr}",
        }
        out[objective] = (net, objective, info)
    splits = load_splits(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.seed, cfg.dry_run)
    bnn, info = sample_posterior(cfg.sampler, splits.train)
    sc = cfg.sampler
    info["optimizer"] = f"SGNHT h {sc.lr} A {sc.diffusion} prior N(0, {1 / sc.prior_precision:g})"
    out["bnn"] = (bnn, "ce", info)
    return out


def run(cfg: BnnConfig, out: Output) -> dict[str, object]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    splits = load_splits(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.seed, cfg.dry_run)
    x, y = splits.test.x[: cfg.attack_samples], splits.test.y[: cfg.attack_samples]
    y_np = y.numpy()
    thresholds = np.unique(np.concatenate([np.linspace(0, 1, 101), np.logspace(-6, 0, 61)]))
    results: dict[str, dict[str, object]] = {}
    for name, (net, objective, info) in _models(cfg).items():
        kernel = fit_kernel(served_logits_np(net, objective, splits.train.x[: cfg.sigma_samples]))
        adv_x = attack(
            net,
            objective,
            x,
            y,
            AttackConfig(method="fgsm", eps=cfg.eps, cost="ce", batch_size=500),
        )
        clean, adv = (
            score(served_logits_np(net, objective, x), kernel),
            score(served_logits_np(net, objective, adv_x), kernel),
        )
        correct = np.concatenate([clean.label == y_np, adv.label == y_np])  # (2N,)
        is_adv = np.concatenate([np.zeros(len(y_np), bool), np.ones(len(y_np), bool)])
        r: dict[str, object] = {
            **info,
            "sigma": kernel.sigma,
            "clean_accuracy": float((clean.label == y_np).mean()),
            "adversarial_accuracy": float((adv.label == y_np).mean()),
        }
        for m in METRICS:
            mixed = np.concatenate([clean.metric(m), adv.metric(m)])
            r[f"auc_{m}"] = roc_auc(clean.metric(m), adv.metric(m))
            r[f"sweep_{m}"] = sweep(mixed, correct, is_adv, thresholds)
            r[f"operating_points_{m}"] = [
                _operating_point(clean.metric(m), mixed, correct, is_adv, rate)
                for rate in OPERATING_POINTS
            ]
        results[name] = r
        log.info(
            "%s: clean %.4f adversarial %.4f", name, r["clean_accuracy"], r["adversarial_accuracy"]
        )
    summary: dict[str, object] = {
        "experiment": NAME,
        "dataset": "synthetic" if cfg.dry_run else cfg.dataset,
        "settings": {**asdict(cfg), "sgnht_steps": cfg.sampler.steps},
        "models": results,
    }
    write_json(out.json_path(NAME), summary)
    _plot(results, cfg, out.png_path(NAME))
    update_section(
        out.report,
        NAME,
        "Fig. 7: RCE versus a Bayesian neural network (2x100 MLP)",
        _markdown(summary, out),
    )
    return summary


def _operating_point(
    clean_scores: np.ndarray,
    mixed: np.ndarray,
    correct: np.ndarray,
    is_adv: np.ndarray,
    clean_refuse: float,
) -> dict[str, float]:
    """Accuracy of output and refuse rates on the mixed set at the T refusing this much clean."""
    from service.scoring import threshold_for_refuse_rate

    t = threshold_for_refuse_rate(clean_scores, clean_refuse)
    point = sweep(mixed, correct, is_adv, np.array([t]))
    return {"clean_refuse_target": clean_refuse, **{k: v[0] for k, v in point.items()}}


def _plot(results: dict[str, dict[str, object]], cfg: BnnConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ce": "tab:blue", "rce": "tab:red", "bnn": "tab:green"}
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for name, r in results.items():
        for m, style in (("confidence", "--"), ("j_score", "-")):
            s: dict[str, list[float]] = r[f"sweep_{m}"]
            t = np.asarray(s["threshold"])
            label = f"{name.upper()} {'J-score' if m == 'j_score' else 'confidence'}"
            kw = {"color": colors[name], "linestyle": style, "label": label}
            acc = np.asarray(s["accuracy_of_output"], dtype=float)
            refuse = np.asarray(s["refuse_rate"])
            axes[0].plot(t, acc, **kw)
            axes[1].plot(t, refuse, **kw)
            axes[2].plot(refuse, acc, **kw)
    axes[0].set(
        xlabel="threshold T",
        ylabel="accuracy of output",
        title="accuracy of returned predictions",
    )
    axes[1].set(
        xlabel="threshold T",
        ylabel="refuse rate",
        title="share of the mixed set refused",
    )
    axes[2].set(xlabel="refuse rate", ylabel="accuracy of output", title="trade-off")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    fig.suptitle(
        f"2x100 MLP, FGSM eps {cfg.eps:g} (pixels), {2 * cfg.attack_samples} "
        "mixed clean + adversarial test samples"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=85)
    plt.close(fig)


def _markdown(summary: dict[str, object], out: Output) -> str:
    results: dict[str, dict[str, object]] = summary["models"]
    st: dict[str, object] = summary["settings"]
    rows, op_rows = [], []
    for name, r in results.items():
        rows.append(
            [
                name.upper(),
                str(r["optimizer"]),
                f"{r['steps']}",
                f"{float(r['wall_time_s']):.0f} s",
                pct(r["clean_accuracy"]),
                pct(r["adversarial_accuracy"]),
                num(r["auc_confidence"]),
                num(r["auc_j_score"]),
            ]
        )
        for m in METRICS:
            for p in r[f"operating_points_{m}"]:
                op_rows.append(
                    [
                        name.upper(),
                        "J-score" if m == "j_score" else "confidence",
                        pct(p["clean_refuse_target"], 0),
                        f"{p['threshold']:.3g}",
                        pct(p["refuse_rate_clean"], 1),
                        pct(p["refuse_rate_adversarial"], 1),
                        pct(p["refuse_rate"], 1),
                        pct(p["accuracy_of_output"], 1),
                    ]
                )
    sp: dict[str, object] = st["sampler"]
    intro = (
        f"Data set **{summary['dataset']}**; all three nets are the same 784-100-100-10 ReLU "
        f"MLP. CE/RCE: Adam lr {st['lr']}, batch {st['batch_size']}, {st['steps']} steps. "
        f"BNN: SGNHT step size h {sp['lr']}, diffusion A {sp['diffusion']}, Gaussian "
        f"prior precision {sp['prior_precision']}, batch {sp['batch_size']}, {sp['burn_in']} "
        f"burn-in steps, then {sp['num_samples']} samples {sp['sample_every']} steps apart "
        f"({st['sgnht_steps']} steps); the prediction is the mean of their softmax outputs. "
        f"FGSM eps {st['eps']} (pixels in [0, 1]), CE cost on each model's own served "
        f"classifier, true labels; mixed set = {st['attack_samples']} clean test images + "
        f"their adversarial versions. Kernel sigma from {st['sigma_samples']} training "
        "images, eta 1. AUC: clean vs adversarial over all pairs."
    )
    return "\n".join(
        [
            intro,
            "",
            table(
                [
                    "model",
                    "trained with",
                    "steps",
                    "wall time",
                    "clean acc.",
                    "adv. acc.",
                    "AUC conf.",
                    "AUC J",
                ],
                rows,
            ),
            "",
            "At the T that refuses a given share of the clean test images (read off the curves):",
            "",
            table(
                [
                    "model",
                    "metric",
                    "target clean refuse",
                    "T",
                    "refused clean",
                    "refused adversarial",
                    "refused (mixed)",
                    "accuracy of output",
                ],
                op_rows,
            ),
            "",
            f"![Fig. 7]({out.link(out.png_path(NAME))})",
            "",
            f"Data (full sweeps over T): [{NAME}.json]({out.link(out.json_path(NAME))}).",
        ]
    )
