"""`notsure repro <experiment>`: reproduce one of the paper's experiments at CPU scale.

Each command writes `<experiment>.json` and `.png` into docs/reproduction/ and rewrites its
section of docs/reproduction.md. `--dry-run` runs the same code on the tiny synthetic set in
seconds and writes into runs/repro-dry-run/ instead, leaving the committed report alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

OutDir = Annotated[Path | None, typer.Option(help="JSON + PNG folder (default docs/reproduction)")]
Report = Annotated[Path | None, typer.Option(help="markdown report (default docs/reproduction.md)")]
DataDir = Annotated[Path, typer.Option(help="folder holding MNIST/raw (torchvision layout)")]
RunsDir = Annotated[Path | None, typer.Option(help="training run folders (resumable)")]
Threads = Annotated[int, typer.Option(help="torch CPU threads (0: torch's default)")]
DryRun = Annotated[bool, typer.Option(help="tiny synthetic data, seconds; writes to runs/")]
DEFAULT_DATA = Path("../shared/data")


def _runs(runs_dir: Path | None, dry_run: bool) -> Path:
    if runs_dir is not None:
        return runs_dir
    return Path("runs/repro-dry-run/runs") if dry_run else Path("runs/repro")


def _cnn_pair(
    dataset: str,
    name: str,
    out_dir: Path | None,
    report: Path | None,
    data_dir: Path,
    runs_dir: Path | None,
    steps: int,
    eps: list[float] | None,
    seed: int,
    threads: int,
    dry_run: bool,
) -> None:
    from training.repro.cnn_pair import CnnPairConfig, run
    from training.repro.common import resolve_output

    base = CnnPairConfig.tiny() if dry_run else CnnPairConfig()
    cfg = CnnPairConfig(
        dataset=dataset,
        data_dir=data_dir,
        steps=base.steps if dry_run else steps,
        batch_size=base.batch_size,
        eps=tuple(eps) if eps else base.eps,
        attack_samples=base.attack_samples,
        sigma_samples=base.sigma_samples,
        runs_dir=_runs(runs_dir, dry_run),
        seed=seed,
        threads=threads,
        dry_run=dry_run,
    )
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
    data_dir: DataDir = DEFAULT_DATA,
    runs_dir: RunsDir = None,
    steps: Annotated[int, typer.Option(help="Adam steps of batch 100 (3000 = 5 epochs)")] = 3000,
    eps: Annotated[list[float] | None, typer.Option(help="FGSM eps, pixel units")] = None,
    dataset: Annotated[
        str, typer.Option(help="mnist (the paper's Table 4) or cifar10 (Table 2's CIFAR CNN)")
    ] = "mnist",
    seed: int = 0,
    threads: Threads = 1,
    dry_run: DryRun = False,
) -> None:
    """Table 4: the appendix simple CNN on MNIST, CE vs RCE (+ FGSM filtering)."""
    name = "table4" if dataset == "mnist" else f"table4-{dataset}"
    _cnn_pair(
        dataset, name, out_dir, report, data_dir, runs_dir, steps, eps, seed, threads, dry_run
    )


@app.command()
def fashion(
    out_dir: OutDir = None,
    report: Report = None,
    data_dir: DataDir = DEFAULT_DATA,
    runs_dir: RunsDir = None,
    steps: Annotated[int, typer.Option(help="Adam steps of batch 100 (3000 = 5 epochs)")] = 3000,
    eps: Annotated[list[float] | None, typer.Option(help="FGSM eps, pixel units")] = None,
    seed: int = 0,
    threads: Threads = 1,
    dry_run: DryRun = False,
) -> None:
    """Extension (not in the paper): the Table 4 experiment on Fashion-MNIST."""
    _cnn_pair(
        "fashion-mnist",
        "fashion",
        out_dir,
        report,
        data_dir,
        runs_dir,
        steps,
        eps,
        seed,
        threads,
        dry_run,
    )


@app.command()
def tsne(
    model: Annotated[
        list[Path] | None,
        typer.Option(
            help="CE then RCE model folder (models/<name>/<version>) or training run folder"
        ),
    ] = None,
    out_dir: OutDir = None,
    report: Report = None,
    data_dir: DataDir = DEFAULT_DATA,
    samples: int = 1000,
    perplexity: float = 30.0,
    seed: int = 0,
    threads: Threads = 1,
    dry_run: DryRun = False,
) -> None:
    """Fig. 2: t-SNE of the final hidden vectors of MNIST training images, CE vs RCE."""
    from training.repro.common import resolve_output
    from training.repro.tsne import TsneConfig, run, tiny_models

    if model is not None and len(model) != 2:
        raise typer.BadParameter("give exactly two --model folders: the CE one, then the RCE one")
    if dry_run:
        models = tuple(model) if model else tiny_models(_runs(None, True))
        cfg = TsneConfig.tiny(models, seed=seed, threads=threads)
    else:
        cfg = TsneConfig(
            data_dir=data_dir,
            samples=samples,
            perplexity=perplexity,
            seed=seed,
            threads=threads,
            **({"models": tuple(model)} if model else {}),
        )
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
    data_dir: DataDir = DEFAULT_DATA,
    runs_dir: RunsDir = None,
    eps: Annotated[float, typer.Option(help="FGSM eps, pixel units")] = 0.1,
    sgnht_lr: Annotated[float, typer.Option(help="SGNHT step size h")] = 3e-4,
    diffusion: Annotated[float, typer.Option(help="SGNHT diffusion A (= friction)")] = 100.0,
    burn_in: int = 6000,
    num_samples: int = 40,
    sample_every: int = 150,
    prior_precision: float = 1.0,
    seed: int = 0,
    threads: Threads = 1,
    dry_run: DryRun = False,
) -> None:
    """Fig. 7: CE, RCE and an SGNHT Bayesian 2x100 MLP under FGSM, accuracy/refusal vs T."""
    from training.repro.bnn import BnnConfig, run
    from training.repro.common import resolve_output
    from training.repro.posterior import SamplerConfig

    runs = _runs(runs_dir, dry_run)
    if dry_run:
        cfg = BnnConfig.tiny(eps=eps, runs_dir=runs, seed=seed, threads=threads)
    else:
        sampler = SamplerConfig(
            lr=sgnht_lr,
            burn_in=burn_in,
            num_samples=num_samples,
            sample_every=sample_every,
            prior_precision=prior_precision,
            diffusion=diffusion,
            seed=seed,
        )
        cfg = BnnConfig(
            data_dir=data_dir,
            eps=eps,
            sampler=sampler,
            runs_dir=runs,
            seed=seed,
            threads=threads,
        )
    summary = run(cfg, resolve_output(out_dir, report, dry_run))
    for name, r in summary["models"].items():
        typer.echo(
            f"bnn {name}: clean {r['clean_accuracy']:.4f} adversarial "
            f"{r['adversarial_accuracy']:.4f} AUC conf {r['auc_confidence']:.3f} "
            f"J {r['auc_j_score']:.3f}"
        )


@app.command()
def table1(
    models_dir: Annotated[Path, typer.Option(help="model repository")] = Path("models"),
    attack_dir: Annotated[Path, typer.Option(help="the validation tool's report folder")] = Path(
        "docs/attack"
    ),
    out_dir: OutDir = None,
    report: Report = None,
    dry_run: DryRun = False,
) -> None:
    """Table 1 / Figs. 3-6: collect the bundled models' manifests and the attack report."""
    from training.repro.common import resolve_output
    from training.repro.table1 import Table1Config, run

    summary = run(Table1Config(models_dir, attack_dir), resolve_output(out_dir, report, dry_run))
    for r in summary["models"]:
        typer.echo(f"table1 {r['model']}: clean test accuracy {r['clean_test_accuracy']}")
