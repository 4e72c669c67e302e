"""The gateway's outermost layer, plain ASGI (no per-request task group): the body limit and request metrics.

The body limit holds however the body comes. A declared Content-Length over the limit is refused before a
byte is read; a chunked body (no Content-Length), or one longer than it declared, is counted as it arrives and
refused the moment it passes the limit: the handler reading it gets `BodyTooLarge` (an HTTPException, which
FastAPI passes on untouched), and the client gets 413 in the API's error shape. Nothing past the limit is read
or kept, so a client streaming gigabytes costs at most `max_body_bytes` of memory while it is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterable

from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api import metrics
from services.common.errors import PayloadTooLarge
from services.core import metrics as core_metrics

SMALL_BODY = 64 * 1024  # bodies up to this size are read without asking the budget
LINGER_S = 2.0  # after a 413: how long what the client still sends is read and dropped (nothing kept)
EVENTS_SUFFIX = "/events"  # GET /v1/jobs/{id}/events, the one response that streams until its job ends


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int, declared: int | None = None):
        what = f"request body is {declared} bytes" if declared is not None else "request body is over the limit"
        super().__init__(413, f"{what}; the limit is {limit} bytes", headers={"Connection": "close"})


def _route_template(scope: Scope, routed: bool) -> str:
    """The template of the route the request went to (the metrics' `route` label). A request refused before
    routing (a declared Content-Length over the limit) never reached the router: it is matched here as the
    router matches it (a full match, else the first partial one: a 405), so its 413 counts under its route."""
    route = scope.get("route") if routed else _match(scope)
    return getattr(route, "path", "unmatched")


def _match(scope: Scope) -> BaseRoute | None:
    app = scope.get("app")
    return _match_in(getattr(getattr(app, "router", None), "routes", ()), scope)


def _match_in(routes: Iterable[BaseRoute], scope: Scope) -> BaseRoute | None:
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.NONE:
            continue
        nested = getattr(route, "original_router", None)  # FastAPI keeps an included router whole, as one route
        found = _match_in(nested.routes, scope) if nested is not None else route
        if match is Match.FULL:
            return found
        partial = partial or found
    return partial


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class BodyBudget:
    """The bytes of request bodies one process may hold at once. A body past `SMALL_BODY` reserves what it may
    grow to (its Content-Length, else the whole limit) before more of it is read; when the budget is spent it
    waits, unread (the server stops reading its socket), so twenty huge uploads at once cost the budget, not
    twenty times the limit. A body that cannot get its share within `wait_s` is refused with 503."""

    def __init__(self, total: int, wait_s: float):
        self.total, self.free, self.wait_s = total, total, wait_s
        self._condition: asyncio.Condition | None = None

    @property
    def condition(self) -> asyncio.Condition:
        if self._condition is None:
            self._condition = asyncio.Condition()
        return self._condition

    async def take(self, size: int) -> int:
        size = min(size, self.total)
        async with self.condition:
            try:
                async with asyncio.timeout(self.wait_s):  # not wait_for: on 3.11 it can drop a client's cancel
                    await self.condition.wait_for(lambda: self.free >= size)
            except TimeoutError:
                raise HTTPException(
                    503,
                    f"too many large request bodies arrive at once (over {self.total} bytes); retry",
                    headers={"Retry-After": "1", "Connection": "close"},
                ) from None
            self.free -= size
        return size

    async def give(self, size: int) -> None:
        async with self.condition:
            self.free += size
            self.condition.notify_all()


class Edge:
    def __init__(self, app: ASGIApp, max_body_bytes: int, max_body_buffer_bytes: int = 0, body_wait_s: float = 30.0):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.budget = BodyBudget(max_body_buffer_bytes or 4 * max_body_bytes, body_wait_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method = scope["method"]
        # HEAD wherever GET is served (RFC 9110): the GET's status and headers, no body. Not the event stream,
        # whose GET never ends: a HEAD of it is a 405 that says GET.
        head = method == "HEAD" and not scope["path"].endswith(EVENTS_SUFFIX)
        if head:
            scope = dict(scope, method="GET")
        limit = self.max_body_bytes
        status = 500
        response_started = too_large = False
        routed = True  # false for a request refused before it reaches the router

        async def observed_send(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
            if too_large and message["type"] == "http.response.body" and not message.get("more_body", False):
                await send(message | {"more_body": True})  # the 413 goes out now; the connection closes after
                await self._linger(receive)
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            if head and message["type"] == "http.response.body":
                message = message | {"body": b""}
            await send(message)

        declared = _declared_length(scope)
        received = reserved = 0
        try:
            if declared is not None and declared > limit:
                too_large, routed = True, False
                raise BodyTooLarge(limit, declared)

            async def limited_receive() -> Message:
                nonlocal received, reserved, too_large
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        too_large = True
                        raise BodyTooLarge(limit)
                    if not reserved and received > SMALL_BODY and message.get("more_body", False):
                        reserved = await self.budget.take(declared if declared is not None else limit)
                return message

            await self.app(scope, limited_receive, observed_send)
        except BodyTooLarge as error:  # raised outside FastAPI's handlers (they answer it themselves)
            if response_started:
                raise
            await self._refuse(observed_send, error)
        finally:
            if reserved:
                await self.budget.give(reserved)
            if status == 413:
                core_metrics.record_rejection("payload_too_large")
            metrics.observe_http_request(_route_template(scope, routed), method, status, time.perf_counter() - started)

    async def _linger(self, receive: Receive) -> None:
        """Read and drop what the client is still sending, for a moment, before the connection closes: closed
        with unread bytes, the socket would be reset, and a reset can destroy the 413 in the client's buffer
        before it reads it (a server's lingering close), and a client that reads only once it has sent its
        body would never see it. Bounded in time; each chunk is dropped as it comes, so nothing is kept."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER_S):
                while True:
                    message = await receive()
                    if message["type"] != "http.request" or not message.get("more_body", False):
                        return

    @staticmethod
    async def _refuse(send: Send, error: BodyTooLarge) -> None:
        body = json.dumps(PayloadTooLarge(error.detail).body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers.append((b"connection", b"close"))  # the rest of the body is never read
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
