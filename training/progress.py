"""A rich progress bar for long loops (training, attacks, sweeps), quiet when not on a terminal."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Bar:
    """One task of a rich Progress, with free-form stats shown after the bar."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress, self._task = progress, task

    def update(self, completed: int, **stats: float) -> None:
        text = "  ".join(f"{k} {v:.4g}" for k, v in stats.items())
        self._progress.update(self._task, completed=completed, stats=text)

    def advance(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Bar]:
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
        transient=False,
    )
    with progress:
        yield Bar(progress, progress.add_task(description, total=total, stats=""))
