"""The OpenAI routes answer a retry with its Idempotency-Key as POST /v1/generations does: the first job's
images, with `Idempotent-Replayed: true` (and not on the first answer). On the real stack: the route waits for
its job, so a worker must run it."""

from __future__ import annotations

import base64
import uuid

import httpx
import pytest

pytestmark = pytest.mark.timeout(300)


def _twice(real_stack, path: str, key: str, **body) -> tuple[httpx.Response, httpx.Response]:
    headers = real_stack.headers() | {"Idempotency-Key": key}
    first = httpx.post(real_stack.url + path, headers=headers, timeout=120, **body)
    again = httpx.post(real_stack.url + path, headers=headers, timeout=120, **body)
    return first, again


def test_a_retried_openai_generation_says_it_was_replayed(real_stack):
    body = {"prompt": "a red circle on a white background", "num_inference_steps": 2, "seed": 3}
    first, again = _twice(real_stack, "/v1/images/generations", f"openai-gen-{uuid.uuid4()}", json=body)
    assert first.status_code == 200 and "Idempotent-Replayed" not in first.headers, first.text
    assert again.status_code == 200 and again.headers.get("Idempotent-Replayed") == "true", again.headers
    assert again.json() == first.json()  # the same job's images, not a new job's


def test_a_retried_openai_edit_says_it_was_replayed(real_stack):
    made = httpx.post(
        real_stack.url + "/v1/images/generations",
        json={"prompt": "a blue square on a white background", "num_inference_steps": 2, "seed": 4},
        headers=real_stack.headers(),
        timeout=120,
    )
    picture = base64.b64decode(made.json()["data"][0]["b64_json"])
    form = {"files": {"image": ("in.png", picture, "image/png")}, "data": {"prompt": "x", "num_inference_steps": "2"}}
    first, again = _twice(real_stack, "/v1/images/edits", f"openai-edit-{uuid.uuid4()}", **form)
    assert first.status_code == 200 and "Idempotent-Replayed" not in first.headers, first.text
    assert again.status_code == 200 and again.headers.get("Idempotent-Replayed") == "true", again.headers
    assert again.json() == first.json()


def test_the_replay_header_is_documented(real_stack):
    paths = httpx.get(real_stack.url + "/openapi.json", timeout=30).json()["paths"]
    for path in ("/v1/images/generations", "/v1/images/edits"):
        assert "Idempotent-Replayed" in paths[path]["post"]["responses"]["200"]["headers"], path
