"""The /metrics HTTP server of a process (gateway, gRPC door or worker), on a port of its own."""

from __future__ import annotations

import logging
import os
from typing import Any

from prometheus_client import start_http_server

log = logging.getLogger(__name__)

_servers: dict[int, Any] = {}


def start(port: int, addr: str = "0.0.0.0") -> int:
    """Serve /metrics on `port` (0 picks a free one) in a daemon thread; idempotent per fixed port.

    Returns the bound port. Process metrics (CPU, RSS, fds) come with the default registry.
    """
    if port and port in _servers:
        return port
    server, _thread = start_http_server(port, addr=addr)
    bound = server.server_address[1]
    _servers[bound] = server
    return bound


def serve_from_env(variable: str, default_port: int, addr: str = "0.0.0.0") -> int | None:
    """Start the server on the port in $`variable` (else `default_port`); "off" disables it.

    A port already taken is logged, not fatal: a second process on the same host (tests, a
    colocated replica) keeps serving its jobs; set a distinct port per process to scrape both.
    """
    value = os.environ.get(variable, str(default_port)).strip().lower()
    if value in ("off", "none", "-1", ""):
        return None
    try:
        return start(int(value), addr=addr)
    except OSError as error:
        log.warning("metrics server not started on port %s: %s", value, error)
        return None
