"""The threshold T in force: the manifest's, a configured override, or a request's own.

Every place that needs T asks here: the repository when a version loads, the HTTP and gRPC
routes for each request.
"""

from __future__ import annotations

from service.config import Settings
from service.errors import InvalidInput
from service.manifest import Manifest, check_threshold


def configured_threshold(settings: Settings, name: str, version: int, manifest: Manifest) -> float:
    """The T a version serves with: the `thresholds` setting for "name/version", else for
    "name", else the manifest's. ValueError when it is out of the score's range."""
    overrides = settings.thresholds
    t = overrides.get(f"{name}/{version}", overrides.get(name, manifest.threshold))
    check_threshold(manifest.score, t)
    return t


def threshold_in_force(
    settings: Settings, score: str, configured: float, requested: object, field: str = "threshold"
) -> float:
    """The T for one request to a model thresholded on `score` at `configured`: the request's
    own (`requested`, from the body field `field`) where the server allows that."""
    if requested is None:
        return configured
    if isinstance(requested, bool) or not isinstance(requested, int | float):
        raise InvalidInput("threshold must be a number", field=field)
    if not settings.allow_request_threshold:
        raise InvalidInput(
            "this server does not accept a per-request threshold",
            field="threshold",
            fix="omit it (the server applies its configured T)",
        )
    try:
        check_threshold(score, requested)
    except ValueError as exc:
        raise InvalidInput(str(exc), field="threshold") from exc
    return requested  # as sent (an int stays one in the answer)
