"""The job record, typed: read from its Redis hash (`from_redis`), shown to clients (`view` for REST and the
OpenAI route, `to_proto` for gRPC). One type, so every door shows the same job the same way."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from services.common import rules

KINDS = ("generation", "forward", "reverse", "guidance_sweep")
TERMINAL = rules.TERMINAL_STATUSES
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# The hash fields that hold JSON.
JSON_FIELDS = ("params", "progress", "timings", "images", "frames", "error")


def live_frame_field(attempt: int, index: int | str) -> str:
    """The job hash's field holding frame `index` of `attempt` (its metadata, JSON) from the moment the frame is
    stored: a reverse trajectory's frames are listed while it runs, and after a cancel or failure."""
    return f"frame:a{attempt}:{index}"


def _s(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _live_frames(fields: dict[str, str], attempt: int) -> list[dict[str, Any]]:
    """The frames `attempt` has stored so far, from 0 up to the first one missing (a write Redis lost): frame i
    of the list is always frame i of the job."""
    prefix = live_frame_field(attempt, "")
    stored = {name[len(prefix) :]: value for name, value in fields.items() if name.startswith(prefix)}
    frames = []
    while str(len(frames)) in stored:
        frames.append(json.loads(stored[str(len(frames))]))
    return frames


@dataclass
class JobRecord:
    id: str
    kind: str
    model: str
    owner: str
    status: str
    params: dict[str, Any]
    created_at: float
    progress: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)  # blob names
    frames: list[dict[str, Any]] = field(default_factory=list)  # metadata with the blob name under "blob"
    error: dict[str, Any] | None = None
    attempt: int = 0
    cancel_requested: bool = False
    webhook_url: str | None = None  # POSTed once the job ends (services/core/webhooks.py)
    ended_at: float | None = None  # when it ended (Redis time), however it ended; None while it runs
    # set by a submit that returned the job an earlier submit with the same Idempotency-Key made
    replayed: bool = field(default=False, compare=False)

    @classmethod
    def from_redis(cls, job_id: str, raw: dict) -> JobRecord | None:
        """From the fields of HGETALL latentd:job:<id>; None for a missing (or expired) job, and for the stub a
        worker's step write leaves of a record that expired under it (no kind, no owner)."""
        fields = {_s(k): _s(v) for k, v in raw.items()}
        if "kind" not in fields:
            return None
        loaded = {name: json.loads(fields.get(name) or "null") for name in JSON_FIELDS}
        attempt = int(fields.get("attempt") or 0)
        return cls(
            id=job_id,
            kind=fields["kind"],
            model=fields["model"],
            owner=fields["owner"],
            status=fields["status"],
            params=loaded["params"] or {},
            created_at=float(fields["created_at"]),
            progress=loaded["progress"] or {},
            timings=loaded["timings"] or {},
            images=loaded["images"] or [],
            frames=loaded["frames"] or _live_frames(fields, attempt),
            error=loaded["error"],
            attempt=attempt,
            cancel_requested=fields.get("cancel") == "1",
            webhook_url=fields.get("webhook"),
            ended_at=float(fields["ended_at"]) if fields.get("ended_at") else None,
        )

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.params.get("output_format") or "png"]

    @property
    def total_steps(self) -> int:
        """The updates the job makes: its steps, or with an image those its strength leaves (rules.steps_run)."""
        steps = int(self.params.get("num_inference_steps") or 0)
        if not steps:
            return int(self.progress.get("total") or 0)
        sampler = self.params.get("sampler") or rules.DEFAULT_SAMPLER
        return int(self.progress.get("total") or rules.steps_run(steps, self.params.get("strength"), sampler))

    def url(self, what: str, index: int) -> str:
        return f"/v1/jobs/{self.id}/{what}/{index}"

    def view(self) -> dict[str, Any]:
        """The public job of GET /v1/jobs/{id}: URLs for images and frames; never the owner or blob names."""
        return {
            "id": self.id,
            "kind": self.kind,
            "model": self.model,
            "status": self.status,
            "params": self.params,
            "progress": self.progress,
            "timings": self.timings,
            "images": [self.url("images", i) for i in range(len(self.images))],
            "frames": [
                {k: v for k, v in meta.items() if k != "blob"} | {"url": self.url("frames", i)}
                for i, meta in enumerate(self.frames)
            ],
            "error": self.error,
            "attempt": self.attempt,
            "created_at": self.created_at,
            "webhook_url": self.webhook_url,
        }

    @cached_property
    def view_json(self) -> bytes:
        """`view()` as compact JSON, made once per record (a settled one is kept and read many times)."""
        return json.dumps(self.view(), separators=(",", ":")).encode()

    def to_proto(self):
        from services.common import protocol
        from services.common.grpc_gen.latentd.v1 import latentd_pb2 as pb

        view = self.view()
        message = pb.Job(
            id=self.id,
            kind=pb.JOB_KIND_GENERATION if self.kind == "generation" else pb.JOB_KIND_TRAJECTORY,
            status=protocol.STATUS[self.status],
            model=self.model,
            params_json=json.dumps(self.params),
            step=int(self.progress.get("step") or 0),
            total_steps=self.total_steps,
            created_at=self.created_at,
            started_at=float(self.timings.get("started_at") or 0),
            finished_at=float(self.timings.get("finished_at") or 0),
            images=[protocol.artifact_to_proto(i, url, self.media_type) for i, url in enumerate(view["images"])],
            frames=[
                protocol.artifact_to_proto(i, frame["url"], "image/png", {k: v for k, v in frame.items() if k != "url"})
                for i, frame in enumerate(view["frames"])
            ],
            raw_json=json.dumps(view),
            attempt=self.attempt,
            queue_seconds=float(self.timings.get("queue_s") or 0),
            run_seconds=float(self.timings.get("run_s") or 0),
            webhook_url=self.webhook_url or "",
        )
        protocol.params_to_proto(self.kind, self.params, message)
        if self.error:
            message.error.CopyFrom(protocol.error_to_proto(self.error))
        return message


@dataclass
class JobEvent:
    """One entry of a job's event stream: the stream entry id (the SSE `id:`), the event name and its data as
    stored (JSON). Parsed and formatted once, however many readers it goes to."""

    id: str
    name: str
    raw: str

    @cached_property
    def data(self) -> dict[str, Any]:
        return json.loads(self.raw)

    @property
    def terminal(self) -> bool:
        return self.name in TERMINAL

    @cached_property
    def sse(self) -> bytes:
        return f"id: {self.id}\nevent: {self.name}\ndata: {self.raw}\n\n".encode()

    def to_proto(self):
        from services.common import protocol

        return protocol.event_to_proto(self.id, self.name, self.data)


def stream_id(entry_id: str) -> tuple[int, int]:
    """A Redis stream entry id "ms-seq" as a sortable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
