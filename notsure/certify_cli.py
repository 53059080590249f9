"""`notsure certify`: certified training (IBP), the bound graph beside a model, and certified
accuracy on a test set.

Registered on the main app by `notsure.cli`; torch and onnx load only when a command runs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, help="Answers that no perturbation within eps can flip.")
Opt = typer.Option


def _given(**values: object) -> dict[str, object]:
    return {k: v for k, v in values.items() if v is not None}


@app.command("train")
def train(
    dataset: Annotated[str | None, Opt(help="mnist, fashion-mnist, cifar10 or synthetic")] = None,
    arch: Annotated[str | None, Opt(help="cnn or mlp [default: cnn]")] = None,
    objective: Annotated[str | None, Opt(help="ce, or rce (RCE clean term)")] = None,
    data_dir: Annotated[Path | None, Opt(help="folder in torchvision's layout")] = None,
    out: Annotated[Path | None, Opt(help="run folder (checkpoint, log, weights)")] = None,
    steps: Annotated[int | None, Opt(help="optimiser steps [default: 60000]")] = None,
    batch_size: Annotated[int | None, Opt(help="[default: 100]")] = None,
    lr: Annotated[float | None, Opt(help="Adam learning rate [default: 1e-3]")] = None,
    lr_drop: Annotated[
        list[int] | None, Opt(help="step where lr /= 10; repeat [default: 15000, 25000]")
    ] = None,
    eps: Annotated[float | None, Opt(help="final training radius [default: 0.4]")] = None,
    warmup_steps: Annotated[int | None, Opt(help="steps at eps 0 [default: 2000]")] = None,
    ramp_steps: Annotated[int | None, Opt(help="steps of the eps ramp [default: 10000]")] = None,
    kappa_final: Annotated[float | None, Opt(help="plain-loss weight at full eps")] = None,
    ramp: Annotated[str | None, Opt(help="smoothed or linear [default: smoothed]")] = None,
    eval_eps: Annotated[float | None, Opt(help="radius of the held-out verified accuracy")] = None,
    val_size: Annotated[int | None, Opt(help="training images held out")] = None,
    seed: Annotated[int | None, Opt()] = None,
    device: Annotated[str | None, Opt(help="auto, cpu or cuda")] = None,
    threads: Annotated[int | None, Opt(help="torch CPU threads (0: default)")] = None,
    resume: Annotated[bool | None, Opt(help="continue from the run folder's checkpoint")] = None,
    stop_after: Annotated[
        int | None, Opt(help="stop (resumably) after this many steps of this call")
    ] = None,
    dry_run: Annotated[bool, Opt(help="tiny synthetic data, seconds")] = False,
) -> None:
    """IBP certified training with the eps ramp and kappa schedule of Gowal et al."""
    from training.certify.train import CertifyTrainConfig
    from training.certify.train import train as run

    base = CertifyTrainConfig.tiny() if dry_run else CertifyTrainConfig()
    schedule = replace(
        base.schedule,
        **_given(eps=eps, warmup_steps=warmup_steps, ramp_steps=ramp_steps,
                 kappa_final=kappa_final, shape=ramp),
    )  # fmt: skip
    if schedule.shape not in ("linear", "smoothed"):
        raise typer.BadParameter(f"{schedule.shape!r}: use smoothed or linear", param_hint="--ramp")
    if objective is not None and objective not in ("ce", "rce"):
        raise typer.BadParameter(f"{objective!r}: use ce or rce", param_hint="--objective")
    cfg = replace(
        base,
        schedule=schedule,
        **_given(dataset=dataset, arch=arch, objective=objective, data_dir=data_dir, out_dir=out,
                 steps=steps, batch_size=batch_size, lr=lr,
                 lr_drops=tuple(lr_drop) if lr_drop else None, eval_eps=eval_eps,
                 val_size=val_size, seed=seed, device=device, threads=threads, resume=resume,
                 stop_after=stop_after),
    )  # type: ignore[arg-type]  # fmt: skip
    if dry_run and out is None:
        cfg = replace(cfg, out_dir=Path("runs/certify-dry-run"))
    result = run(cfg)
    state = "done" if result.finished else "stopped (resume with the same command)"
    best = result.best
    kept = (
        f"kept epoch {best['epoch']:.0f}: held-out clean {best['val_clean']:.4f}, verified at "
        f"{cfg.eval_eps:g} {best['val_verified']:.4f}"
        if best
        else "no epoch finished yet"
    )
    typer.echo(
        f"{state}: {result.steps} steps in {result.wall_time_s:.0f} s; {kept} ({cfg.out_dir})"
    )


@app.command("export")
def export(
    model_dir: Annotated[Path, typer.Argument(help="models/<name>/<version>")],
    eps: Annotated[
        float | None,
        Opt(help="L-inf radius the service certifies each answer at [default: the manifest's]"),
    ] = None,
    required: Annotated[
        bool | None,
        Opt(
            "--required/--reported",
            help="accept an answer only when it is certified, or only report the certificate "
            "[default: the manifest's]",
        ),
    ] = None,
) -> None:
    """Write certify.onnx (the bound graph) beside model.onnx, check it against torch and
    record it in the manifest, so the service certifies every answer of this model."""
    from training.certify.graph import export_model

    path, worst = export_model(model_dir, eps=eps, required=required)
    typer.echo(f"{path}: parity with torch {worst:.1e} (relative to the largest bound)")


@app.command("eval")
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="models/<name>/<version>")],
    eps: Annotated[
        list[float] | None, Opt(help="L-inf radius; repeat [default: 0.1 0.2 0.3]")
    ] = None,
    dataset: Annotated[str | None, Opt(help="test set [default: the manifest's]")] = None,
    data_dir: Annotated[Path | None, Opt(help="folder in torchvision's layout")] = None,
    limit: Annotated[int | None, Opt(help="first N test images (0: all)")] = None,
    backend: Annotated[str | None, Opt(help="onnx (certify.onnx) or torch")] = None,
    out: Annotated[Path | None, Opt(help="write the results as JSON here")] = None,
    dry_run: Annotated[bool, Opt(help="64 synthetic images, seconds")] = False,
) -> None:
    """Certified accuracy, certified handled and the certificate policy's refusals, per eps."""
    from training.certify.accuracy import EvalConfig, run

    base = EvalConfig.tiny() if dry_run else EvalConfig()
    given = _given(model_dir=model_dir, eps=tuple(eps) if eps else None, dataset=dataset,
                   data_dir=data_dir, limit=limit, backend=backend, out=out)  # fmt: skip
    cfg = replace(base, **given)  # type: ignore[arg-type]
    for r in run(cfg):
        handled = "n/a" if r.certified_handled is None else f"{r.certified_handled:.2%}"
        typer.echo(
            f"{r.model} eps {r.eps:g} ({r.images} images, {r.backend}): clean "
            f"{r.clean_accuracy:.2%}, certified {r.certified_accuracy:.2%}, certified handled "
            f"{handled} at {r.score} >= {r.threshold:.4g}; certificate policy accepts "
            f"{r.policy_accept_rate:.2%}"
            f" (accuracy {r.policy_accepted_accuracy:.2%}) vs {r.accept_rate:.2%} without"
        )
