"""Map every error to the API's error shape {"error": {"type", "message", "param"}} at the HTTP edge."""

from __future__ import annotations

import logging

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.errors import InvalidInput, ServiceError, shown
from services.core import metrics as core_metrics
from services.core.core import translate_redis_errors
from services.core.schemas import ErrorResponse
from services.core.validation import refusal

log = logging.getLogger(__name__)
_HTTP_TYPES = {
    404: "not_found_error",
    405: "invalid_request_error",
    401: "authentication_error",
    413: "payload_too_large",  # services/api/edge.py's body limit
    503: "service_unavailable",  # and its budget of bodies in memory
}


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again.", "schema": {"type": "integer"}}}
_DOCUMENTED = {
    401: "The API key is missing or wrong (`Authorization: Bearer <key>`).",
    404: "No such job, model or artifact for this API key.",
    409: "The Idempotency-Key was used with another body, or the job has already ended.",
    413: "The body is over LATENTD_MAX_BODY_BYTES (chunked or not).",
    422: "A field is out of range or malformed: `message` names it and the allowed range, `param` its path.",
    429: "The model's queue, or this API key's share of it, is full; retry after Retry-After.",
    503: "Redis unreachable or full, the gateway overloaded, no model published yet, or a synchronous OpenAI call "
    "past LATENTD_OPENAI_TIMEOUT_S (its job cancelled); retry after Retry-After.",
    500: "The job this synchronous call waited for failed in its worker (server_error; a job cancelled meanwhile is a "
    "409, one whose request the worker refused a 422); never a traceback.",
}


def undecodable_body(cause: BaseException) -> str:
    """Why a body could not be read as JSON, in the caller's words (never Python's)."""
    if isinstance(cause, UnicodeDecodeError):
        return (
            "the body is not valid JSON: it is not UTF-8 text (a compressed body, Content-Encoding gzip or the like, "
            "is not accepted)"
        )
    if isinstance(cause, RecursionError):
        return "the body is not valid JSON this server reads: its arrays or objects nest too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "the body is not valid JSON this server reads: it holds a number of more than 4300 digits"
    return f"the body is not valid JSON ({type(cause).__name__})"


def documented(*codes: int) -> dict[int | str, dict]:
    """OpenAPI `responses` for these error statuses, each with the one error shape (ErrorResponse)."""
    return {
        code: {"model": ErrorResponse, "description": _DOCUMENTED[code]}
        | ({"headers": _RETRY_AFTER} if code in (429, 503) else {})
        for code in codes
    }


# The routes that submit a job: a refusal of theirs before the job is queued is a rejection (core metrics).
SUBMISSION_ROUTES = frozenset({"/v1/generations", "/v1/trajectories", "/v1/images/generations", "/v1/images/edits"})
# How a client authenticates (Core.authenticate reads `Authorization: Bearer <key>`), as a 401 must say (RFC 9110)
AUTH_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def mark_queued(request: Request) -> None:
    """The request's job is queued: what fails after this (the OpenAI route's wait) refuses no job."""
    request.state.job_queued = True


def _submitting(request: Request | None) -> bool:
    """Whether the request was refused a new job: a submit route, with no job queued by it yet."""
    if request is None:
        return False
    route = getattr(request.scope.get("route"), "path", None)
    return route in SUBMISSION_ROUTES and not getattr(request.state, "job_queued", False)


def error_response(error: ServiceError, request: Request | None = None) -> JSONResponse:
    core_metrics.record_refusal(error, submission=_submitting(request))
    headers = error.headers() | (AUTH_CHALLENGE if error.status_code == 401 else {})
    return JSONResponse(error.body(), status_code=error.status_code, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(refusal(list(exc.errors()), request.app.state.core.caps))

    @app.exception_handler(redis.exceptions.RedisError)
    async def _redis(request: Request, exc: redis.exceptions.RedisError) -> JSONResponse:
        return error_response(translate_redis_errors(exc, request.app.state.core.settings.retry_after_s), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's 400 for a body it could not decode (not UTF-8, ...): invalid JSON is a 422 everywhere
            # else, and the caller is told why
            return error_response(InvalidInput(undecodable_body(exc.__cause__), None), request)
        core_metrics.record_refusal(exc.status_code)
        message = str(exc.detail)
        path = shown(request.url.path)
        if exc.status_code == 404 and message == "Not Found":  # the router's own: no route matched
            message = f"no endpoint {request.method} {path}: the endpoints are listed at /docs"
            if request.url.path.endswith("/") and request.url.path != "/":  # no redirect: its Location would be
                message += f" (without the trailing slash: {shown(request.url.path.rstrip('/'))})"  # the Host's
        elif exc.status_code == 405 and message == "Method Not Allowed":
            allowed = (getattr(exc, "headers", None) or {}).get("Allow", "other methods")
            message = f"{path} takes {allowed}, not {request.method}: the endpoints are listed at /docs"
        body = {
            "error": {
                "type": _HTTP_TYPES.get(exc.status_code, "invalid_request_error"),
                "message": message,
                "param": None,
            }
        }
        headers = (getattr(exc, "headers", None) or {}) | (AUTH_CHALLENGE if exc.status_code == 401 else {})
        return JSONResponse(body, status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        body = {"error": {"type": "internal_error", "message": f"internal error: {type(exc).__name__}", "param": None}}
        return JSONResponse(body, status_code=500)
