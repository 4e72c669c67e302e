"""Errors that cross an edge. Each carries the error shape of docs/api.md, `{"error": {"type", "message", "param"}}`,
and maps to one HTTP status (here) and one gRPC status code (services/api/grpc_server.py)."""

from __future__ import annotations


def shown(value: object, limit: int = 80) -> str:
    """A caller's value as an error message echoes it: repr, cut to `limit` characters with its length said, so an
    echo never outgrows what a door can carry (gRPC's status details travel in a header of at most 16 KiB)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, (str, bytes)) else f"{len(text)} characters as written"
    return f"{text[: limit - 1]}… ({size})"


def unknown_field(name: str) -> str:
    """The refusal of a request field the endpoint has none of (REST's body, the gRPC client's request)."""
    return f"unknown field {shown(name)}: this endpoint does not accept it"


class ServiceError(Exception):
    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, *, retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return {"error": {"type": self.error_type, "message": self.message, "param": self.param}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after_s)))} if self.retry_after_s else {}


class InvalidInput(ServiceError):
    status_code = 422
    error_type = "invalid_request_error"


class Unauthorized(ServiceError):
    status_code = 401
    error_type = "authentication_error"


class NotFound(ServiceError):
    status_code = 404
    error_type = "not_found_error"


class Conflict(ServiceError):
    status_code = 409
    error_type = "conflict_error"


class PayloadTooLarge(ServiceError):
    status_code = 413
    error_type = "payload_too_large"


class RateLimited(ServiceError):
    status_code = 429
    error_type = "rate_limit_error"


class Unavailable(ServiceError):
    status_code = 503
    error_type = "service_unavailable"


class JobFailed(ServiceError):
    """A synchronous call (the OpenAI route) waited for a job that failed in its worker (not for its request)."""

    status_code = 500
    error_type = "server_error"


class InternalError(ServiceError):
    """A bug: answered without a traceback, logged where it happened."""

    status_code = 500
    error_type = "internal_error"
