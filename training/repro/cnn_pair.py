"""Table 4 (appendix A.2) and its Fashion-MNIST extension: the simple CNN trained with CE and RCE.

Trains a small CNN of the TRADES SmallCNN shape (two 3x3 convolutions a block, ReLU, dropout
0.5; not the paper's Table 2 network, which has one convolution a block on MNIST and sigmoid
units) with Adam (lr 1e-3, batch 100, no weight decay) as in Table 3, for 5 epochs with each
objective, reports the test accuracy next to the paper's, then asks how well confidence and the
J-score flag FGSM samples crafted against each network (the headline experiment of the paper,
here on the small CNN rather than on ResNet-32).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from training.attacks.classic import AttackConfig, fgsm_direction
from training.data import Splits
from training.evaluation import fit_kernel, num, pct, table
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
from training.repro.detection import filtering_summary, score
from training.train import LOG_FILE, TrainConfig, train

log = logging.getLogger(__name__)

OBJECTIVES: tuple[Objective, ...] = ("ce", "rce")
# Appendix Table 4: MNIST test accuracy of the simple CNN after 5 epochs.
PAPER_TABLE4 = {"ce": 0.9881, "rce": 0.9879}


@dataclass(frozen=True)
class CnnPairConfig:
    dataset: str = "mnist"
    data_dir: Path = Path("data")
    steps: int = 3000  # 5 epochs of the 60,000 training images at batch 100
    batch_size: int = 100
    lr: float = 1e-3
    val_size: int = 0  # all 60,000 training images are trained on, as in the paper
    eps: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)  # FGSM, pixel units (inputs in [0, 1])
    attack_samples: int = 10_000  # clean test images attacked (all of the test set)
    sigma_samples: int = 10_000  # training images that fix sigma of Eq. (5)
    clean_refuse: float = 0.05
    runs_dir: Path = Path("runs/repro")
    seed: int = 0
    threads: int = 1
    dry_run: bool = False

    @classmethod
    def tiny(cls, **overrides: object) -> CnnPairConfig:
        """Seconds on the synthetic set: the code path CI runs."""
        base = cls(
            steps=30,
            batch_size=32,
            eps=(0.1, 0.3),
            attack_samples=128,
            sigma_samples=256,
            runs_dir=DRY_RUN_RUNS,
            dry_run=True,
        )
        return replace(base, **overrides)


def _train_cfg(cfg: CnnPairConfig, objective: Objective) -> TrainConfig:
    return adam_run(cfg, "cnn", objective, evals=6, checkpoint_every=500)


def _curve(run_dir: Path) -> list[dict[str, float]]:
    """Test accuracy against step from the run's log (last record per step wins)."""
    by_step: dict[int, float] = {}
    for line in (run_dir / LOG_FILE).read_text().splitlines():
        rec = json.loads(line)
        if "test_accuracy" in rec:
            by_step[int(rec["step"])] = float(rec["test_accuracy"])
    return [{"step": s, "test_accuracy": a} for s, a in sorted(by_step.items())]


def _filtering(
    net: torch.nn.Module, objective: Objective, cfg: CnnPairConfig, splits: Splits
) -> list[dict[str, float]]:
    """FGSM (CE cost, true labels) at each eps; confidence vs J as detectors, per eps."""
    kernel = fit_kernel(served_logits_np(net, objective, splits.train.x[: cfg.sigma_samples]))
    x, y = splits.test.x[: cfg.attack_samples], splits.test.y[: cfg.attack_samples]
    clean = score(served_logits_np(net, objective, x), kernel)
    # The FGSM direction sign(grad_x CE) does not depend on eps: one gradient per image.
    direction = fgsm_direction(net, objective, x, y, AttackConfig(batch_size=500))
    rows = []
    for eps in cfg.eps:
        adv_x = (x + eps * direction).clamp(0.0, 1.0)
        adv = score(served_logits_np(net, objective, adv_x), kernel)
        row = {"eps": eps, **filtering_summary(clean, adv, y.numpy(), cfg.clean_refuse)}
        row["sigma"] = kernel.sigma
        rows.append(row)
    return rows


def run(cfg: CnnPairConfig, out: Output, name: str) -> dict[str, object]:
    """Train (or resume) both networks, evaluate, attack; write JSON, PNG and the section."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    splits = load_splits(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.seed, cfg.dry_run)
    models: dict[str, object] = {}
    for objective in OBJECTIVES:
        tcfg = _train_cfg(cfg, objective)
        result = train(tcfg)
        net, _, _ = load_run(tcfg.out_dir)
        models[objective] = {
            "test_accuracy": result.test_accuracy,
            "steps": result.steps,
            "wall_time_s": result.wall_time_s,
            "parameters": result.parameters,
            "run_dir": tcfg.out_dir,
            "curve": _curve(tcfg.out_dir),
            "fgsm": _filtering(net, objective, cfg, splits),
        }
        log.info("%s/%s: test accuracy %.4f", cfg.dataset, objective, result.test_accuracy)
    n_train = len(splits.train)
    summary: dict[str, object] = {
        "experiment": name,
        "dataset": "synthetic" if cfg.dry_run else cfg.dataset,
        "paper": PAPER_TABLE4 if cfg.dataset == "mnist" else None,
        "settings": {
            **asdict(cfg),
            "train_samples": n_train,
            "test_samples": len(splits.test),
            "epochs": cfg.steps * cfg.batch_size / n_train,
        },
        "models": models,
    }
    write_json(out.json_path(name), summary)
    _plot(summary, out.png_path(name))
    update_section(out.report, name, _title(cfg), _markdown(summary, out, name))
    return summary


def _title(cfg: CnnPairConfig) -> str:
    if cfg.dataset == "mnist":
        return "Table 4: the simple CNN on MNIST, CE vs RCE"
    return f"Extension (not in the paper): the simple CNN on {cfg.dataset}, CE vs RCE"


def _plot(summary: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models: dict[str, dict[str, object]] = summary["models"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for obj, color in (("ce", "tab:blue"), ("rce", "tab:red")):
        m = models[obj]
        curve: list[dict[str, float]] = m["curve"]
        axes[0].plot(
            [c["step"] for c in curve],
            [c["test_accuracy"] for c in curve],
            "o-",
            color=color,
            label=obj.upper(),
        )
        rows: list[dict[str, float]] = m["fgsm"]
        eps = [r["eps"] for r in rows]
        for metric, style in (("confidence", "--"), ("j_score", "-")):
            label = f"{obj.upper()} {'J-score' if metric == 'j_score' else 'confidence'}"
            axes[1].plot(
                eps,
                [r[f"auc_success_{metric}"] for r in rows],
                style,
                marker="o",
                color=color,
                label=label,
            )
            axes[2].plot(
                eps,
                [r[f"adv_refused_{metric}"] for r in rows],
                style,
                marker="o",
                color=color,
                label=label,
            )
    axes[0].set(xlabel="step", ylabel="test accuracy", title="training (clean test set)")
    axes[1].set(
        xlabel="FGSM eps (pixels in [0, 1])", ylabel="ROC-AUC", title="clean vs successful FGSM"
    )
    axes[2].set(
        xlabel="FGSM eps (pixels in [0, 1])",
        ylabel="share refused",
        title="successful FGSM refused at 5% clean refusals",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{summary['experiment']}: simple CNN on {summary['dataset']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _markdown(summary: dict[str, object], out: Output, name: str) -> str:
    models: dict[str, dict[str, object]] = summary["models"]
    settings: dict[str, object] = summary["settings"]
    paper: dict[str, float] | None = summary["paper"]
    rows = []
    for obj in OBJECTIVES:
        m = models[obj]
        rows.append(
            [
                obj.upper(),
                pct(paper[obj]) if paper else "(not in the paper)",
                pct(m["test_accuracy"]),
                str(m["steps"]),
                f"{float(m['wall_time_s']):.0f} s",
            ]
        )
    diff = float(models["rce"]["test_accuracy"]) - float(models["ce"]["test_accuracy"])
    lines = [
        f"Data set: **{summary['dataset']}**, {settings['train_samples']} training images, "
        f"{settings['steps']} steps of batch {settings['batch_size']} "
        f"({float(settings['epochs']):.2f} epochs), Adam lr {settings['lr']}, no weight decay, "
        f"dropout 0.5, seed {settings['seed']}, {settings['threads']} CPU thread(s). "
        f"Test accuracy on the {int(settings['test_samples']):,}-image test set.",
        "",
        table(["objective", "paper", "measured", "steps", "wall time"], rows),
        "",
        f"Measured RCE - CE: {100 * diff:+.2f} percentage points"
        + (f" (paper: {100 * (paper['rce'] - paper['ce']):+.2f})." if paper else "."),
        "",
        f"FGSM against each network (CE cost, true labels, eps in pixel units) on the first "
        f"{settings['attack_samples']} test images; kernel sigma (Eq. 5) from "
        f"{settings['sigma_samples']} training images, eta 1. AUC over the pairs whose clean "
        f"image is classified correctly and whose attack succeeds; 'refused' is the share of "
        f"those adversarial images refused at the T that refuses "
        f"{pct(float(settings['clean_refuse']), 0)} of the clean images.",
        "",
    ]
    frows = []
    for obj in OBJECTIVES:
        for r in models[obj]["fgsm"]:
            frows.append(
                [
                    obj.upper(),
                    f"{r['eps']:g}",
                    pct(r["adversarial_accuracy"], 1),
                    pct(r["attack_success_rate"], 1),
                    num(r["auc_success_confidence"]),
                    num(r["auc_success_j_score"]),
                    pct(r["adv_refused_confidence"], 1),
                    pct(r["adv_refused_j_score"], 1),
                ]
            )
    lines += [
        table(
            [
                "net",
                "eps",
                "adv. accuracy",
                "attack success",
                "AUC conf.",
                "AUC J",
                "refused (conf.)",
                "refused (J)",
            ],
            frows,
        ),
        "",
        f"![{name}]({out.link(out.png_path(name))})",
        "",
        f"Data: [{name}.json]({out.link(out.json_path(name))}).",
    ]
    return "\n".join(lines)
