"""`notsure attack`: FGSM (or BIM/PGD/ILLC) against a live service, with a report.

Registered on the main app by `notsure.cli` through `register(app)`; torch and matplotlib are
imported only when the command runs. Options default to None: the config is
`replace(AttackRunConfig(), **given)`, or `AttackRunConfig.tiny()` for a dry run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from notsure.options import floats, given, split

Opt = typer.Option


def attack(
    ctx: typer.Context,
    model: Annotated[list[str] | None, Opt(help="model name(s); repeat or comma-separate")] = None,
    url: Annotated[str | None, Opt(help="base URL of the running service")] = None,
    protocol: Annotated[
        str | None,
        Opt(help="http or grpc (KServe V2; grpc uses --url's host, port 8001 unless grpc://)"),
    ] = None,
    eps: Annotated[list[float] | None, Opt(help="pixel-unit budgets: --eps 0.1 0.2 0.3")] = None,
    n: Annotated[int | None, Opt(help="clean test images (the mixed set has 2N)")] = None,
    out: Annotated[Path | None, Opt(help="report folder (default: runs/attack)")] = None,
    cost: Annotated[list[str] | None, Opt(help="ce and/or rce (paper Section 4.4)")] = None,
    labels: Annotated[str | None, Opt(help="attack the true or the predicted label")] = None,
    method: Annotated[str | None, Opt(help="fgsm, bim, pgd or illc")] = None,
    steps: Annotated[int | None, Opt(help="iterations of bim/pgd/illc")] = None,
    offline: Annotated[bool | None, Opt(help="score with the ONNX file, no service")] = None,
    data_dir: Annotated[Path | None, Opt(help="folder in torchvision's layout")] = None,
    models_dir: Annotated[Path | None, Opt(help="model repository")] = None,
    cache_dir: Annotated[Path | None, Opt(help="resume cache (default: runs/attack-cache)")] = None,
    batch_size: Annotated[int | None, Opt(help="images per request")] = None,
    timeout: Annotated[float | None, Opt(help="seconds per request")] = None,
    retries: Annotated[int | None, Opt(help="retries per request on 503/504/errors")] = None,
    api_key: Annotated[str | None, Opt(help="bearer key if the service needs one")] = None,
    device: Annotated[str | None, Opt(help="torch device for gradients: auto, cpu, cuda")] = None,
    threads: Annotated[int | None, Opt(help="torch/onnxruntime threads (0: default)")] = None,
    dry_run: Annotated[bool, Opt(help="tiny synthetic models, offline, few images")] = False,
) -> None:
    """Attack models white-box and measure what the service's NOT SURE filters."""
    from dataclasses import replace

    from training.validator.run import AttackRunConfig, run
    from training.validator.summary import write_report

    # httpx logs every request at INFO: thousands of lines that would bury the progress bars.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    costs = split(cost)
    if costs and (bad := [c for c in costs if c not in ("ce", "rce")]):
        raise typer.BadParameter(f"{bad[0]!r}: use ce and/or rce", param_hint="--cost")
    if protocol is not None and protocol not in ("http", "grpc"):
        raise typer.BadParameter(f"{protocol!r}: use http or grpc", param_hint="--protocol")
    base = AttackRunConfig.tiny() if dry_run else AttackRunConfig()
    cfg = replace(base, **given(
        models=split(model), eps=floats(eps, ctx.args, "--eps"), costs=costs, labels=labels,
        method=method, steps=steps, n=n, url=url, offline=offline, models_dir=models_dir,
        data_dir=data_dir, out_dir=out, cache_dir=cache_dir, request_batch=batch_size,
        timeout_s=timeout, retries=retries, api_key=api_key, device=device, threads=threads,
        protocol=protocol,
    ))  # fmt: skip
    report = write_report(run(cfg), cfg.out_dir)
    for m in report["models"]:
        for key, a in m["attacks"].items():
            t, auc = a["at_manifest_T"], a["auc"]
            typer.echo(
                f"{m['name']} {key}: adv acc {a['adversarial_accuracy']:.3f}, refused normal "
                f"{t['refuse_normal']:.3f} / adv {t['refuse_adversarial']:.3f}, "
                f"AUC J {auc['j_score']:.3f} conf {auc['confidence']:.3f}"
            )
    typer.echo(f"report: {cfg.out_dir / 'report.md'}")


def register(app: typer.Typer) -> None:
    """Add `attack` to the main CLI; extra arguments carry the values after --eps."""
    app.command("attack", context_settings={"allow_extra_args": True})(attack)
