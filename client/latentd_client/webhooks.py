"""Receiving latentd's webhooks: check that a call came from the deployment (its webhook secret) and is fresh."""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

from services.common.signing import HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, signature, signing_key

from .errors import WebhookVerificationError

DEFAULT_TOLERANCE_S = 300.0


def verify_webhook(
    secret: str,
    headers: Mapping[str, str],
    body: bytes | str,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> dict[str, Any]:
    """The call's payload ({"type": "job.succeeded", "timestamp", "data": the job}) once its webhook-signature
    matches `body` (the raw bytes received, before any JSON parsing) under `secret` (the deployment's
    LATENTD_WEBHOOK_SECRET) and its webhook-timestamp is within `tolerance_s` of now; WebhookVerificationError
    otherwise. The same job may be delivered more than once: its webhook-id says which call it is."""
    lower = {name.lower(): value for name, value in headers.items()}
    missing = [name for name in (HEADER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE) if not lower.get(name)]
    if missing:
        raise WebhookVerificationError(f"the call lacks the {', '.join(missing)} header(s)")
    body = body.encode() if isinstance(body, str) else bytes(body)
    try:
        timestamp = int(lower[HEADER_TIMESTAMP])
    except ValueError:
        raise WebhookVerificationError(f"{HEADER_TIMESTAMP} is not a whole number of seconds") from None
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_s:
        raise WebhookVerificationError(
            f"{HEADER_TIMESTAMP} is {abs(now - timestamp):.0f} s from now, more than the {tolerance_s:g} s allowed"
        )
    expected = signature(signing_key(secret), lower[HEADER_ID], timestamp, body).encode()
    # several signatures, space-separated, while a secret is being rotated: one that matches is enough (compared as
    # bytes: a header of other characters is a mismatch, not a TypeError)
    given = lower[HEADER_SIGNATURE].encode("utf-8", "replace").split()
    if not any(hmac.compare_digest(expected, one) for one in given):
        raise WebhookVerificationError("the webhook-signature does not match the body under this secret")
    return json.loads(body)
