"""`notsure audit`: the adaptive white-box audit, whose attacks know the score and the served
threshold, run plan by plan and resumable (`training.audit.plans` lists the plans).

Registered on the main app by `notsure.cli` through `register(app)`; torch loads only when the
command runs. Options default to None: the config is `replace(AuditConfig(), **given)`, or
`AuditConfig.tiny(work_dir)` for a dry run (its rows go under the work folder, never over the
measured ones).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from notsure.options import floats, given, split

Opt = typer.Option


def audit(
    ctx: typer.Context,
    plan: Annotated[
        str | None,
        Opt(
            help="headline, secondary, worst-case, k-density (attacks); autoattack (robust "
            "accuracy, no abstention); checks, transfer, live, certified, figures (on the saved "
            "results) (default: headline)"
        ),
    ] = None,
    model: Annotated[list[str] | None, Opt(help="model name(s); repeat or comma-separate")] = None,
    eps: Annotated[
        list[float] | None,
        Opt(help="only the plan's jobs at these L-inf or L2 budgets: --eps 0.1 0.3"),
    ] = None,
    data_dir: Annotated[Path | None, Opt(help="folder in torchvision's layout")] = None,
    models_dir: Annotated[Path | None, Opt(help="model repository")] = None,
    work_dir: Annotated[Path | None, Opt(help="resume state (default: runs/audit)")] = None,
    json_out: Annotated[
        Path | None, Opt("--json", help="result rows (default: docs/robustness/adaptive.json)")
    ] = None,
    chunk: Annotated[int | None, Opt(help="images saved together (the resume unit)")] = None,
    threads: Annotated[int | None, Opt(help="torch/onnxruntime threads")] = None,
    url: Annotated[str | None, Opt(help="base URL of the running service (plan live)")] = None,
    dry_run: Annotated[bool, Opt(help="tiny synthetic models, few images and steps")] = False,
) -> None:
    """Attack models adaptively (they know the score and T) and write the result rows."""
    from dataclasses import replace

    from training.audit.plans import run
    from training.audit.subject import AuditConfig

    logging.getLogger("httpx").setLevel(logging.WARNING)
    base = AuditConfig.tiny(work_dir or AuditConfig.work_dir) if dry_run else AuditConfig()
    cfg = replace(base, **given(
        plan=plan, models=split(model), models_dir=models_dir, data_dir=data_dir,
        work_dir=work_dir, out_json=json_out, chunk=chunk, threads=threads, url=url,
        eps=floats(eps, ctx.args, "--eps"),
    ))  # fmt: skip
    try:
        rows = run(cfg)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--plan") from None
    if cfg.plan == "autoattack":
        from training.audit.autoattack import autoattack_json

        for r in rows:
            typer.echo(
                f"{r['model']} AutoAttack eps {r['eps']:g}: robust accuracy "
                f"{r['robust_accuracy']:.3f}, clean {r['clean_accuracy']:.3f} (n {r['n']})"
            )
        typer.echo(f"rows: {autoattack_json(cfg)}")
        return
    if cfg.plan == "certified":
        _echo_certified(cfg.out_json.with_name("certified.json"))
        return
    for r in rows:
        if r["attack"] == "worst-case" or r["attack"] == "none":
            typer.echo(
                f"{r['model']} {r['score']} T={r['threshold']:.4g} {r['attack']} eps "
                f"{r['eps']:g}: success {r['attack_success']:.3f} (n {r['n']})"
            )
    typer.echo(f"rows: {cfg.out_json}")


def _echo_certified(path: Path) -> None:
    """One line per model and eps of the certified plan's rows."""
    import json

    def pct(v: object) -> str:
        return "-" if v is None else f"{100 * float(v):.1f}%"  # type: ignore[arg-type]

    rows = json.loads(path.read_text()) if path.exists() else []
    for r in rows:
        typer.echo(
            f"{r['model']} eps {r['eps']:g}: certified handled {pct(r['certified_handled'])} "
            f"(n {r['images']}), worst-case handled {pct(r['worst_case_handled'])} "
            f"(n {r['worst_case_n'] or 0}), clean refusals the policy adds "
            f"{pct(r['policy_clean_refusals'])}"
        )
    if not rows:
        typer.echo("no model with a bound graph (notsure certify export)")
    typer.echo(f"rows: {path} and {path.with_suffix('.md')}")


def register(app: typer.Typer) -> None:
    """Add `audit` to the main CLI; extra arguments carry the values after --eps."""
    app.command("audit", context_settings={"allow_extra_args": True})(audit)
