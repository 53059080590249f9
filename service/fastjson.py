"""Request bodies parsed by orjson and validated by pydantic, with pydantic's own errors.

`Model.model_validate_json` parses and validates in one pass; for the bodies this service gets
(hundreds of numbers per image) orjson's parse plus validating the Python objects is about
twice as fast (a 1-image float-pixel body: 256 -> 132 us, integer pixels: 187 -> 52 us,
contended CPU). Anything either step refuses is parsed again by `model_validate_json`, so a
client sees exactly the error it always saw (and only broken requests pay twice). One
difference remains: an integer beyond 64 bits arrives as a float (orjson's reading), so a
pixel 10**30 is refused as out of range rather than as non-numeric.
"""

from __future__ import annotations

from typing import TypeVar

import orjson
from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)


def validate_json(model: type[T], body: bytes) -> T:
    """The JSON body as `model`; pydantic's ValidationError from `model_validate_json`
    otherwise."""
    try:
        obj = orjson.loads(body)
        if isinstance(obj, dict):
            return model.model_validate(obj)
    except (orjson.JSONDecodeError, ValidationError):
        pass
    return model.model_validate_json(body)
