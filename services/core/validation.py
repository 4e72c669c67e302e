"""Pydantic's validation errors in the words of services/common/rules.py: the field, its allowed range, the value.

FastAPI validates REST bodies itself (the handler in services/api/errors.py calls `refusal`); the gRPC door
parses its converted requests with `parse`. Both therefore answer a bad field with the same message."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from services.common.errors import InvalidInput
from services.core import schemas

M = TypeVar("M", bound=BaseModel)
_SCHEMAS = (
    schemas.GenerationCreate,
    schemas.TrajectoryCreate,
    schemas.OpenAIImageRequest,
    schemas.OpenAIImageEditRequest,
    schemas.JobImage,
)
_RANGE_ERRORS = ("greater_than_equal", "less_than_equal", "greater_than", "less_than")


def _bounds(field: str) -> tuple[Any, Any]:
    for model in _SCHEMAS:
        info = model.model_fields.get(field)
        if info is None:
            continue
        low = high = None
        for meta in info.metadata:
            low = getattr(meta, "ge", None) if getattr(meta, "ge", None) is not None else low
            high = getattr(meta, "le", None) if getattr(meta, "le", None) is not None else high
        return low, high
    return None, None


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def message(error: dict) -> tuple[str, str | None]:
    """(message, param) for one pydantic error."""
    loc = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    field = next((part for part in reversed(loc) if not part.isdigit()), param)
    kind = error.get("type", "")
    given = error.get("input")
    if kind in _RANGE_ERRORS:
        low, high = _bounds(field or "")
        if low is not None and high is not None:
            return f"{param} must be between {_fmt(low)} and {_fmt(high)}, got {given!r}", param
    if kind in ("string_too_long", "too_long"):
        limit = (error.get("ctx") or {}).get("max_length")
        noun = "characters" if kind == "string_too_long" else "values"
        return f"{param} must be at most {limit} {noun}, got {len(given) if given is not None else '?'}", param
    if kind == "too_short":
        limit = (error.get("ctx") or {}).get("min_length")
        return f"{param} must hold at least {limit} values", param
    if kind == "extra_forbidden":
        return f"unknown field {param!r}: this endpoint does not accept it", param
    if kind == "missing":
        return f"{param} is required", param
    if kind == "json_invalid":
        return "the body is not valid JSON: " + error.get("msg", ""), None
    if param:
        return f"{param}: {error.get('msg', 'invalid value')}, got {given!r}", param
    return error.get("msg", "invalid request"), param


def refusal(errors: list[dict]) -> InvalidInput:
    """The first error as the InvalidInput both doors answer with."""
    text, param = message(errors[0]) if errors else ("invalid request", None)
    return InvalidInput(text, param)


def parse(model: type[M], body: dict[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise refusal(error.errors()) from None
