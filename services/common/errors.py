"""Errors that cross the edge: each maps to one HTTP status and the error shape of docs/api.md."""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, *, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"type": self.error_type, "message": self.message, "param": self.param}}


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


class QueueFull(ServiceError):
    status_code = 429
    error_type = "rate_limit_error"


class Unavailable(ServiceError):
    status_code = 503
    error_type = "service_unavailable"
