"""Typed results. Parsed defensively from the REST job record so new server fields do not break
old clients; `raw` keeps the whole record."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
TERMINAL_EVENTS = TERMINAL_STATUSES


@dataclass(frozen=True)
class Artifact:
    index: int
    url: str
    media_type: str = "image/png"
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    id: str
    kind: str  # generation | trajectory
    status: str  # queued | running | succeeded | failed | cancelled
    model: str
    params: dict[str, Any]
    step: int
    total_steps: int
    created_at: float | None
    started_at: float | None
    finished_at: float | None
    images: list[Artifact]
    frames: list[Artifact]
    error: dict[str, Any] | None
    raw: dict[str, Any]

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def seed(self) -> int | None:
        return self.params.get("seed")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        params = d.get("params") or {}
        progress = d.get("progress") or {}
        timings = d.get("timings") or {}
        job_id = str(d.get("id") or d.get("job_id") or "")

        def artifacts(items, what: str) -> list[Artifact]:
            out = []
            for i, item in enumerate(items or []):
                if isinstance(item, str):
                    out.append(Artifact(i, item))
                else:
                    meta = {k: v for k, v in item.items() if k not in ("index", "url", "media_type", "content_type")}
                    out.append(
                        Artifact(
                            int(item.get("index", i)),
                            item.get("url") or f"/v1/jobs/{job_id}/{what}/{item.get('index', i)}",
                            item.get("media_type") or item.get("content_type") or "image/png",
                            meta,
                        )
                    )
            return out

        def when(name: str) -> float | None:
            value = d.get(name, timings.get(name))
            return float(value) if isinstance(value, (int, float)) else None

        return cls(
            id=job_id,
            kind=str(d.get("kind") or d.get("type") or "generation"),
            status=str(d.get("status", "")),
            model=str(d.get("model") or params.get("model") or ""),
            params=params,
            step=int(progress.get("step", d.get("step", 0)) or 0),
            total_steps=int(progress.get("total", d.get("total_steps", params.get("num_inference_steps", 0))) or 0),
            created_at=when("created_at"),
            started_at=when("started_at"),
            finished_at=when("finished_at"),
            images=artifacts(d.get("images"), "images"),
            frames=artifacts(d.get("frames"), "frames"),
            error=d.get("error") or None,
            raw=d,
        )


@dataclass(frozen=True)
class JobEvent:
    id: str  # the stream entry id (SSE `id:`); resume after it
    type: str  # queued | started | step | frame | succeeded | failed | cancelled
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS

    @property
    def step(self) -> int | None:
        return self.data.get("step")

    @property
    def total(self) -> int | None:
        return self.data.get("total")

    @property
    def preview(self) -> str | None:
        """Preview image as the server sent it (base64 PNG or data URL)."""
        return self.data.get("preview")

    @classmethod
    def from_sse(cls, event_id: str, name: str, data: str) -> JobEvent:
        try:
            payload = json.loads(data) if data else {}
        except json.JSONDecodeError:
            payload = {"data": data}
        return cls(event_id, name or "message", payload if isinstance(payload, dict) else {"data": payload})


@dataclass(frozen=True)
class Model:
    name: str
    native_width: int
    native_height: int
    scheduler: str
    raw: dict[str, Any]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Model:
        sched = d.get("scheduler") or d.get("scheduler_config") or ""
        if isinstance(sched, dict):
            sched = " / ".join(
                str(v) for v in (sched.get("_class_name") or sched.get("class"), sched.get("beta_schedule")) if v
            )
        return cls(
            str(d.get("name") or d.get("id") or ""),
            int(d.get("native_width") or d.get("width") or 0),
            int(d.get("native_height") or d.get("height") or 0),
            str(sched),
            d,
        )
