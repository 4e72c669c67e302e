"""Map every error to the API's error shape {"error": {"type", "message", "param"}} at the HTTP edge."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.api import metrics
from services.common import schemas
from services.common.errors import ServiceError

log = logging.getLogger(__name__)
_SCHEMAS = (schemas.GenerationCreate, schemas.TrajectoryCreate, schemas.OpenAIImageRequest)


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


def validation_message(error: dict) -> tuple[str, str | None]:
    loc = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    field = next((part for part in reversed(loc) if not part.isdigit()), param)
    kind = error.get("type", "")
    given = error.get("input")
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        low, high = _bounds(field or "")
        if low is not None and high is not None:
            return f"{param} must be between {_fmt(low)} and {_fmt(high)}, got {given!r}", param
    if kind == "extra_forbidden":
        return f"unknown field {param!r}: this endpoint does not accept it", param
    if kind == "missing":
        return f"{param} is required", param
    if kind == "json_invalid":
        return "the body is not valid JSON: " + error.get("msg", ""), None
    return f"{param}: {error.get('msg', 'invalid value')}, got {given!r}" if param else error.get(
        "msg", "invalid"
    ), param


def error_response(
    status: int, error_type: str, message: str, param: str | None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": error_type, "message": message, "param": param}}, status_code=status, headers=headers
    )


# Refusals counted in latentd_rejections_total here, by status; the others are counted where they happen
# (payload_too_large in the body-size middleware, queue_full and no_worker at submission).
_REJECTION_REASONS = {422: "validation", 401: "auth"}


def _count_rejection(status: int) -> None:
    if status in _REJECTION_REASONS:
        metrics.record_rejection(_REJECTION_REASONS[status])


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError) -> JSONResponse:
        _count_rejection(exc.status_code)
        return error_response(exc.status_code, exc.error_type, exc.message, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        message, param = validation_message(errors[0]) if errors else ("invalid request", None)
        _count_rejection(422)
        return error_response(422, "invalid_request_error", message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found_error", 405: "invalid_request_error", 401: "authentication_error"}
        _count_rejection(exc.status_code)
        return error_response(
            exc.status_code,
            kinds.get(exc.status_code, "invalid_request_error"),
            str(exc.detail),
            None,
            getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, "internal_error", f"internal error: {type(exc).__name__}", None)
