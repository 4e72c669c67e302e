"""Pydantic's validation errors in the words of services/common/rules.py: the field, its allowed range, the value.

FastAPI validates REST bodies itself (the handler in services/api/errors.py calls `refusal`); the gRPC door
parses its converted requests with `parse`. Both therefore answer a bad field with the same message."""

from __future__ import annotations

import json
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from services.common.errors import InvalidInput, shown, unknown_field
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
_PARSING_ERRORS = {"int_parsing": "an integer", "float_parsing": "a number", "int_from_float": "an integer"}
# Fields with a pattern: what a value must look like, in words (the pattern itself tells a caller little).
_PATTERNS = {"size": "WIDTHxHEIGHT in pixels, like 512x512, or auto"}


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


def _takes(field: str | None) -> str:
    """What a field takes, in the caller's words ("an integer", "a string or an object {job_id, index}")."""
    info = next((m.model_fields[field] for m in _SCHEMAS if field in m.model_fields), None)
    if info is None:
        return "a number or a string"
    types = [t for t in typing.get_args(info.annotation) or (info.annotation,) if t is not type(None)]
    if typing.get_origin(info.annotation) is typing.Literal:
        types = [str]
    words = [
        "a list of numbers" if typing.get_origin(t) is list else _MEMBERS.get(getattr(t, "__name__", ""), "a string")
        for t in types
    ]
    return " or ".join(dict.fromkeys(words))


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _echo(value: Any) -> str:
    """A value the caller sent, as it wrote it: JSON's null, true, false, lists and objects as JSON, anything else
    as `shown` echoes it; cut at 80 characters."""
    if value is None or isinstance(value, (bool, list, dict)):
        text = json.dumps(value, default=str)
        return text if len(text) <= 80 else f"{text[:79]}… ({len(text)} characters as written)"
    return shown(value)


# pydantic names the member of a union that an error belongs to in its loc: ("image", "str") and
# ("image", "JobImage", "job_id") for `image: str | JobImage`. The caller knows no such names; they are left out.
_MEMBERS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"} | {
    model.__name__: "an object {" + ", ".join(model.model_fields) + "}" for model in _SCHEMAS
}


def _loc(error: dict) -> list[str]:
    parts = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path", "header")]
    return [part for part in parts if part not in _MEMBERS]


def _is_type_error(error: dict) -> bool:
    """The value is of another type than a union member takes (a string where an object goes, ...)."""
    return error.get("type", "").endswith("_type")


def message(error: dict, caps: Mapping[str, float] | None = None) -> tuple[str, str | None]:
    """(message, param) for one pydantic error. caps: fields whose deployment allows less than the schema's bound
    (num_images where LATENTD_MAX_NUM_IMAGES is below 16), so the range said is the one that will pass."""
    loc = _loc(error)
    param = ".".join(loc) or None
    field = next((part for part in reversed(loc) if not part.isdigit()), param)
    kind = error.get("type", "")
    given = error.get("input")
    if kind in (*_RANGE_ERRORS, "int_parsing_size"):  # int_parsing_size: an integer too long to read at all
        low, high = _bounds(field or "")
        if caps and field in caps and high is not None:
            high = min(high, caps[field])
        if low is not None and high is not None:
            return f"{param} must be between {_fmt(low)} and {_fmt(high)}, got {_echo(given)}", param
    if kind in ("string_too_long", "too_long"):
        limit = (error.get("ctx") or {}).get("max_length")
        noun = "characters" if kind == "string_too_long" else "values"
        return f"{param} must be at most {limit} {noun}, got {len(given) if given is not None else '?'}", param
    if kind == "string_too_short":
        limit = (error.get("ctx") or {}).get("min_length")
        if limit == 1:
            return f"{param} must not be empty", param
        return f"{param} must be at least {limit} characters, got {shown(given)}", param
    if kind == "too_short":
        limit = (error.get("ctx") or {}).get("min_length")
        return f"{param} must hold at least {limit} values", param
    if kind == "extra_forbidden":  # the name as the caller wrote it, cut (param too: it is echoed)
        cut = param if len(param or "") <= 80 else f"{param[:79]}… ({len(param)} characters)"
        return unknown_field(param), cut
    if given is None and _is_type_error(error) and param:  # null where the field takes no null
        return f"{param} must be {_takes(field)}, got null", param
    if kind in _PARSING_ERRORS:  # not a number (a query or path parameter), or 2.5 where an integer goes
        return f"{param} must be {_PARSING_ERRORS[kind]}, got {_echo(given)}", param
    if kind == "literal_error":  # ctx.expected: "'forward', 'reverse' or 'guidance_sweep'"
        return f"{param} must be one of {(error.get('ctx') or {}).get('expected')}, got {_echo(given)}", param
    if kind == "string_pattern_mismatch" and field in _PATTERNS:
        return f"{param} must be {_PATTERNS[field]}, got {_echo(given)}", param
    if kind == "boolean_refused":
        return f"{param} must be {_takes(field)}, got {json.dumps(given)}", param
    if kind == "missing" and param is None:
        return "the request needs a body: a JSON object (Content-Type: application/json)", None
    if kind == "missing":
        return f"{param} is required", param
    if param is None and kind in ("model_attributes_type", "dict_type"):
        # bytes: a body FastAPI did not read as JSON (another Content-Type, as fetch() gives a string body)
        got = "a body of another Content-Type" if isinstance(given, bytes) else shown(given)
        return f"the body must be a JSON object sent as Content-Type: application/json, got {got}", None
    if kind == "json_invalid":  # loc: ("body", the character where decoding stopped)
        where = error.get("loc", ("body", None))[-1]
        why = (error.get("ctx") or {}).get("error") or "it does not decode"
        return f"the body is not valid JSON: {why}" + (f" at character {where}" if isinstance(where, int) else ""), None
    if param:
        return f"{param}: {error.get('msg', 'invalid value')}, got {_echo(given)}", param
    return error.get("msg", "invalid request"), param


def refusal(errors: list[dict], caps: Mapping[str, float] | None = None) -> InvalidInput:
    """The first field's error as the InvalidInput both doors answer with. Where that field is a union (an
    image as base64 or {job_id, index}), the member the value was meant for speaks: the one whose error is not
    about the value's type; where every member refuses the type, the message lists what the field takes."""
    if not errors:
        return InvalidInput("invalid request", None)
    first = _loc(errors[0])[:1]
    same_field = [error for error in errors if _loc(error)[:1] == first]
    members = [str(part) for error in same_field for part in error.get("loc", ()) if part in _MEMBERS]
    about_value = [error for error in same_field if not _is_type_error(error)]
    if about_value:
        return InvalidInput(*message(about_value[0], caps))
    if len(members) > 1 and first:
        takes = " or ".join(_MEMBERS[member] for member in dict.fromkeys(members))
        return InvalidInput(f"{first[0]} must be {takes}, got {shown(errors[0].get('input'))}", first[0])
    return InvalidInput(*message(errors[0], caps))


def parse(model: type[M], body: dict[str, Any], caps: Mapping[str, float] | None = None) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise refusal(error.errors(), caps) from None
