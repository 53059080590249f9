"""What every command does with its options: each defaults to None, and only the options given
replace fields of the command's config dataclass (`replace(Cfg(), **given(...))`), so the
defaults live in one place: the dataclasses."""

from __future__ import annotations

from typing import Any

import typer


def given(**values: Any) -> dict[str, Any]:
    """The options the user set (None means: keep the dataclass default)."""
    return {k: v for k, v in values.items() if v is not None}


def split(values: list[str] | None) -> tuple[str, ...] | None:
    """Repeated options and comma-separated lists: ['a,b', 'c'] -> ('a', 'b', 'c'); None when
    none is given."""
    items = tuple(v.strip() for item in values or [] for v in item.split(",") if v.strip())
    return items or None


def floats(given: list[float] | None, extra: list[str], flag: str) -> tuple[float, ...] | None:
    """`--eps 0.05 0.1 0.2`: click takes the first value, the rest arrive as extra arguments."""
    values = list(given or [])
    for arg in extra:
        try:
            values.append(float(arg))
        except ValueError:
            raise typer.BadParameter(
                f"unexpected argument {arg!r}; only numbers may follow {flag}", param_hint=flag
            ) from None
    return tuple(values) if values else None
