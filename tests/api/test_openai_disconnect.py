"""A synchronous OpenAI call whose caller goes away: its job is cancelled (nobody is left to take its images, and
a worker is freed), unless the call carried an Idempotency-Key, whose retry comes back for that job. On the real
stack: a raw connection sends the call and closes while the job runs."""

from __future__ import annotations

import json
import socket
import time
import uuid
from urllib.parse import urlparse

import httpx
import pytest

pytestmark = pytest.mark.timeout(120)


def _job_of(real_stack, prompt: str) -> dict:
    """The key's newest job once it is the one with `prompt`."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        jobs = httpx.get(f"{real_stack.url}/v1/jobs", params={"limit": 1}, headers=real_stack.headers()).json()["jobs"]
        if jobs and jobs[0]["params"]["prompt"] == prompt and jobs[0]["status"] == "running":
            return jobs[0]
        time.sleep(0.05)
    raise AssertionError(f"no running job with prompt {prompt!r}")


def _call_and_hang_up(real_stack, prompt: str, idempotency_key: str | None) -> dict:
    address = urlparse(real_stack.url)
    body = json.dumps({"prompt": prompt, "num_inference_steps": 999}).encode()
    headers = real_stack.headers() | ({"Idempotency-Key": idempotency_key} if idempotency_key else {})
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    request = (
        f"POST /v1/images/generations HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{head}\r\n"
    ).encode() + body
    with socket.create_connection((address.hostname, address.port)) as connection:
        connection.sendall(request)
        job = _job_of(real_stack, prompt)
    return job  # the connection is closed: the caller went away while its job runs


def _status(real_stack, job_id: str) -> str:
    return httpx.get(f"{real_stack.url}/v1/jobs/{job_id}", headers=real_stack.headers()).json()["status"]


def test_a_synchronous_call_whose_caller_goes_away_cancels_its_job(real_stack):
    job = _call_and_hang_up(real_stack, f"a red circle {uuid.uuid4().hex[:8]}", None)
    deadline = time.monotonic() + 10
    while _status(real_stack, job["id"]) != "cancelled":
        assert time.monotonic() < deadline, "the job of a caller that went away still runs"
        time.sleep(0.1)


def test_one_with_an_idempotency_key_keeps_its_job_for_the_retry(real_stack):
    job = _call_and_hang_up(real_stack, f"a blue square {uuid.uuid4().hex[:8]}", f"hang-up-{uuid.uuid4()}")
    time.sleep(2)  # four times the gateway's look at its caller
    assert _status(real_stack, job["id"]) == "running"
    httpx.post(f"{real_stack.url}/v1/jobs/{job['id']}/cancel", headers=real_stack.headers())
