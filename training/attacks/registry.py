"""Attacks by name (timm's model registry, for attacks): each attack module registers its
functions here when `training.attacks` is imported, and a config names the one it runs.

Two families, each with one call signature:
- "adaptive": `fn(threat, x, y, cfg: AdaptiveConfig, generator) -> Result`, attacks that know
  the score and the served T (the audit's);
- "classic": `fn(net, objective, x, target, cfg: AttackConfig, generator) -> adversarial x`,
  the paper's attacks on a cost J (the validator's and the reproductions').
`generator` seeds the random starts of the attacks that draw one; the others ignore it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar

Family = Literal["adaptive", "classic"]
F = TypeVar("F", bound=Callable[..., Any])

_REGISTRY: dict[Family, dict[str, Callable[..., Any]]] = {"adaptive": {}, "classic": {}}


def register(family: Family, *attack_names: str) -> Callable[[F], F]:
    """Decorator: file `fn` under each of `attack_names` in `family`."""

    def add(fn: F) -> F:
        for name in attack_names:
            if name in _REGISTRY[family]:
                raise ValueError(f"{family} attack {name!r} is registered twice")
            _REGISTRY[family][name] = fn
        return fn

    return add


def names(family: Family) -> tuple[str, ...]:
    """The registered attacks of a family, in registration order."""
    return tuple(_REGISTRY[family])


def get(family: Family, name: str) -> Callable[..., Any]:
    """The function registered under `name`; the error lists the names there are."""
    try:
        return _REGISTRY[family][name]
    except KeyError:
        raise ValueError(
            f"no {family} attack {name!r}; registered: {', '.join(names(family))}"
        ) from None
