"""`notsure records`: list and export the NOT SURE records a server wrote (NOTSURE_RECORD_RATE).

Each record is `<stem>.json` (request id, model, version, every score, T) and `<stem>.png` (the
image as the model saw it) in the record folder (NOTSURE_RECORD_DIR); see service/records.py.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True, help="List and export refused-input (NOT SURE) records.")
Opt = typer.Option


@dataclass(frozen=True)
class RecordQuery:
    folder: Path = Path("not-sure-records")
    model: str | None = None
    limit: int | None = None  # the newest this many


def records(q: RecordQuery) -> list[dict[str, Any]]:
    """The records in the folder, oldest first, each with its JSON fields and `png` (its path)."""
    if not q.folder.is_dir():
        raise FileNotFoundError(
            f"no record folder {q.folder}: pass the server's NOTSURE_RECORD_DIR with --dir"
        )
    out = list(_read(q))
    return out[-q.limit :] if q.limit else out


def _read(q: RecordQuery) -> Iterator[dict[str, Any]]:
    for path in sorted(q.folder.glob("*.json")):
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):  # deleted by rotation while listing
            continue
        if q.model and meta.get("model") != q.model:
            continue
        png = path.with_suffix(".png")
        if png.exists():
            yield {**meta, "png": str(png)}


def export(q: RecordQuery, out: Path) -> int:
    """Copy the records' images to `out` with records.jsonl (every field) and labels.csv (one
    row per image with an empty `true_label` column for whoever labels them); the count."""
    found = records(q)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "records.jsonl").open("w") as jl, (out / "labels.csv").open("w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["image", "model", "version", "request_id", "score_name", "score",
                       "threshold", "predicted_label", "true_label"])  # fmt: skip
        for r in found:
            image = Path(r["png"]).name
            shutil.copyfile(r["png"], out / image)
            jl.write(json.dumps({k: v for k, v in r.items() if k != "png"}) + "\n")
            rows.writerow([image, r["model"], r["version"], r["request_id"], r["score_name"],
                           r["score"], r["threshold"], r["label"], ""])  # fmt: skip
    return len(found)


DirOpt = Annotated[Path, Opt("--dir", help="the record folder (the server's NOTSURE_RECORD_DIR)")]
ModelOpt = Annotated[str | None, Opt(help="only this model's records")]


@app.command("list")
def list_cmd(
    folder: DirOpt = Path("not-sure-records"),
    model: ModelOpt = None,
    limit: Annotated[int | None, Opt(min=1, help="the newest this many")] = 50,
    as_json: Annotated[bool, Opt("--json", help="one JSON object a line")] = False,
) -> None:
    """List records, oldest first: time, model, version, request id, score and T."""
    try:
        found = records(RecordQuery(folder, model, limit))
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc), param_hint="--dir") from exc
    if as_json:
        for r in found:
            typer.echo(json.dumps(r))
        return
    table = Table("time (UTC)", "model", "v", "request id", "score", "T", "label", "image")
    for r in found:
        when = datetime.fromtimestamp(r["time_ns"] / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(when, r["model"], str(r["version"]), r["request_id"],
                      f"{r['score_name']} {r['score']:.4g}", f"{r['threshold']:.4g}",
                      str(r["label"]), Path(r["png"]).name)  # fmt: skip
    Console().print(table)
    typer.echo(f"{len(found)} record(s) in {folder}")


@app.command("export")
def export_cmd(
    out: Annotated[Path, typer.Argument(help="folder for the images, records.jsonl, labels.csv")],
    folder: DirOpt = Path("not-sure-records"),
    model: ModelOpt = None,
    limit: Annotated[int | None, Opt(min=1, help="the newest this many")] = None,
) -> None:
    """Export records for labelling: images, records.jsonl and labels.csv."""
    try:
        n = export(RecordQuery(folder, model, limit), out)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc), param_hint="--dir") from exc
    typer.echo(f"exported {n} record(s) to {out}")
