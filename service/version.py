"""The service's version: the installed distribution's, as pyproject.toml states it.

Read with importlib.metadata so the service depends on no other package of this repository (the
CLI package, say) for it. A bare checkout that was never installed reports "0+unknown" rather
than failing to start.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "notsure"


@lru_cache(maxsize=1)
def service_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "0+unknown"
