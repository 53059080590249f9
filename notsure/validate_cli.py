"""`notsure validate ood`: refusal of out-of-distribution images, through the live service.

Registered on the main app by `notsure.cli`; numpy/sklearn/matplotlib load only when it runs.
Options default to None: the config is `replace(OodConfig(), **given)`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from notsure.options import given, split

app = typer.Typer(no_args_is_help=True, help="Validate a served model on shifted data.")
Opt = typer.Option


@app.command("ood")
def ood(
    model: Annotated[list[str] | None, Opt(help="model name(s); repeat or comma-separate")] = None,
    ood: Annotated[
        list[str] | None,
        Opt(
            help="OOD data sets, or folders of images / .npz files (default: fashion-mnist "
            "for MNIST models, mnist for Fashion-MNIST models)"
        ),
    ] = None,
    id_data: Annotated[
        Path | None,
        Opt(help="ID images of an imported model: a folder of images or an .npz"),
    ] = None,
    shift: Annotated[
        list[str] | None,
        Opt(
            help="synthetic shifts of the ID test set: noise, inverted, blur, rotated, blank, "
            "or none [default: all]"
        ),
    ] = None,
    url: Annotated[str | None, Opt(help="base URL of the running service")] = None,
    data_dir: Annotated[Path | None, Opt(help="folder in torchvision's layout")] = None,
    models_dir: Annotated[Path | None, Opt(help="the model repository the service serves")] = None,
    n: Annotated[int | None, Opt(help="images per set (0: whole test sets)")] = None,
    batch_size: Annotated[int | None, Opt(help="images per request")] = None,
    out: Annotated[Path | None, Opt(help="folder for ood.json, tables.md and ood.png")] = None,
    api_key: Annotated[str | None, Opt(help="bearer key if the service needs one")] = None,
) -> None:
    """Refuse rate at T, AUROC and FPR@95%TPR of every score on OOD sets and shifts."""
    from training.ood import SHIFTS, OodConfig, run

    logging.getLogger("httpx").setLevel(logging.WARNING)
    shifts = split(shift) or ()
    if bad := [s for s in shifts if s not in (*SHIFTS, "none")]:
        raise typer.BadParameter(
            f"{bad[0]!r}: use {', '.join(SHIFTS)} or none", param_hint="--shift"
        )
    cfg = replace(OodConfig(), **given(
        models=split(model), ood=split(ood), id_data=id_data,
        shifts=tuple(s for s in shifts if s != "none") if shifts else None, url=url,
        data_dir=data_dir, models_dir=models_dir, n=n, batch_size=batch_size, out_dir=out,
        api_key=api_key,
    ))  # fmt: skip
    report = run(cfg)
    for m in report["models"]:
        for r in m["rows"]:
            typer.echo(
                f"{m['model']} {r['set']:>14} {r['score']:>10}: refused {r['refuse_rate']:6.1%}"
                f"  AUROC {r['auroc']:.3f}  FPR@95 {r['fpr_at_95_tpr']:6.1%}"
            )
    typer.echo(f"report: {cfg.out_dir / 'tables.md'}")
