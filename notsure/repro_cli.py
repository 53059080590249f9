"""`notsure repro <experiment>`: reproduce one of the paper's experiments at CPU scale.

Each command writes `<experiment>.json` and `.png` into docs/reproduction/ and rewrites its
section of docs/reproduction.md. `--dry-run` runs the same code on the tiny synthetic set in
seconds and writes into runs/repro-dry-run/ instead, leaving the committed report alone.
Options default to None: each config is `replace(Cfg(), **given)`, or `Cfg.tiny()` for a dry run,
so an option not given takes its config's default (`training/repro/*.py`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from notsure.options import given

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
Opt = typer.Option

OutDir = Annotated[Path | None, Opt(help="JSON + PNG folder")]
Report = Annotated[Path | None, Opt(help="markdown report")]
DataDir = Annotated[Path | None, Opt(help="folder holding MNIST/raw (torchvision layout)")]
RunsDir = Annotated[Path | None, Opt(help="training run folders (resumable)")]
Seed = Annotated[int | None, Opt(help="seed of the data order, the weights and the attack")]
Threads = Annotated[int | None, Opt(help="torch CPU threads (0: torch's default)")]
DryRun = Annotated[bool, Opt(help="tiny synthetic data, seconds; writes to runs/")]
Steps = Annotated[int | None, Opt(help="Adam steps of batch 100")]
Eps = Annotated[list[float] | None, Opt(help="FGSM eps, pixel units")]


def _cnn_pair(
    name: str, out_dir: Path | None, report: Path | None, dry_run: bool, **options: object
) -> None:
    from training.repro.cnn_pair import CnnPairConfig, run
    from training.repro.common import resolve_output

    base = CnnPairConfig.tiny() if dry_run else CnnPairConfig()
    cfg = replace(base, **given(**options))
    summary = run(cfg, resolve_output(out_dir, report, dry_run), name)
    for obj, m in summary["models"].items():
        typer.echo(
            f"{name} {obj}: test accuracy {m['test_accuracy']:.4f} ({m['steps']} steps, "
            f"{m['wall_time_s']:.0f} s)"
        )


@app.command()
def table4(
    out_dir: OutDir = None,
    report: Report = None,
    data_dir: DataDir = None,
    runs_dir: RunsDir = None,
    steps: Steps = None,
    eps: Eps = None,
    dataset: Annotated[
        str | None,
        Opt(help="mnist (the paper's Table 4) or cifar10 (Table 2's CIFAR CNN)"),
    ] = None,
    seed: Seed = None,
    threads: Threads = None,
    dry_run: DryRun = False,
) -> None:
    """Table 4: a small CNN (the TRADES SmallCNN shape) on MNIST, CE vs RCE (+ FGSM filtering)."""
    name = "table4" if dataset in (None, "mnist") else f"table4-{dataset}"
    _cnn_pair(name, out_dir, report, dry_run, dataset=dataset, data_dir=data_dir,
              runs_dir=runs_dir, steps=steps, eps=tuple(eps) if eps else None, seed=seed,
              threads=threads)  # fmt: skip


@app.command()
def fashion(
    out_dir: OutDir = None,
    report: Report = None,
    data_dir: DataDir = None,
    runs_dir: RunsDir = None,
    steps: Steps = None,
    eps: Eps = None,
    seed: Seed = None,
    threads: Threads = None,
    dry_run: DryRun = False,
) -> None:
    """Extension (not in the paper): the Table 4 experiment on Fashion-MNIST."""
    _cnn_pair("fashion", out_dir, report, dry_run, dataset="fashion-mnist", data_dir=data_dir,
              runs_dir=runs_dir, steps=steps, eps=tuple(eps) if eps else None, seed=seed,
              threads=threads)  # fmt: skip


@app.command()
def tsne(
    model: Annotated[
        list[Path] | None,
        Opt(help="CE then RCE model folder (models/<name>/<version>) or training run folder"),
    ] = None,
    out_dir: OutDir = None,
    report: Report = None,
    data_dir: DataDir = None,
    samples: Annotated[int | None, Opt(help="MNIST training images embedded")] = None,
    perplexity: Annotated[float | None, Opt(help="t-SNE perplexity")] = None,
    seed: Seed = None,
    threads: Threads = None,
    dry_run: DryRun = False,
) -> None:
    """Fig. 2: t-SNE of the final hidden vectors of MNIST training images, CE vs RCE."""
    from training.repro.common import DRY_RUN_RUNS, resolve_output
    from training.repro.tsne import TsneConfig, run, tiny_models

    if model is not None and len(model) != 2:
        raise typer.BadParameter("give exactly two --model folders: the CE one, then the RCE one")
    models = (model[0], model[1]) if model else None
    if dry_run:
        base = TsneConfig.tiny(models or tiny_models(DRY_RUN_RUNS))
    else:
        base = replace(TsneConfig(), **given(models=models))
    cfg = replace(base, **given(data_dir=data_dir, samples=samples, perplexity=perplexity,
                                seed=seed, threads=threads))  # fmt: skip
    summary = run(cfg, resolve_output(out_dir, report, dry_run))
    for obj, r in summary["models"].items():
        typer.echo(
            f"tsne {obj}: silhouette {r['silhouette_embedding']:.3f} (t-SNE), "
            f"{r['silhouette_features']:.3f} (features), 5-NN "
            f"{r['knn5_accuracy_features']:.4f}"
        )


@app.command()
def bnn(
    out_dir: OutDir = None,
    report: Report = None,
    data_dir: DataDir = None,
    runs_dir: RunsDir = None,
    eps: Annotated[float | None, Opt(help="FGSM eps, pixel units")] = None,
    sgnht_lr: Annotated[float | None, Opt(help="SGNHT step size h")] = None,
    diffusion: Annotated[float | None, Opt(help="SGNHT diffusion A (= friction)")] = None,
    burn_in: Annotated[int | None, Opt(help="SGNHT steps before the first sample")] = None,
    num_samples: Annotated[int | None, Opt(help="posterior samples averaged")] = None,
    sample_every: Annotated[int | None, Opt(help="SGNHT steps between samples")] = None,
    prior_precision: Annotated[
        float | None, Opt(help="precision of the Gaussian prior on every weight")
    ] = None,
    seed: Seed = None,
    threads: Threads = None,
    dry_run: DryRun = False,
) -> None:
    """Fig. 7: CE, RCE and an SGNHT Bayesian 2x100 MLP under FGSM, accuracy/refusal vs T."""
    from training.repro.bnn import BnnConfig, run
    from training.repro.common import resolve_output

    base = BnnConfig.tiny() if dry_run else BnnConfig()
    sampler = replace(base.sampler, **given(
        lr=sgnht_lr, diffusion=diffusion, burn_in=burn_in, num_samples=num_samples,
        sample_every=sample_every, prior_precision=prior_precision, seed=seed,
    ))  # fmt: skip
    cfg = replace(base, sampler=sampler, **given(data_dir=data_dir, runs_dir=runs_dir, eps=eps,
                                                 seed=seed, threads=threads))  # fmt: skip
    summary = run(cfg, resolve_output(out_dir, report, dry_run))
    for name, r in summary["models"].items():
        typer.echo(
            f"bnn {name}: clean {r['clean_accuracy']:.4f} adversarial "
            f"{r['adversarial_accuracy']:.4f} AUC conf {r['auc_confidence']:.3f} "
            f"J {r['auc_j_score']:.3f}"
        )


@app.command()
def table1(
    models_dir: Annotated[Path | None, Opt(help="model repository")] = None,
    attack_dir: Annotated[Path | None, Opt(help="the validator's report folder")] = None,
    out_dir: OutDir = None,
    report: Report = None,
    dry_run: DryRun = False,
) -> None:
    """Table 1 / Figs. 3-6: collect the bundled models' manifests and the attack report."""
    from training.repro.common import resolve_output
    from training.repro.table1 import Table1Config, run

    cfg = replace(Table1Config(), **given(models_dir=models_dir, attack_dir=attack_dir))
    summary = run(cfg, resolve_output(out_dir, report, dry_run))
    for r in summary["models"]:
        typer.echo(f"table1 {r['model']}: clean test accuracy {r['clean_test_accuracy']}")
