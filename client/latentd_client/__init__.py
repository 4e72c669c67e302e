"""Python client of latentd: sync and asyncio, over REST (http://) or gRPC (grpc://), one interface."""

from .client import AsyncClient, Client
from .errors import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    JobFailedError,
    LatentdError,
    NotFoundError,
    RateLimitError,
    StreamDropped,
    UnavailableError,
    WebhookVerificationError,
)
from .types import Artifact, Job, JobEvent, JobPage, Model
from .webhooks import verify_webhook

__all__ = [
    "Client",
    "AsyncClient",
    "Job",
    "JobEvent",
    "JobPage",
    "Model",
    "Artifact",
    "LatentdError",
    "AuthenticationError",
    "NotFoundError",
    "ConflictError",
    "InvalidRequestError",
    "RateLimitError",
    "UnavailableError",
    "StreamDropped",
    "JobFailedError",
    "WebhookVerificationError",
    "verify_webhook",
]
