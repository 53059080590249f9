"""`notsure attack`: FGSM (or BIM/PGD/ILLC) against a live service, with a report.

Registered on the main app by `notsure.cli` through `register(app)`; torch and matplotlib are
imported only when the command runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

DEFAULT_MODELS = ("mnist-resnet32-rce",)
DEFAULT_EPS = (0.05, 0.1, 0.2, 0.3)
Opt = typer.Option


def _split(values: list[str] | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """Repeated options and comma-separated lists: ['a,b', 'c'] -> ('a', 'b', 'c')."""
    items = tuple(v.strip() for item in values or [] for v in item.split(",") if v.strip())
    return items or default


def _eps(given: list[float] | None, extra: list[str]) -> tuple[float, ...]:
    """--eps 0.05 0.1 0.2: click takes the first value, the rest arrive as extra arguments."""
    values = list(given or [])
    for arg in extra:
        try:
            values.append(float(arg))
        except ValueError:
            raise typer.BadParameter(
                f"unexpected argument {arg!r}; only eps values may follow --eps",
                param_hint="--eps",
            ) from None
    return tuple(values) if values else DEFAULT_EPS


def attack(
    ctx: typer.Context,
    model: Annotated[list[str] | None, Opt(help="model name(s); repeat or comma-separate")] = None,
    url: Annotated[str, Opt(help="base URL of the running service")] = "http://127.0.0.1:8000",
    protocol: Annotated[
        str, Opt(help="http or grpc (KServe V2; grpc uses --url's host, port 8001 unless grpc://)")
    ] = "http",
    eps: Annotated[list[float] | None, Opt(help="pixel-unit budgets: --eps 0.1 0.2 0.3")] = None,
    n: Annotated[int, Opt(help="clean test images (the mixed set has 2N)")] = 1000,
    out: Annotated[Path, Opt(help="report folder")] = Path("runs/attack"),
    cost: Annotated[list[str] | None, Opt(help="ce and/or rce (paper Section 4.4)")] = None,
    labels: Annotated[str, Opt(help="attack the true or the predicted label")] = "true",
    method: Annotated[str, Opt(help="fgsm, bim, pgd or illc")] = "fgsm",
    steps: Annotated[int, Opt(help="iterations of bim/pgd/illc")] = 10,
    offline: Annotated[bool, Opt(help="score with the ONNX file, no service")] = False,
    data_dir: Annotated[Path, Opt(help="folder in torchvision's layout")] = Path("data"),
    models_dir: Annotated[Path, Opt(help="model repository")] = Path("models"),
    cache_dir: Annotated[Path | None, Opt(help="resume cache [runs/attack-cache]")] = None,
    batch_size: Annotated[int, Opt(help="images per request")] = 256,
    timeout: Annotated[float, Opt(help="seconds per request")] = 60.0,
    retries: Annotated[int, Opt(help="retries per request on 503/504/errors")] = 3,
    api_key: Annotated[str | None, Opt(help="bearer key if the service needs one")] = None,
    device: Annotated[str, Opt(help="torch device for gradients: auto, cpu, cuda")] = "auto",
    threads: Annotated[int, Opt(help="torch/onnxruntime threads (0: default)")] = 0,
    dry_run: Annotated[bool, Opt(help="tiny synthetic models, offline, N <= 64")] = False,
) -> None:
    """Attack models white-box and measure what the service's NOT SURE filters (issue 4)."""
    from training.attack_run import AttackRunConfig, run
    from training.attack_summary import write_report

    # httpx logs every request at INFO: thousands of lines that would bury the progress bars.
    logging.getLogger("httpx").setLevel(logging.WARNING)

    costs = _split(cost, ("ce",))
    if bad := [c for c in costs if c not in ("ce", "rce")]:
        raise typer.BadParameter(f"{bad[0]!r}: use ce and/or rce", param_hint="--cost")
    if protocol not in ("http", "grpc"):
        raise typer.BadParameter(f"{protocol!r}: use http or grpc", param_hint="--protocol")
    cfg = AttackRunConfig(
        models=_split(model, DEFAULT_MODELS), eps=_eps(eps, ctx.args),
        costs=costs, labels=labels, method=method, protocol=protocol,  # type: ignore[arg-type]
        steps=steps, n=n, url=url, offline=offline, models_dir=models_dir, data_dir=data_dir,
        out_dir=out, cache_dir=cache_dir, request_batch=batch_size, timeout_s=timeout,
        retries=retries, api_key=api_key, device=device, threads=threads, dry_run=dry_run,
    )  # fmt: skip
    report = write_report(run(cfg), out)
    for m in report["models"]:
        for key, a in m["attacks"].items():
            t, auc = a["at_manifest_T"], a["auc"]
            typer.echo(
                f"{m['name']} {key}: adv acc {a['adversarial_accuracy']:.3f}, refused normal "
                f"{t['refuse_normal']:.3f} / adv {t['refuse_adversarial']:.3f}, "
                f"AUC J {auc['j_score']:.3f} conf {auc['confidence']:.3f}"
            )
    typer.echo(f"report: {out / 'report.md'}")


def register(app: typer.Typer) -> None:
    """Add `attack` to the main CLI; extra arguments carry the values after --eps."""
    app.command("attack", context_settings={"allow_extra_args": True})(attack)
