"""Typed results, read from the REST job record (`from_dict`) or from the typed protobuf fields (`from_proto`),
so a job looks the same whichever door it came through. Parsed defensively so new server fields do not break
old clients; `raw` holds the job as REST shows it."""

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
    kind: str  # generation | forward | reverse | guidance_sweep
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
    attempt: int
    raw: dict[str, Any]
    webhook_url: str | None = None  # POSTed once the job ends

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def seed(self) -> int | None:
        return self.params.get("seed")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        """From GET /v1/jobs/{id}."""
        params = d.get("params") or {}
        progress = d.get("progress") or {}
        timings = d.get("timings") or {}
        job_id = str(d.get("id") or "")

        def artifacts(items, what: str) -> list[Artifact]:
            out = []
            for i, item in enumerate(items or []):
                if isinstance(item, str):
                    out.append(Artifact(i, item))
                    continue
                meta = {k: v for k, v in item.items() if k not in ("index", "url", "media_type")}
                url = item.get("url") or f"/v1/jobs/{job_id}/{what}/{i}"
                out.append(Artifact(int(item.get("index", i)), url, item.get("media_type") or "image/png", meta))
            return out

        def when(name: str) -> float | None:
            value = d.get(name, timings.get(name))
            return float(value) if isinstance(value, (int, float)) else None

        return cls(
            id=job_id,
            kind=str(d.get("kind") or "generation"),
            status=str(d.get("status", "")),
            model=str(d.get("model") or params.get("model") or ""),
            params=params,
            step=int(progress.get("step") or 0),
            total_steps=int(progress.get("total") or params.get("num_inference_steps") or 0),
            created_at=when("created_at"),
            started_at=when("started_at"),
            finished_at=when("finished_at"),
            images=artifacts(d.get("images"), "images"),
            frames=artifacts(d.get("frames"), "frames"),
            error=d.get("error") or None,
            attempt=int(d.get("attempt") or 0),
            raw=d,
            webhook_url=d.get("webhook_url"),
        )

    @classmethod
    def from_proto(cls, message) -> Job:
        """From a latentd.v1.Job, by its typed fields."""
        from services.common import protocol

        kind = protocol.TRAJECTORY_NAME.get(message.trajectory_kind, "generation")
        error = (
            {"type": message.error.type, "message": message.error.message, "param": message.error.param or None}
            if message.HasField("error")
            else None
        )
        images = [Artifact(a.index, a.url, a.media_type) for a in message.images]
        frames = [Artifact(a.index, a.url, a.media_type, protocol.artifact_metadata(a)) for a in message.frames]
        params = protocol.params_from_proto(message)
        raw = {
            "id": message.id,
            "kind": kind,
            "model": message.model,
            "status": protocol.STATUS_NAME.get(message.status, ""),
            "params": params,
            "progress": {"step": message.step, "total": message.total_steps},
            "timings": {
                k: v
                for k, v in (
                    ("started_at", message.started_at),
                    ("finished_at", message.finished_at),
                    ("queue_s", message.queue_seconds),
                    ("run_s", message.run_seconds),
                )
                if v
            },
            "images": [a.url for a in images],
            "frames": [a.metadata | {"url": a.url} for a in frames],
            "error": error,
            "attempt": message.attempt,
            "created_at": message.created_at,
            "webhook_url": message.webhook_url or None,
        }
        return cls(
            id=message.id,
            kind=kind,
            status=raw["status"],
            model=message.model,
            params=params,
            step=message.step,
            total_steps=message.total_steps,
            created_at=message.created_at or None,
            started_at=message.started_at or None,
            finished_at=message.finished_at or None,
            images=images,
            frames=frames,
            error=error,
            attempt=message.attempt,
            raw=raw,
            webhook_url=message.webhook_url or None,
        )


@dataclass(frozen=True)
class JobPage:
    """A page of the caller's jobs, newest first; `next_starting_after` (None: the last page) asks for the next."""

    jobs: list[Job]
    has_more: bool
    next_starting_after: str | None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobPage:
        jobs = [Job.from_dict(job) for job in data.get("jobs") or []]
        return cls(jobs, bool(data.get("has_more")), data.get("next_starting_after") or None)

    @classmethod
    def from_proto(cls, message) -> JobPage:
        return cls([Job.from_proto(job) for job in message.jobs], message.has_more, message.next_starting_after or None)


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
        """Preview image as the server sent it (base64 PNG)."""
        return self.data.get("preview")

    @classmethod
    def from_sse(cls, event_id: str, name: str, data: str) -> JobEvent:
        try:
            payload = json.loads(data) if data else {}
        except json.JSONDecodeError:
            payload = {"data": data}
        return cls(event_id, name or "message", payload if isinstance(payload, dict) else {"data": payload})

    @classmethod
    def from_proto(cls, message) -> JobEvent:
        from services.common import protocol

        return cls(*protocol.event_from_proto(message))


@dataclass(frozen=True)
class Model:
    name: str
    native_width: int
    native_height: int
    scheduler: str
    raw: dict[str, Any]

    @property
    def family(self) -> str:
        """sd, sdxl, sd3 or flux (a server from before families serves sd)."""
        return str(self.raw.get("family") or "sd")

    @property
    def params(self) -> list[str]:
        """The request fields this model reads (empty from a server from before families)."""
        return list(self.raw.get("params") or [])

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Model:
        return cls(
            str(d.get("name") or d.get("id") or ""),
            int(d.get("native_width") or 0),
            int(d.get("native_height") or 0),
            str(d.get("scheduler") or ""),
            d,
        )

    @classmethod
    def from_proto(cls, message) -> Model:
        raw = {
            "name": message.name,
            "native_width": message.native_width,
            "native_height": message.native_height,
            "scheduler": message.scheduler,
            "max_prompt_tokens": message.max_prompt_tokens,
            "num_train_timesteps": message.num_train_timesteps,
            "size_multiple": message.size_multiple,
            "max_inference_steps": message.max_inference_steps,
            "workers": message.workers,
            "queue_depth": message.queue_depth,
            "default": message.is_default,
            "samplers": list(message.samplers),
            "default_sampler": message.default_sampler,
            "default_guidance_rescale": message.default_guidance_rescale,
            "default_guidance_start": message.default_guidance_start,
            "default_guidance_stop": message.default_guidance_stop,
            "default_strength": message.default_strength,
            "default_inpaint_strength": message.default_inpaint_strength,
            "family": message.family or "sd",
            "pipeline": message.pipeline or "StableDiffusionPipeline",
            "prediction_type": message.prediction_type,
            "flow_shift": message.flow_shift if message.HasField("flow_shift") else None,
            "dynamic_shift": message.dynamic_shift,
            "guidance_form": message.guidance_form or "cfg",
            "true_cfg": message.true_cfg,
            "default_guidance_scale": message.default_guidance_scale,
            "default_num_inference_steps": message.default_num_inference_steps,
            "params": list(message.params),
        }
        return cls(message.name, message.native_width, message.native_height, message.scheduler, raw)
