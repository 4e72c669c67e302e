"""Abuse of the REST doors' bodies, in process (real Redis, no worker): valid requests with fields swapped for
values of the wrong type, out of range, huge, empty, NaN and infinity spelt as strings, NUL and emoji, unknown
fields, and bodies that are not objects. Whatever comes in, the answer is never a 5xx (but the OpenAI door's 503
for a job no worker finished in time), and every error has the documented shape, naming a message."""

from __future__ import annotations

import json
import random

import pytest

from tests.fixtures.gateway import in_process_gateway
from tests.fixtures.tiny_model import published_info

KEY = "fuzz-key"
ODD = [None, True, False, 0, -1, 1, 3, 33, 64, 999, 1000, 1001, 2**31, 2**63, -(2**63), 10**30, 0.5, -0.5, 7.5]
ODD += [1e308, -1e308, 1e-320, "", "x", "a" * 3000, "\u0000", "🙂" * 10, "1", "nan", "inf", "-inf", "NaN"]
ODD += [[], [1], ["x"], [0.1, 0.2], [-5, 2000], list(range(300)), {}, {"a": 1}, {"job_id": "x", "index": -1}]
ODD += ["data:image/png;base64,AAAA", "iVBORw0KGgo=", "job_123/images/0"]
BODIES = {
    "/v1/generations": dict(
        prompt="a red circle",
        negative_prompt="",
        num_inference_steps=10,
        guidance_scale=7.5,
        seed=1,
        width=32,
        height=32,
        num_images=1,
        sampler="ddim",
        eta=0.0,
        guidance_rescale=0.0,
        guidance_start=0.0,
        guidance_stop=1.0,
        preview_every=0,
        output_format="png",
        model="tiny",
        image=None,
        mask=None,
    ),
    "/v1/trajectories": dict(
        kind="reverse",
        prompt="a red circle",
        num_inference_steps=10,
        seed=1,
        trajectory_every=2,
        model="tiny",
        image=None,
        strength=None,
    ),
    "/v1/images/generations": dict(prompt="a red circle", n=1, size="32x32", response_format="b64_json", model="tiny"),
}


@pytest.fixture
def client(own_redis, model_path):
    url = own_redis.rsplit("/", 1)[0] + "/10"
    tokenizer = str(model_path / "tokenizer")
    info = published_info(max_inference_steps=999, tokenizer_path=tokenizer, samplers=["ddim", "euler"])
    with in_process_gateway(
        url,
        KEY,
        info,
        max_queue_per_model=100_000,
        max_queue_per_key=100_000,
        openai_timeout_s=0.05,  # no worker: an OpenAI call that got through answers 503 at once
    ) as test_client:
        yield test_client


def mutated(rng: random.Random, body: dict):
    if rng.random() < 0.05:
        return rng.choice(ODD)  # not an object at all
    body = dict(body)
    for _ in range(rng.randint(1, 4)):
        body[rng.choice([*body, "unknown_field"])] = rng.choice(ODD)
    return body


@pytest.mark.timeout(300)
def test_no_body_gets_a_server_error_or_an_error_of_another_shape(client):
    for path, body in BODIES.items():  # each mutation starts from a body the endpoint accepts
        assert client.post(path, json=body).status_code in (202, 503), (path, body)
    rng = random.Random(20261129)
    refused = 0
    for _ in range(1500):
        path = rng.choice(list(BODIES))
        content = json.dumps(mutated(rng, BODIES[path]))
        response = client.post(path, content=content, headers={"content-type": "application/json"})
        if response.status_code == 503 and path == "/v1/images/generations":
            continue  # accepted, and no worker here to finish it
        assert response.status_code < 500, (path, content[:300], response.text[:300])
        if response.status_code >= 400:
            refused += 1
            error = response.json()["error"]
            assert isinstance(error["type"], str) and isinstance(error["message"], str) and error["message"], (
                path,
                content[:300],
                response.text[:300],
            )
    assert refused > 750  # the bodies are mostly wrong: the test is not passing on accepted ones
