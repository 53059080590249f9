"""The `notsure` command line: one subcommand per job, each a thin wrapper over a plain function.

Training subcommands import torch lazily, so `notsure serve` works with only the service's
dependencies installed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.logging import RichHandler

from notsure.attack_cli import register as register_attack
from notsure.audit_cli import register as register_audit
from notsure.certify_cli import app as certify_app
from notsure.import_cli import register as register_import
from notsure.records_cli import app as records_app
from notsure.repro_cli import app as repro_app
from notsure.validate_cli import app as validate_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
app.add_typer(repro_app, name="repro")
app.add_typer(validate_app, name="validate")
app.add_typer(records_app, name="records")
app.add_typer(certify_app, name="certify")
register_attack(app)
register_import(app)
register_audit(app)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=True)],
    )


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    _setup_logging(verbose)


@app.command()
def train(
    dataset: Annotated[
        str | None, typer.Option(help="mnist, fashion-mnist, cifar10 or synthetic [default: mnist]")
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option(
            help="resnet32/56/110; cnn (the TRADES SmallCNN shape: conv 32-32-64-64, dense "
            "200-200); mlp [default: resnet32]"
        ),
    ] = None,
    objective: Annotated[str | None, typer.Option(help="rce or ce [default: rce]")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="folder in torchvision's layout [default: data]")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="run folder (checkpoint, log, weights) [default: runs/train]"),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(help="optimiser steps (paper: 20k MNIST, 80k CIFAR-10) [default: 20000]"),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="[default: 128]")] = None,
    optimizer: Annotated[
        str | None, typer.Option(help="sgd (paper, ResNets) or adam [default: sgd]")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate [default: 0.1]")] = None,
    lr_schedule: Annotated[
        str | None,
        typer.Option(
            help="step (lr/10 at 50% and 75% of the steps, the paper), cyclic (linear up to "
            "lr at 40% of the steps, then down to 0: fast FGSM as published) or cosine "
            "[default: step]"
        ),
    ] = None,
    lr_drops: Annotated[
        str | None,
        typer.Option(
            help="step schedule: comma-separated fractions of the steps where lr /= 10 "
            "[default: 0.5,0.75]"
        ),
    ] = None,
    momentum: Annotated[float | None, typer.Option(help="[default: 0.9]")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="[default: 2e-4]")] = None,
    val_size: Annotated[
        int | None, typer.Option(help="training images held out to choose T [default: 5000]")
    ] = None,
    eval_every: Annotated[
        int | None, typer.Option(help="steps between accuracy checks [default: 1000]")
    ] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="steps between checkpoints [default: 500]")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="[default: 0]")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda [default: auto]")] = None,
    threads: Annotated[
        int | None, typer.Option(help="torch CPU threads (0: torch's default) [default: 0]")
    ] = None,
    resume: Annotated[
        bool | None,
        typer.Option(
            "--resume/--no-resume", help="continue from the run folder's checkpoint [default: on]"
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="tiny synthetic data, a few steps")] = False,
    adversarial: Annotated[
        str | None,
        typer.Option(
            help="none; pgd (PGD-AT, Madry et al.); trades (TRADES, Zhang et al.); fgsm-rs "
            "(fast FGSM with a random start, Wong et al.; about 2x a normal step) [default: none]"
        ),
    ] = None,
    adv_eps: Annotated[
        float | None, typer.Option(help="L-inf radius, pixels in [0, 1] [default: 0.3]")
    ] = None,
    adv_steps: Annotated[
        int | None, typer.Option(help="iterations of the inner attack [default: 10]")
    ] = None,
    adv_step_size: Annotated[
        float | None,
        typer.Option(help="0: 2.5*eps/steps for pgd and trades, 1.25*eps for fgsm-rs [default: 0]"),
    ] = None,
    adv_beta: Annotated[
        float | None, typer.Option(help="trades: weight of the KL term [default: 6]")
    ] = None,
    adv_ramp_steps: Annotated[
        int | None, typer.Option(help="grow eps linearly from 0 over this many steps [default: 0]")
    ] = None,
    adv_guard: Annotated[
        str | None,
        typer.Option(
            help="on a collapse of held-out PGD accuracy (catastrophic overfitting): backoff "
            "(last good weights, half the FGSM step), stop (last good weights, end: early "
            "stopping as published for fast FGSM), or off (only measure) [default: backoff]"
        ),
    ] = None,
    adv_guard_every: Annotated[
        int | None,
        typer.Option(
            help="steps between PGD checks on held-out images (0: each epoch) [default: 0]"
        ),
    ] = None,
    keep: Annotated[
        str | None,
        typer.Option(
            help="adversarial runs: keep the last weights, or (best) those of the best epoch of "
            "the held-out PGD check unless the last ones do better on a final check with the "
            "whole held-out split (robust overfitting) [default: last]"
        ),
    ] = None,
) -> None:
    """Train a network with CE or RCE (Eq. 4) on real data, optionally adversarially."""
    from dataclasses import replace

    from notsure.options import given
    from training.adversarial import ADVERSARIAL_KINDS, AdversarialConfig
    from training.train import TrainConfig
    from training.train import train as run

    choices = {
        "--adversarial": (adversarial, ADVERSARIAL_KINDS),
        "--adv-guard": (adv_guard, ("backoff", "stop", "off")),
        "--lr-schedule": (lr_schedule, ("step", "cyclic", "cosine")),
        "--keep": (keep, ("last", "best")),
        "--objective": (objective, ("rce", "ce")),
        "--optimizer": (optimizer, ("sgd", "adam")),
    }
    for hint, (value, allowed) in choices.items():
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"use {', '.join(allowed)}", param_hint=hint)

    adv = replace(
        AdversarialConfig(),
        **given(
            kind=adversarial,
            eps=adv_eps,
            steps=adv_steps,
            step_size=adv_step_size,
            beta=adv_beta,
            ramp_steps=adv_ramp_steps,
            guard=adv_guard,
            guard_every=adv_guard_every,
        ),
    )
    options = given(dataset=dataset, arch=arch, objective=objective, data_dir=data_dir,
                    out_dir=out, steps=steps, batch_size=batch_size, optimizer=optimizer, lr=lr,
                    lr_schedule=lr_schedule, momentum=momentum, weight_decay=weight_decay,
                    val_size=val_size, eval_every=eval_every, checkpoint_every=checkpoint_every,
                    seed=seed, device=device, threads=threads, resume=resume,
                    keep=keep)  # fmt: skip
    options["adversarial"] = adv
    if lr_drops is not None:
        try:
            options["lr_drops"] = tuple(float(f) for f in lr_drops.split(",") if f.strip())
        except ValueError:
            raise typer.BadParameter(
                "fractions such as 0.5,0.75", param_hint="--lr-drops"
            ) from None
    cfg = TrainConfig.tiny(**options) if dry_run else replace(TrainConfig(), **options)  # type: ignore[arg-type]
    result = run(cfg)
    typer.echo(
        f"test accuracy {result.test_accuracy:.4f} after {result.steps} steps "
        f"({result.wall_time_s:.0f} s); run folder {result.out_dir}"
    )


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="run folder written by `notsure train`")],
    name: Annotated[str, typer.Option(help="model name in the repository")],
    version: int = 1,
    models_dir: Annotated[Path, typer.Option(help="the model repository")] = Path("models"),
    opset: int = 18,
) -> None:
    """Export a trained run to models/<name>/<version>/model.onnx (parity-checked)."""
    from training.export import ExportConfig
    from training.export import export as run_export

    result = run_export(
        ExportConfig(run_dir=run, name=name, version=version, models_dir=models_dir, opset=opset)
    )
    typer.echo(f"exported to {result.model_dir} (max |dp| vs PyTorch {result.max_prob_diff:.1e})")


@app.command()
def calibrate(
    model_dir: Annotated[Path, typer.Argument(help="models/<name>/<version>")],
    data_dir: Annotated[Path, typer.Option(help="folder in torchvision's layout")] = Path("data"),
    score: Annotated[
        str | None,
        typer.Option(
            help="the score T applies to: j_score, confidence, energy or k_density "
            "(default: j_score for RCE models, confidence for CE models)"
        ),
    ] = None,
    target_clean_refuse: Annotated[
        float | None,
        typer.Option(help="share of clean images T may refuse [default: 0.05]"),
    ] = None,
    confidence: Annotated[
        float | None,
        typer.Option(
            help="with --target-clean-refuse: guarantee the refuse rate stays at or below it "
            "with this probability (e.g. 0.95); with --target-risk: the probability of its "
            "guarantee [default: 0.95]"
        ),
    ] = None,
    target_risk: Annotated[
        float | None,
        typer.Option(
            help="instead of a refuse rate: the highest error rate tolerated among accepted "
            "answers, guaranteed with --confidence (SGR)"
        ),
    ] = None,
    threshold: Annotated[float | None, typer.Option(help="set T directly instead")] = None,
    eta: Annotated[
        float | None, typer.Option(help="relaxation factor of the kernel (Eq. 5) [default: 1]")
    ] = None,
    kd_sigma2: Annotated[
        float | None,
        typer.Option(help="K-density bandwidth sigma^2 (default: 0.1/0.26 RCE, 1.0/0.26 CE)"),
    ] = None,
) -> None:
    """Compute mu, sigma, the K-density kernel set (training set) and T (held-out data)."""
    from dataclasses import replace

    from service.scoring import SCORE_NAMES
    from training.calibrate import CalibrateConfig
    from training.calibrate import calibrate as run_calibrate
    from training.guarantees import NoThreshold

    if score is not None and score not in SCORE_NAMES:
        raise typer.BadParameter(f"choose one of {', '.join(SCORE_NAMES)}", param_hint="--score")
    if target_risk is not None and target_clean_refuse is not None:
        raise typer.BadParameter(
            "give either --target-clean-refuse or --target-risk, not both",
            param_hint="--target-risk",
        )
    given = {
        "data_dir": data_dir,
        "score": score,
        "target_clean_refuse": target_clean_refuse,
        "confidence": confidence,
        "target_risk": target_risk,
        "threshold": threshold,
        "eta": eta,
        "kd_sigma2": kd_sigma2,
    }
    cfg = replace(
        CalibrateConfig(model_dir=model_dir),
        **{k: v for k, v in given.items() if v is not None},  # type: ignore[arg-type]
    )
    try:
        m = run_calibrate(cfg)
    except NoThreshold as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(
        f"{m.name}/{m.version}: sigma {m.kernel.sigma:.4g}, {m.score} >= {m.threshold:.4g} "
        f"({m.threshold_rule}), clean test accuracy {m.metrics['clean_test_accuracy']:.4f}, "
        f"test refuse rate {m.metrics['test_refuse_rate']:.2%}"
    )


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address (NOTSURE_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="port (NOTSURE_PORT)")] = None,
    model_repository: Annotated[Path | None, typer.Option(help="NOTSURE_MODEL_REPOSITORY")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cuda or cpu (NOTSURE_DEVICE)")] = None,
    grpc: Annotated[
        bool | None, typer.Option("--grpc/--no-grpc", help="KServe V2 gRPC (NOTSURE_GRPC_ENABLED)")
    ] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port (NOTSURE_GRPC_PORT)")] = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="server processes sharing the ports (NOTSURE_WORKERS)"),
    ] = None,
    model_control: Annotated[
        str | None,
        typer.Option(
            help="none, poll or explicit: how models change while serving (NOTSURE_MODEL_CONTROL)"
        ),
    ] = None,
) -> None:
    """Serve the repository's models: HTTP (native, KServe V2, /metrics) and KServe V2 gRPC."""
    from service.config import Settings
    from service.server import run

    overrides = {
        k: v
        for k, v in {
            "host": host,
            "port": port,
            "model_repository": model_repository,
            "device": device,
            "grpc_enabled": grpc,
            "grpc_port": grpc_port,
            "workers": workers,
            "model_control": model_control,
        }.items()
        if v is not None
    }
    run(Settings(**overrides))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
