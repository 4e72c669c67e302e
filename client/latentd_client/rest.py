"""REST transport (httpx): the JSON contract of docs/api.md, SSE parsing, error mapping."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote

import httpx

from .errors import LatentdError, StreamDropped, UnavailableError, error_for_status
from .types import Job, JobEvent, JobPage, Model

USER_AGENT = "latentd-client/0.2"


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"user-agent": USER_AGENT}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return headers


def _submit(body: dict[str, Any], idempotency_key: str | None) -> dict[str, Any]:
    """A submit's body and headers. A retry with the same Idempotency-Key and body returns the first job (200),
    never a second one. The JSON is written here, not by httpx, which refuses NaN and infinity before sending: the
    server refuses them naming the field and its range, as the gRPC transport does."""
    headers = {"content-type": "application/json"} | ({"idempotency-key": idempotency_key} if idempotency_key else {})
    return {"content": json.dumps(body).encode(), "headers": headers}


def _page(limit: int | None, starting_after: str | None, status: list[str]) -> dict[str, Any]:
    """GET /v1/jobs's query: only what was asked for (the server's defaults otherwise)."""
    query: dict[str, Any] = {"status": status} if status else {}
    if limit is not None:
        query["limit"] = limit
    if starting_after:
        query["starting_after"] = starting_after
    return query


def _job_path(job_id: str, *rest: str) -> str:
    """/v1/jobs/<id>[/...] with the id as one path segment whatever it holds ("../models" is a job id that
    does not exist, not another endpoint; dots too, which a URL would otherwise resolve)."""
    return "/".join(("/v1/jobs", quote(job_id, safe="").replace(".", "%2E"), *rest))


def raise_for_response(response: httpx.Response) -> None:
    if response.status_code < 300:
        return
    if response.status_code < 400:  # the API never redirects a client; a proxy or a wrong URL did
        where = response.headers.get("location", "nowhere")
        raise LatentdError(f"unexpected {response.status_code} redirect to {where}", status=response.status_code)
    message, type_, param = response.text or response.reason_phrase, None, None
    try:
        body = response.json()
        err = body.get("error", body) if isinstance(body, dict) else {}
        if isinstance(err, dict):
            message = err.get("message") or err.get("detail") or message
            type_, param = err.get("type"), err.get("param")
    except ValueError:
        pass
    retry = response.headers.get("retry-after")
    raise error_for_status(
        response.status_code,
        str(message),
        type=type_,
        param=param,
        retry_after=float(retry) if retry and retry.replace(".", "", 1).isdigit() else None,
    )


class SseParser:
    """Incremental text/event-stream parser (WHATWG): feed lines, get events at blank lines."""

    def __init__(self) -> None:
        self.event_id, self.name, self.data = "", "", []

    def feed(self, line: str) -> JobEvent | None:
        if line == "":
            if not self.data and not self.name:
                return None
            event = JobEvent.from_sse(self.event_id, self.name, "\n".join(self.data))
            self.name, self.data = "", []
            if event.type == "error":  # the server cannot go on with this stream: resume from the last id
                raise StreamDropped(event.data.get("message") or "the server ended the stream")
            return event
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "id":
            self.event_id = value
        elif field == "event":
            self.name = value
        elif field == "data":
            self.data.append(value)
        return None


def _event_headers(after: str | None) -> dict[str, str]:
    return {"accept": "text/event-stream"} | ({"last-event-id": after} if after else {})


def _models(body: Any) -> list[Model]:
    return [Model.from_dict(m) for m in body.get("models", body.get("data", []))]


class RestTransport:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=_headers(api_key), timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise UnavailableError(f"cannot reach {self.url}: {exc}") from exc
        raise_for_response(response)
        return response

    def submit_generation(self, body: dict[str, Any], idempotency_key: str | None = None) -> Job:
        return Job.from_dict(self._call("POST", "/v1/generations", **_submit(body, idempotency_key)).json())

    def submit_trajectory(self, body: dict[str, Any], idempotency_key: str | None = None) -> Job:
        return Job.from_dict(self._call("POST", "/v1/trajectories", **_submit(body, idempotency_key)).json())

    def get_job(self, job_id: str) -> Job:
        return Job.from_dict(self._call("GET", _job_path(job_id)).json())

    def list_jobs(self, limit: int | None, starting_after: str | None, status: list[str]) -> JobPage:
        return JobPage.from_dict(self._call("GET", "/v1/jobs", params=_page(limit, starting_after, status)).json())

    def cancel_job(self, job_id: str) -> Job:
        return Job.from_dict(self._call("POST", _job_path(job_id, "cancel")).json())

    def artifact(self, job_id: str, kind: str, index: int) -> tuple[bytes, str]:
        response = self._call("GET", _job_path(job_id, f"{kind}s", str(index)))
        return response.content, response.headers.get("content-type", "image/png")

    def models(self) -> list[Model]:
        return _models(self._call("GET", "/v1/models").json())

    def events(self, job_id: str, after: str | None = None) -> Iterator[JobEvent]:
        """One SSE connection; StreamDropped when it breaks (the client resumes)."""
        timeout = httpx.Timeout(self.http.timeout.connect, read=None)
        try:
            with self.http.stream(
                "GET", _job_path(job_id, "events"), headers=_event_headers(after), timeout=timeout
            ) as response:
                if response.status_code >= 300:
                    response.read()
                    raise_for_response(response)
                parser = SseParser()
                for line in response.iter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            raise StreamDropped(str(exc)) from exc


class AsyncRestTransport:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.url, headers=_headers(api_key), timeout=timeout)

    async def close(self) -> None:
        await self.http.aclose()

    async def _call(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            response = await self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise UnavailableError(f"cannot reach {self.url}: {exc}") from exc
        raise_for_response(response)
        return response

    async def submit_generation(self, body: dict[str, Any], idempotency_key: str | None = None) -> Job:
        response = await self._call("POST", "/v1/generations", **_submit(body, idempotency_key))
        return Job.from_dict(response.json())

    async def submit_trajectory(self, body: dict[str, Any], idempotency_key: str | None = None) -> Job:
        response = await self._call("POST", "/v1/trajectories", **_submit(body, idempotency_key))
        return Job.from_dict(response.json())

    async def get_job(self, job_id: str) -> Job:
        return Job.from_dict((await self._call("GET", _job_path(job_id))).json())

    async def list_jobs(self, limit: int | None, starting_after: str | None, status: list[str]) -> JobPage:
        response = await self._call("GET", "/v1/jobs", params=_page(limit, starting_after, status))
        return JobPage.from_dict(response.json())

    async def cancel_job(self, job_id: str) -> Job:
        return Job.from_dict((await self._call("POST", _job_path(job_id, "cancel"))).json())

    async def artifact(self, job_id: str, kind: str, index: int) -> tuple[bytes, str]:
        response = await self._call("GET", _job_path(job_id, f"{kind}s", str(index)))
        return response.content, response.headers.get("content-type", "image/png")

    async def models(self) -> list[Model]:
        return _models((await self._call("GET", "/v1/models")).json())

    async def events(self, job_id: str, after: str | None = None) -> AsyncIterator[JobEvent]:
        timeout = httpx.Timeout(self.http.timeout.connect, read=None)
        try:
            async with self.http.stream(
                "GET", _job_path(job_id, "events"), headers=_event_headers(after), timeout=timeout
            ) as response:
                if response.status_code >= 300:
                    await response.aread()
                    raise_for_response(response)
                parser = SseParser()
                async for line in response.aiter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            raise StreamDropped(str(exc)) from exc
