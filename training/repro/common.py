"""Shared plumbing of the reproduction experiments: output paths, JSON, report sections, data."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training import data as data_mod
from training.attacks.classic import served_predictions
from training.losses import Objective
from training.provenance import run_record
from training.train import TrainConfig

DEFAULT_OUT = Path("docs/reproduction")
DEFAULT_REPORT = Path("docs/reproduction.md")
# Dry runs never touch the committed report: they write here unless told otherwise.
DRY_RUN_OUT = Path("runs/repro-dry-run")
DRY_RUN_RUNS = DRY_RUN_OUT / "runs"  # the dry runs' training runs

REPORT_HEADER = """# Reproducing the RCE paper at CPU scale

Generated sections (between `BEGIN repro:` / `END repro:` markers) are rewritten by
`notsure repro <experiment>`; the text outside them is written by hand.
"""


@dataclass(frozen=True)
class Output:
    """Where one experiment writes: JSON + PNG into `out_dir`, its section into `report`."""

    out_dir: Path
    report: Path

    def json_path(self, name: str) -> Path:
        return self.out_dir / f"{name}.json"

    def png_path(self, name: str) -> Path:
        return self.out_dir / f"{name}.png"

    def link(self, path: Path) -> str:
        """`path` relative to the report's folder, for a markdown link or image."""
        return Path(os.path.relpath(path, self.report.parent)).as_posix()


def resolve_output(out_dir: Path | None, report: Path | None, dry_run: bool) -> Output:
    """Defaults: docs/ for real runs, runs/repro-dry-run/ for dry runs."""
    base = out_dir or (DRY_RUN_OUT if dry_run else DEFAULT_OUT)
    rep = report or (base / "reproduction.md" if dry_run else DEFAULT_REPORT)
    base.mkdir(parents=True, exist_ok=True)
    rep.parent.mkdir(parents=True, exist_ok=True)
    return Output(base, rep)


def _finite(obj: object) -> object:
    """NaN/inf -> None and numpy scalars/arrays -> Python, so the JSON is strict."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _finite(obj.tolist())
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return obj.as_posix()
    return obj


_NUMBER_LIST = re.compile(r"\[\s+([-+0-9.eE,\snul]+?)\s+\]")


def write_json(path: Path, obj: dict[str, object]) -> None:
    """Strict JSON, indented, with each innermost list of numbers on one line (small files),
    stamped with the date and machine of the run (`"run"`)."""
    text = json.dumps(_finite({"run": run_record(), **obj}), indent=1, allow_nan=False)
    text = _NUMBER_LIST.sub(lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
    path.write_text(text + "\n", encoding="utf-8")


def update_section(report: Path, name: str, title: str, body: str) -> None:
    """Replace the generated block `name` of the report, or append it under `## title`."""
    begin, end = f"<!-- BEGIN repro:{name} -->", f"<!-- END repro:{name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = report.read_text(encoding="utf-8") if report.exists() else REPORT_HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), flags=re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n{block}\n"
    report.write_text(text, encoding="utf-8")


def load_splits(
    dataset: str, data_dir: Path, val_size: int, seed: int, dry_run: bool
) -> data_mod.Splits:
    """The splits `training.train` trains on (the synthetic set for dry runs)."""
    return data_mod.run_splits(dataset, data_dir, val_size, seed, dry_run)


def served_logits_np(net: nn.Module, objective: Objective, x: torch.Tensor) -> np.ndarray:
    """The vector fed to the served softmax, in batches of 500: (N, C, H, W) -> (N, L)."""
    parts = [served_predictions(net, objective, x[i : i + 500]) for i in range(0, len(x), 500)]
    return torch.cat(parts).numpy()


def adam_run(
    cfg: Any, arch: str, objective: Objective, evals: int, checkpoint_every: int
) -> TrainConfig:
    """The appendix recipe (Adam, no weight decay, no lr drops) for one net of an experiment whose
    config carries dataset, data_dir, steps, batch_size, lr, val_size, runs_dir, seed, threads,
    dry_run; resumable from runs_dir/<dataset>-<arch>-<objective>."""
    return TrainConfig(
        dataset="synthetic" if cfg.dry_run else cfg.dataset,
        data_dir=cfg.data_dir,
        arch=arch,
        objective=objective,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        optimizer="adam",
        lr=cfg.lr,
        weight_decay=0.0,
        lr_drops=(),
        val_size=cfg.val_size,
        eval_every=max(cfg.steps // evals, 1),
        checkpoint_every=checkpoint_every,
        out_dir=cfg.runs_dir / f"{cfg.dataset}-{arch}-{objective}",
        seed=cfg.seed,
        threads=cfg.threads,
        resume=True,
        dry_run=cfg.dry_run,
    )
