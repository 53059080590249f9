"""`notsure import`: calibrate an ONNX image classifier trained elsewhere and add it to the
model repository, where the service serves it behind NOT SURE (docs/your-model.md).

Registered on the main app by `notsure.cli`; onnxruntime and the calibration code load only
when it runs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

Opt = typer.Option
OUTPUTS = ("logits", "neg_logits", "probabilities")
RESIZES = ("stretch", "center_crop")


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise typer.BadParameter("comma-separated numbers, e.g. 0.485,0.456,0.406",
                                 param_hint=option) from exc  # fmt: skip


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    h, sep, w = text.lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit() or int(h) < 1 or int(w) < 1:
        raise typer.BadParameter("height x width in pixels, e.g. 224x224", param_hint="--size")
    return int(h), int(w)


def import_model(
    model: Annotated[Path, typer.Argument(help="the ONNX file of an image classifier")],
    name: Annotated[str, Opt(help="model name in the repository (lower case, digits, -._)")],
    data: Annotated[
        Path | None,
        Opt(
            help="held-out images to calibrate T on: a folder with one sub-folder per class "
            "(labelled), a folder of images (unlabelled), or an .npz with x and optional y"
        ),
    ] = None,
    mean: Annotated[
        str | None, Opt(help="per-channel mean the service subtracts, pixels in [0, 1] first")
    ] = None,
    std: Annotated[str | None, Opt(help="per-channel std the service divides by")] = None,
    size: Annotated[str | None, Opt(help="HxW input size, needed when the graph's is dynamic")] = (
        None
    ),
    channels: Annotated[
        int | None, Opt(help="1 (grey) or 3 (RGB), when the graph's is dynamic")
    ] = (None),
    classes: Annotated[Path | None, Opt(help="file with one class name a line")] = None,
    output: Annotated[
        str | None,
        Opt(
            help="what the graph gives: logits, neg_logits (RCE) or probabilities (default: logits)"
        ),
    ] = None,
    score: Annotated[
        str | None,
        Opt(
            help="score T applies to: j_score, confidence or energy (default: j_score for "
            "neg_logits, else confidence)"
        ),
    ] = None,
    target_clean_refuse: Annotated[
        float | None, Opt(help="share of clean images T may refuse (default: 0.05)")
    ] = None,
    confidence: Annotated[
        float | None,
        Opt(
            help="guarantee that the refuse rate stays at or below its target with this "
            "probability (e.g. 0.95); with --target-risk the probability of its guarantee "
            "(default: 0.95)"
        ),
    ] = None,
    target_risk: Annotated[
        float | None,
        Opt(help="instead: the highest error rate among accepted answers (needs labels)"),
    ] = None,
    threshold: Annotated[
        float | None, Opt(help="set T by hand; the model is marked uncalibrated")
    ] = None,
    resize: Annotated[
        str | None,
        Opt(
            help="resize every upload of another size: stretch, or center_crop (ImageNet's) "
            "(default: uploads of another size are refused unless the request asks)"
        ),
    ] = None,
    repository: Annotated[Path | None, Opt(help="the model repository (default: models)")] = None,
) -> None:
    """Calibrate an ONNX image classifier on held-out data and add it to the repository."""
    from service.scoring import SCORE_NAMES
    from training.importer import ImportConfig, ImportFailed
    from training.importer import import_model as run

    if output is not None and output not in OUTPUTS:
        raise typer.BadParameter(f"use {', '.join(OUTPUTS)}", param_hint="--output")
    if score is not None and score not in SCORE_NAMES:
        raise typer.BadParameter(f"use one of {', '.join(SCORE_NAMES)}", param_hint="--score")
    if resize is not None and resize not in RESIZES:
        raise typer.BadParameter(f"use {' or '.join(RESIZES)}", param_hint="--resize")
    if channels is not None and channels not in (1, 3):
        raise typer.BadParameter("1 (grey) or 3 (RGB)", param_hint="--channels")
    if target_risk is not None and target_clean_refuse is not None:
        raise typer.BadParameter(
            "give either --target-clean-refuse or --target-risk", param_hint="--target-risk"
        )
    given: dict[str, Any] = {
        "data": data,
        "mean": _floats(mean, "--mean"),
        "std": _floats(std, "--std"),
        "size": _size(size),
        "channels": channels,
        "classes": classes,
        "output": output,
        "score": score,
        "target_clean_refuse": target_clean_refuse,
        "confidence": confidence,
        "target_risk": target_risk,
        "threshold": threshold,
        "resize": resize,
        "repository": repository,
    }
    cfg = replace(
        ImportConfig(model=model, name=name), **{k: v for k, v in given.items() if v is not None}
    )
    try:
        result = run(cfg)
    except ImportFailed as exc:
        raise typer.BadParameter(str(exc)) from exc
    m = result.manifest
    refuse = m.metrics.get("heldout_refuse_rate")
    typer.echo(
        f"{m.name}/{m.version} -> {result.model_dir}: {m.score} >= {m.threshold:.4g} "
        f"({m.threshold_rule})"
        + (f", held-out refuse rate {refuse:.2%}" if refuse is not None else "")
        + ("" if m.calibrated else "; UNCALIBRATED: T set by hand")
    )


def register(app: typer.Typer) -> None:
    """Add `import` (a Python keyword, hence the function's name) to the main CLI."""
    app.command("import")(import_model)
