"""python -m services.api: serve the gateway with uvicorn; with no API keys configured, loopback only."""

from __future__ import annotations

import argparse
import ipaddress
import sys

import uvicorn

from services.common.settings import Settings, get_settings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_bind_refusal(settings: Settings, host: str, what: str = "the gateway") -> str | None:
    """Why `host` may not be bound (no API keys, not loopback), in the words the README uses; None if it may."""
    if settings.key_hashes() or is_loopback(host):
        return None
    return (
        f"refusing to bind to {host}: no API keys are configured (set LATENTD_API_KEYS to comma-separated keys, "
        f"or LATENTD_API_KEY_HASHES to their SHA-256 hex digests), so {what} serves open on loopback only"
    )


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    args = parser.parse_args(argv)
    refusal = open_bind_refusal(settings, args.host)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    from services.api.app import create_app

    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning", timeout_keep_alive=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
