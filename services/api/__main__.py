"""python -m services.api: serve the gateway with uvicorn; with no API keys configured, loopback only."""

from __future__ import annotations

import argparse
import ipaddress
import sys

import uvicorn

from services.common.settings import get_settings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    args = parser.parse_args(argv)
    if not settings.key_hashes() and not is_loopback(args.host):
        print(
            f"refusing to bind to {args.host}: no API keys are configured (set LATENTD_API_KEY_HASHES), "
            "so the gateway serves open on loopback only",
            file=sys.stderr,
        )
        return 2
    from services.api.app import create_app

    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning", timeout_keep_alive=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
