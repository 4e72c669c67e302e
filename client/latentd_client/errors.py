"""Typed errors carrying the server's message; one class per REST status / gRPC code."""

from __future__ import annotations


class LatentdError(Exception):
    """Base: `message` is the server's, `type` and `param` as in the REST error body."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.type, self.param = message, status, type, param
        self.retry_after = retry_after


class AuthenticationError(LatentdError):
    """401 / UNAUTHENTICATED: missing or unknown API key."""


class NotFoundError(LatentdError):
    """404 / NOT_FOUND: no such job (or a job of another key), image or model."""


class ConflictError(LatentdError):
    """409 / FAILED_PRECONDITION: e.g. cancelling a finished job."""


class InvalidRequestError(LatentdError):
    """413, 422 / INVALID_ARGUMENT: `param` names the field."""


class RateLimitError(LatentdError):
    """429 / RESOURCE_EXHAUSTED: quota or queue full; `retry_after` in seconds when known."""


class UnavailableError(LatentdError):
    """503 / UNAVAILABLE: Redis or the model's workers are away, Redis is full, or the server is unreachable."""


class JobFailedError(LatentdError):
    """wait(): the job ended `failed` or `cancelled`; `job` is the final record."""

    def __init__(self, message: str, job, **kw):
        super().__init__(message, **kw)
        self.job = job


_BY_STATUS = {
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: InvalidRequestError,
    422: InvalidRequestError,
    400: InvalidRequestError,
    429: RateLimitError,
    503: UnavailableError,
}


def error_for_status(status: int, message: str, **kw) -> LatentdError:
    return _BY_STATUS.get(status, LatentdError)(message, status=status, **kw)


class StreamDropped(UnavailableError):
    """An event stream broke (connection lost, server restarting, Redis away): `Client.events` resumes it
    from the last event id it saw. Raised to callers only once reconnecting has failed too often."""


class WebhookVerificationError(LatentdError):
    """A webhook call whose signature does not match, whose timestamp is too far from now, or that lacks the
    headers (verify_webhook): answer it with a 4xx and do not act on it."""
