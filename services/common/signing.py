"""The signature of a webhook call, as Standard Webhooks (standardwebhooks.com) define it: the gateway signs with it
(services/core/webhooks.py), a receiver checks with it (latentd_client.verify_webhook)."""

from __future__ import annotations

import base64
import hashlib
import hmac

SIGNATURE_VERSION = "v1"
HEADER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE = "webhook-id", "webhook-timestamp", "webhook-signature"


def signing_key(secret: str) -> bytes:
    """A secret "whsec_<base64>" (Standard Webhooks' form) is the base64 of the key; any other string is the key."""
    return base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()


def signature(key: bytes, message_id: str, timestamp: int | str, body: bytes) -> str:
    """ "v1,<base64 of HMAC-SHA256(key, '<message id>.<timestamp>.<body>')>"."""
    mac = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION}," + base64.b64encode(mac).decode()
