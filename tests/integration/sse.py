"""A small Server-Sent Events reader for the tests (what a browser's EventSource does)."""

from __future__ import annotations

import json

import httpx


def read_events(
    url: str, headers: dict, *, last_event_id: str | None = None, timeout: float = 60.0, stop_after: int | None = None
) -> list[dict]:
    headers = dict(headers)
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    events, current = [], {}
    with httpx.stream("GET", url, headers=headers, timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if "event" in current:
                    current["data"] = json.loads(current.get("data", "null"))
                    events.append(current)
                    if stop_after is not None and len(events) >= stop_after:
                        return events
                current = {}
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            current[name] = value
    return events
