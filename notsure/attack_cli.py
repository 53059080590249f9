"""`notsure attack`: FGSM (or BIM/PGD/ILLC) against a live service, with a report; with
--adaptive, the white-box audit whose attacks know the score and the served threshold.

Registered on the main app by `notsure.cli` through `register(app)`; torch and matplotlib are
imported only when the command runs. Every option defaults to None and only the options given
replace fields of the config dataclasses, so the defaults live in one place: the dataclasses.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

Opt = typer.Option


def _split(values: list[str] | None) -> tuple[str, ...] | None:
    """Repeated options and comma-separated lists: ['a,b', 'c'] -> ('a', 'b', 'c')."""
    items = tuple(v.strip() for item in values or [] for v in item.split(",") if v.strip())
    return items or None


def _eps(given: list[float] | None, extra: list[str]) -> tuple[float, ...] | None:
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
    return tuple(values) if values else None


def _given(**values: Any) -> dict[str, Any]:
    """The options the user set (None means: keep the dataclass default)."""
    return {k: v for k, v in values.items() if v is not None}


def attack(
    ctx: typer.Context,
    model: Annotated[list[str] | None, Opt(help="model name(s); repeat or comma-separate")] = None,
    url: Annotated[str | None, Opt(help="base URL of the running service")] = None,
    protocol: Annotated[
        str | None,
        Opt(help="http or grpc (KServe V2; grpc uses --url's host, port 8001 unless grpc://)"),
    ] = None,
    eps: Annotated[
        list[float] | None,
        Opt(
            help="pixel-unit budgets: --eps 0.1 0.2 0.3 (with --adaptive: only the plan's "
            "jobs at these L-inf or L2 budgets)"
        ),
    ] = None,
    n: Annotated[int | None, Opt(help="clean test images (the mixed set has 2N)")] = None,
    out: Annotated[Path | None, Opt(help="report folder [runs/attack]")] = None,
    cost: Annotated[list[str] | None, Opt(help="ce and/or rce (paper Section 4.4)")] = None,
    labels: Annotated[str | None, Opt(help="attack the true or the predicted label")] = None,
    method: Annotated[str | None, Opt(help="fgsm, bim, pgd or illc")] = None,
    steps: Annotated[int | None, Opt(help="iterations of bim/pgd/illc")] = None,
    offline: Annotated[bool | None, Opt(help="score with the ONNX file, no service")] = None,
    data_dir: Annotated[Path | None, Opt(help="folder in torchvision's layout")] = None,
    models_dir: Annotated[Path | None, Opt(help="model repository")] = None,
    cache_dir: Annotated[Path | None, Opt(help="resume cache [runs/attack-cache]")] = None,
    batch_size: Annotated[int | None, Opt(help="images per request")] = None,
    timeout: Annotated[float | None, Opt(help="seconds per request")] = None,
    retries: Annotated[int | None, Opt(help="retries per request on 503/504/errors")] = None,
    api_key: Annotated[str | None, Opt(help="bearer key if the service needs one")] = None,
    device: Annotated[str | None, Opt(help="torch device for gradients: auto, cpu, cuda")] = None,
    threads: Annotated[int | None, Opt(help="torch/onnxruntime threads (0: default)")] = None,
    dry_run: Annotated[bool | None, Opt(help="tiny synthetic models, offline, few images")] = None,
    adaptive: Annotated[bool, Opt(help="run the adaptive white-box audit instead")] = False,
    plan: Annotated[
        str | None,
        Opt(
            help="audit plan: headline, secondary, worst-case, k-density, checks, transfer, live, "
            "figures"
        ),
    ] = None,
    work_dir: Annotated[Path | None, Opt(help="audit resume state [runs/audit]")] = None,
    json_out: Annotated[
        Path | None, Opt("--json", help="audit rows [docs/robustness/adaptive.json]")
    ] = None,
    chunk: Annotated[int | None, Opt(help="audit images saved together (resume unit)")] = None,
) -> None:
    """Attack models white-box and measure what the service's NOT SURE filters."""
    # httpx logs every request at INFO: thousands of lines that would bury the progress bars.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if adaptive:
        _adaptive(_given(plan=plan, models=_split(model), models_dir=models_dir,
                         data_dir=data_dir, work_dir=work_dir, out_json=json_out, chunk=chunk,
                         threads=threads, dry_run=dry_run, url=url,
                         eps=_eps(eps, ctx.args)))  # fmt: skip
        return

    from dataclasses import replace

    from training.attack.run import AttackRunConfig, run
    from training.attack.summary import write_report

    costs = _split(cost)
    if costs and (bad := [c for c in costs if c not in ("ce", "rce")]):
        raise typer.BadParameter(f"{bad[0]!r}: use ce and/or rce", param_hint="--cost")
    if protocol is not None and protocol not in ("http", "grpc"):
        raise typer.BadParameter(f"{protocol!r}: use http or grpc", param_hint="--protocol")
    cfg = replace(AttackRunConfig(), **_given(
        models=_split(model), eps=_eps(eps, ctx.args), costs=costs, labels=labels,
        method=method, steps=steps, n=n, url=url, offline=offline, models_dir=models_dir,
        data_dir=data_dir, out_dir=out, cache_dir=cache_dir, request_batch=batch_size,
        timeout_s=timeout, retries=retries, api_key=api_key, device=device, threads=threads,
        dry_run=dry_run, protocol=protocol,
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


def _adaptive(given: dict[str, Any]) -> None:
    from dataclasses import replace

    from training.attack.audit import AuditConfig, run

    cfg = replace(AuditConfig(), **given)
    if cfg.dry_run and "out_json" not in given:  # a dry run must not overwrite measured rows
        cfg = replace(cfg, out_json=cfg.work_dir / "adaptive.json")
    try:
        rows = run(cfg)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--plan") from None
    for r in rows:
        if r["attack"] == "worst-case" or r["attack"] == "none":
            typer.echo(
                f"{r['model']} {r['score']} T={r['threshold']:.4g} {r['attack']} eps "
                f"{r['eps']:g}: success {r['attack_success']:.3f} (n {r['n']})"
            )
    typer.echo(f"rows: {cfg.out_json}")


def register(app: typer.Typer) -> None:
    """Add `attack` to the main CLI; extra arguments carry the values after --eps."""
    app.command("attack", context_settings={"allow_extra_args": True})(attack)
