"""A small stand-in for the REST gateway's contract (docs/api.md), backed by real Redis streams,
with a thread that plays the worker. Used to test the gRPC translation layer and the client's
resume while the real gateway is not importable; tests against the real stack use `real_stack`.

It can also drop SSE connections on purpose (`drop_after` events), which the real one cannot.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import redis
from PIL import Image

API_KEY = "test-key"
MODEL = {"name": "tiny", "native_width": 64, "native_height": 64, "scheduler": "DDIMScheduler / squaredcos_cap_v2"}


class ContractGateway:
    def __init__(self, redis_url: str, *, step_delay_s: float = 0.02, max_queued: int = 100):
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.step_delay_s, self.max_queued = step_delay_s, max_queued
        self.worker_alive = True
        self.drop_after: int | None = None  # SSE: close the connection after this many events
        self.sse_readers = 0
        self.cancelled: set[str] = set()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                gateway.route(self, "GET")

            def do_POST(self):
                gateway.route(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()

    # ---- helpers ---------------------------------------------------------------------------
    def reply(self, h, status: int, body, content_type="application/json", headers=()):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h.send_response(status)
        h.send_header("content-type", content_type)
        h.send_header("content-length", str(len(data)))
        for k, v in headers:
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def error(self, h, status, type_, message, param=None, headers=()):
        self.reply(h, status, {"error": {"type": type_, "message": message, "param": param}}, headers=headers)

    def job(self, job_id):
        raw = self.redis.get(f"contract:job:{job_id}")
        return json.loads(raw) if raw else None

    def save(self, job):
        self.redis.set(f"contract:job:{job['id']}", json.dumps(job))

    def emit(self, job_id, event, data):
        self.redis.xadd(f"contract:events:{job_id}", {"event": event, "data": json.dumps(data)})

    # ---- routes ----------------------------------------------------------------------------
    def route(self, h, method):
        path = h.path.split("?")[0]
        if path == "/readyz":
            if not self.worker_alive:
                return self.reply(h, 503, {"status": "unavailable", "redis": True, "workers": {}})
            return self.reply(h, 200, {"status": "ready", "redis": True, "workers": {"tiny": 1}})
        if h.headers.get("authorization") != f"Bearer {API_KEY}":
            return self.error(h, 401, "authentication_error", "missing or unknown API key")
        body = {}
        if method == "POST" and int(h.headers.get("content-length") or 0):
            body = json.loads(h.rfile.read(int(h.headers["content-length"])))
        if method == "GET" and path == "/v1/models":
            return self.reply(h, 200, {"models": [MODEL | {"workers": int(self.worker_alive)}]})
        if method == "POST" and path in ("/v1/generations", "/v1/trajectories"):
            return self.submit(h, body, "trajectory" if "traj" in path else "generation")
        m = re.fullmatch(r"/v1/jobs/([^/]+)(/.*)?", path)
        job = self.job(m.group(1)) if m else None
        if job is None:
            return self.error(h, 404, "not_found", f"job {m.group(1) if m else path} not found")
        rest = m.group(2) or ""
        if method == "GET" and rest == "":
            return self.reply(h, 200, job)
        if method == "POST" and rest == "/cancel":
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return self.error(h, 409, "conflict", f"job {job['id']} already {job['status']}")
            self.cancelled.add(job["id"])
            return self.reply(h, 200, job)
        if method == "GET" and rest == "/events":
            return self.events(h, job["id"], h.headers.get("last-event-id") or "0")
        a = re.fullmatch(r"/(images|frames)/(\d+)", rest)
        if method == "GET" and a and int(a.group(2)) < len(job[a.group(1)]):
            buf = io.BytesIO()
            Image.new("RGB", (64, 64), (200, 30 * int(a.group(2)) % 256, 30)).save(buf, "PNG")
            return self.reply(h, 200, buf.getvalue(), "image/png")
        return self.error(h, 404, "not_found", f"{path} not found")

    def submit(self, h, body, kind):
        steps = body.get("num_inference_steps", 50)
        if not isinstance(steps, int) or not 1 <= steps <= 1000:
            return self.error(
                h,
                422,
                "invalid_request_error",
                f"num_inference_steps must be between 1 and 1000, got {steps}",
                "num_inference_steps",
            )
        if not body.get("prompt") and not body.get("image"):
            return self.error(h, 422, "invalid_request_error", "prompt is required", "prompt")
        queued = sum(
            1
            for k in self.redis.scan_iter("contract:job:*")
            if json.loads(self.redis.get(k) or "{}").get("status") in ("queued", "running")
        )
        if queued >= self.max_queued:
            return self.error(
                h, 429, "rate_limit_error", "the queue is full; retry later", headers=[("retry-after", "2")]
            )
        params = {
            "model": "tiny",
            "num_inference_steps": steps,
            "guidance_scale": 7.5,
            "eta": 0.0,
            "seed": body.get("seed", 1234),
            "num_images": 1,
        } | body
        job = {
            "id": uuid.uuid4().hex,
            "kind": kind,
            "status": "queued",
            "model": "tiny",
            "params": params,
            "progress": {"step": 0, "total": steps},
            "timings": {},
            "created_at": time.time(),
            "images": [],
            "frames": [],
            "error": None,
        }
        self.save(job)
        self.emit(job["id"], "queued", {"status": "queued"})
        threading.Thread(target=self.work, args=(job["id"],), daemon=True).start()
        self.reply(h, 202, job)

    def work(self, job_id):
        job = self.job(job_id)
        job.update(status="running", started_at=time.time())
        self.save(job)
        self.emit(job_id, "started", {})
        total = job["progress"]["total"]
        for step in range(1, total + 1):
            time.sleep(self.step_delay_s)
            if job_id in self.cancelled:
                job.update(status="cancelled", finished_at=time.time())
                self.save(job)
                return self.emit(job_id, "cancelled", {})
            self.emit(job_id, "step", {"step": step, "total": total, "timestep": 999 - step * 999 // total})
            job["progress"]["step"] = step
        if job["kind"] == "trajectory":
            job["frames"] = [
                {"url": f"/v1/jobs/{job_id}/frames/{i}", "timestep": t} for i, t in enumerate((0, 250, 500, 999))
            ]
            for i in range(4):
                self.emit(job_id, "frame", {"index": i})
        job["images"] = [f"/v1/jobs/{job_id}/images/0"]
        job.update(status="succeeded", finished_at=time.time())
        self.save(job)
        self.emit(job_id, "succeeded", {"images": 1})

    def events(self, h, job_id, last_id):
        h.send_response(200)
        h.send_header("content-type", "text/event-stream")
        h.send_header("cache-control", "no-cache")
        h.send_header("connection", "close")
        h.end_headers()
        self.sse_readers += 1
        sent = 0
        try:
            while True:
                entries = self.redis.xread({f"contract:events:{job_id}": last_id}, block=500, count=100)
                for _stream, items in entries or []:
                    for entry_id, fields in items:
                        h.wfile.write(f"id: {entry_id}\nevent: {fields['event']}\ndata: {fields['data']}\n\n".encode())
                        h.wfile.flush()
                        last_id, sent = entry_id, sent + 1
                        if fields["event"] in ("succeeded", "failed", "cancelled"):
                            return
                        if self.drop_after is not None and sent >= self.drop_after:
                            return  # a dropped connection, mid-stream
                if not entries:
                    h.wfile.write(b": keep-alive\n\n")
                    h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            self.sse_readers -= 1
            h.close_connection = True


if __name__ == "__main__":  # python -m tests.grpc.contract_gateway [redis_url]: for recording docs by hand
    import sys

    gw = ContractGateway(sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/13", step_delay_s=0.1)
    print(gw.url, flush=True)
    threading.Event().wait()
