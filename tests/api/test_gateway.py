"""The gateway alone (in process, real Redis in its own database, no worker): auth, limits, the bounded queue,
the loopback rule and the documented contract."""

from __future__ import annotations

import json
import time

import pytest
import redis

from services.api.__main__ import main as serve_main
from services.common.jobstore import JobStore, events_key
from services.common.settings import Settings, hash_key
from tests.fixtures.gateway import in_process_gateway
from tests.fixtures.tiny_model import published_info

REDIS_URL = "redis://127.0.0.1:6379/11"
KEY = "secret-key"


@pytest.fixture
def client(model_path):
    info = published_info(max_inference_steps=999, tokenizer_path=str(model_path / "tokenizer"))
    with in_process_gateway(
        REDIS_URL,
        KEY,
        info,
        max_queue_per_model=2,
        max_queue_per_key=2,
        max_body_bytes=4096,
        retry_after_s=7,
        max_num_images=4,
        openai_timeout_s=1,  # no worker here: a synchronous OpenAI call that got through answers 503 soon
    ) as test_client:
        yield test_client


def test_a_full_queue_answers_429_with_retry_after(client):
    for _ in range(2):
        assert client.post("/v1/generations", json={"prompt": "x"}).status_code == 202
    refused = client.post("/v1/generations", json={"prompt": "x"})
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "7"
    assert refused.json()["error"]["type"] == "rate_limit_error"


def test_cancelling_a_queued_job_frees_its_queue_slot(client):
    jobs = [client.post("/v1/generations", json={"prompt": "x"}).json() for _ in range(2)]
    cancelled = client.post(f"/v1/jobs/{jobs[0]['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    assert client.post("/v1/generations", json={"prompt": "x"}).status_code == 202


def test_a_queued_job_cancelled_late_in_its_ttl_is_kept_a_full_ttl_from_its_end(client):
    """As every ending keeps a job's record and events: a job queued for most of the TTL, then cancelled, is still
    readable (and its webhook sendable) for the TTL, not for what was left of it."""
    job = client.post("/v1/generations", json={"prompt": "x"}).json()
    store = redis.Redis.from_url(REDIS_URL)
    for key in (f"latentd:job:{job['id']}", events_key(job["id"])):
        store.expire(key, 5)  # as after 3595 s in the queue
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    for key in (f"latentd:job:{job['id']}", events_key(job["id"])):
        assert store.ttl(key) > 3500


def test_a_job_that_expired_unfinished_frees_its_queue_slot(client):
    jobs = [client.post("/v1/generations", json={"prompt": "x"}).json() for _ in range(2)]
    assert client.post("/v1/generations", json={"prompt": "x"}).status_code == 429
    store = redis.Redis.from_url(REDIS_URL)
    store.delete(f"latentd:job:{jobs[0]['id']}")  # what its TTL does to a job no worker ever finished
    assert client.post("/v1/generations", json={"prompt": "x"}).status_code == 202
    assert store.scard("latentd:pending:tiny") == 2
    assert client.post("/v1/generations", json={"prompt": "x"}).status_code == 429  # the live ones still count


def test_the_job_record_holds_the_resolved_defaults(client):
    job = client.post("/v1/generations", json={"prompt": "x"}).json()
    params = job["params"]
    assert params["model"] == "tiny" and (params["width"], params["height"]) == (32, 32)
    assert isinstance(params["seed"], int) and params["num_inference_steps"] == 50 and params["guidance_scale"] == 7.5
    events = redis.Redis.from_url(REDIS_URL).xrange(events_key(job["id"]))
    assert [fields[b"event"] for _, fields in events] == [b"queued"]


def test_steps_past_the_schedulers_limit_are_refused_before_queueing(client):
    # leading spacing with steps_offset 1 allows 999 steps: the gateway says so instead of a failed job
    for path, body in (
        ("/v1/generations", {"prompt": "x", "num_inference_steps": 1000}),
        ("/v1/trajectories", {"kind": "reverse", "prompt": "x", "num_inference_steps": 1000}),
    ):
        response = client.post(path, json=body)
        assert response.status_code == 422
        assert response.json()["error"]["param"] == "num_inference_steps"
        assert "between 1 and 999" in response.json()["error"]["message"]
    assert client.post("/v1/generations", json={"prompt": "x", "num_inference_steps": 999}).status_code == 202


def test_a_body_over_the_limit_is_413(client):
    response = client.post(
        "/v1/generations", content=json.dumps({"prompt": "x" * 5000}), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and response.json()["error"]["type"] == "payload_too_large"


def test_images_per_job_follow_the_setting(client):
    response = client.post("/v1/generations", json={"prompt": "x", "num_images": 5})
    assert response.status_code == 422
    assert response.json()["error"]["message"] == "num_images must be between 1 and 4, got 5"


def test_keys_are_required_and_checked(client):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        response = client.get("/v1/models", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert client.get("/livez").status_code == 200


def test_a_queued_job_cancelled_is_counted_once_by_the_gateway(client):
    """No worker sees a job cancelled while queued: the gateway that ends it counts it, once however often it is asked."""
    from prometheus_client import REGISTRY

    def count() -> float:
        return REGISTRY.get_sample_value("latentd_queued_cancellations_total", {"model": "tiny"}) or 0.0

    before = count()
    job = client.post("/v1/generations", json={"prompt": "x"}).json()
    for _ in range(2):
        assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    assert count() == before + 1


def test_refusals_are_counted_by_reason(client):
    from prometheus_client import REGISTRY

    def count(reason: str) -> float:
        return REGISTRY.get_sample_value("latentd_rejections_total", {"reason": reason}) or 0.0

    before = {reason: count(reason) for reason in ("validation", "auth", "payload_too_large")}
    assert client.post("/v1/generations", json={"prompt": "x", "num_inference_steps": 0}).status_code == 422
    assert client.post("/v1/generations", json={"prompt": "x", "num_images": 5}).status_code == 422
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert (
        client.post(
            "/v1/generations", content=json.dumps({"prompt": "x" * 5000}), headers={"content-type": "application/json"}
        ).status_code
        == 413
    )
    assert client.post("/v1/generations", json={"prompt": "x"}).status_code == 202
    assert {reason: count(reason) - before[reason] for reason in before} == {
        "validation": 2,
        "auth": 1,
        "payload_too_large": 1,
    }


def test_a_running_jobs_streamed_frames_are_listed_and_can_be_fetched(client):
    """A reverse trajectory's frames are in its job (GET) and answer (frames/N) as soon as they are stored, while it
    runs and after a cancel; a frame not stored yet is a 404 that says so."""
    from services.common.jobstore import StepWrite

    job = client.post(
        "/v1/trajectories", json={"kind": "reverse", "prompt": "x", "num_inference_steps": 4, "trajectory_every": 2}
    ).json()
    store = JobStore.from_url(REDIS_URL)
    taken, attempt = store.take("tiny", 15, "test-worker")  # what a worker does when it starts the job
    assert taken == job["id"]
    meta = {"step": 1, "timestep": 750, "alpha_bar": 0.05, "what": "x_t"}
    event = {"step": 1, "total": 4, "timestep": 750, "attempt": attempt, "emitted_at": time.time()}
    frame = (0, meta, b"\x89PNG frame 0")
    assert store.write_steps(
        [StepWrite(job["id"], attempt, event, {"step": 1, "total": 4}, [frame])]
    )  # its step writer
    listed = [meta | {"url": f"/v1/jobs/{job['id']}/frames/0"}]
    running = client.get(f"/v1/jobs/{job['id']}").json()
    assert running["status"] == "running" and running["frames"] == listed, running
    assert client.get(f"/v1/jobs/{job['id']}/frames/0").content == b"\x89PNG frame 0"
    missing = client.get(f"/v1/jobs/{job['id']}/frames/1")
    assert missing.status_code == 404 and missing.json()["error"] == {
        "type": "not_found_error",
        "message": f"job {job['id']} has no frame 1 yet: a frame is there once its frame event is out",
        "param": "index",
    }
    # cancelled at its next step, as its worker ends it: the frame it streamed stays listed and there
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    record = store.get(job["id"])
    assert store.finish(record, attempt, "cancelled", {}, ("cancelled", {"id": job["id"]}))
    time.sleep(0.3)  # past JOB_POLL_MAX_AGE_S: the gateway's view of a running job may be that old
    cancelled = client.get(f"/v1/jobs/{job['id']}").json()
    assert cancelled["status"] == "cancelled" and cancelled["frames"] == listed
    assert client.get(f"/v1/jobs/{job['id']}/frames/0").content == b"\x89PNG frame 0"
    missing = client.get(f"/v1/jobs/{job['id']}/frames/1").json()["error"]
    assert missing["message"] == f"job {job['id']} has no frame 1 (it has 1)", missing


def test_readyz_is_503_without_a_live_worker(client):
    response = client.get("/readyz")
    assert response.status_code == 503 and response.json()["redis"] is True


def test_no_keys_means_loopback_only(monkeypatch, capsys):
    from services.common import settings as settings_module

    monkeypatch.setenv("LATENTD_API_KEY_HASHES", "")
    monkeypatch.setenv("LATENTD_API_KEYS", "")
    settings_module.get_settings.cache_clear()
    try:
        assert serve_main(["--host", "0.0.0.0", "--port", "1"]) == 2
    finally:
        settings_module.get_settings.cache_clear()
    err = capsys.readouterr().err
    # the variables the README documents, both of them
    assert "refusing to bind to 0.0.0.0" in err and "LATENTD_API_KEYS" in err and "LATENTD_API_KEY_HASHES" in err


def test_openapi_documents_limits_and_defaults(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]["GenerationCreate"]["properties"]
    steps = schema["num_inference_steps"]
    bounds = next(kind for kind in steps["anyOf"] if kind.get("type") == "integer")
    assert (bounds["minimum"], bounds["maximum"], steps.get("default")) == (1, 1000, None)
    assert "default_num_inference_steps" in steps["description"]  # null: the model's own default (SD: 50)
    assert "default_guidance_scale" in schema["guidance_scale"]["description"]
    assert "Flux only" in schema["true_cfg_scale"]["description"] and "SDXL only" in schema["crop_top"]["description"]


def test_one_seed_limit_for_every_door(client):
    """2**63 - 1 is the largest seed (the proto's int64): REST refuses 2**63 with the rules' message."""
    assert client.post("/v1/generations", json={"prompt": "x", "seed": 2**63 - 1}).status_code == 202
    refused = client.post("/v1/generations", json={"prompt": "x", "seed": 2**63})
    assert refused.status_code == 422
    assert refused.json()["error"] == {
        "type": "invalid_request_error",
        "message": "seed must be between 0 and 9223372036854775807, got 9223372036854775808",
        "param": "seed",
    }


def test_prompts_are_limited_in_characters_before_tokenizing(client):
    refused = client.post("/v1/generations", json={"prompt": "x" * 4001})
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "prompt"
    assert refused.json()["error"]["message"] == "prompt must be at most 4000 characters, got 4001"


def test_samplers_and_guidance_rescale_are_checked_by_the_model_and_resolved(client):
    job = client.post("/v1/generations", json={"prompt": "x", "num_inference_steps": 5}).json()
    assert job["params"]["sampler"] == "ddim" and job["params"]["guidance_rescale"] == 0.0
    for body, param, message in (
        ({"sampler": "ddpm"}, "sampler", "sampler must be one of ddim for model 'tiny', got 'ddpm'"),
        ({"guidance_rescale": 1.5}, "guidance_rescale", "guidance_rescale must be between 0 and 1, got 1.5"),
        ({"eta": 0.5, "sampler": "ddpm"}, "sampler", "sampler must be one of ddim"),
    ):
        refused = client.post("/v1/generations", json={"prompt": "x"} | body)
        assert refused.status_code == 422 and refused.json()["error"]["param"] == param
        assert refused.json()["error"]["message"].startswith(message)


def test_the_guidance_interval_is_resolved_and_checked(client):
    job = client.post("/v1/generations", json={"prompt": "x", "num_inference_steps": 5}).json()
    assert (job["params"]["guidance_start"], job["params"]["guidance_stop"]) == (0.0, 1.0)  # the model names none
    job = client.post("/v1/generations", json={"prompt": "x", "guidance_start": 0.1, "guidance_stop": 0.6}).json()
    assert (job["params"]["guidance_start"], job["params"]["guidance_stop"]) == (0.1, 0.6)
    for body, param, message in (
        (
            {"guidance_start": 0.7, "guidance_stop": 0.6},
            "guidance_stop",
            "guidance_stop must be between guidance_start (0.7) and 1, got 0.6",
        ),
        ({"guidance_stop": 1.5}, "guidance_stop", "guidance_stop must be between 0 and 1, got 1.5"),
        ({"guidance_start": -0.1}, "guidance_start", "guidance_start must be between 0 and 1, got -0.1"),
    ):
        response = client.post("/v1/generations", json={"prompt": "x"} | body)
        assert response.status_code == 422 and response.json()["error"]["param"] == param, response.text
        assert message in response.json()["error"]["message"]


def test_a_retry_with_the_same_idempotency_key_and_body_returns_the_first_job(client):
    body = {"prompt": "a red circle", "num_inference_steps": 5}  # seed null: drawn once, by the first request
    first = client.post("/v1/generations", json=body, headers={"Idempotency-Key": "retry-1"})
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
    again = client.post("/v1/generations", json=dict(reversed(body.items())), headers={"Idempotency-Key": "retry-1"})
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["params"]["seed"] == first.json()["params"]["seed"]
    assert redis.Redis.from_url(REDIS_URL).scard("latentd:pending:tiny") == 1  # one job, not two
    # the queue is full now for this key's next new job (limit 2), but a retry is never refused for it
    assert client.post("/v1/generations", json=body).status_code == 202
    assert client.post("/v1/generations", json=body).status_code == 429
    assert client.post("/v1/generations", json=body, headers={"Idempotency-Key": "retry-1"}).status_code == 200


def test_the_same_idempotency_key_with_another_body_is_409(client):
    first = client.post("/v1/generations", json={"prompt": "a red circle"}, headers={"Idempotency-Key": "k-2"})
    other = client.post("/v1/generations", json={"prompt": "a blue square"}, headers={"Idempotency-Key": "k-2"})
    assert other.status_code == 409
    error = other.json()["error"]
    assert error["type"] == "conflict_error" and error["param"] == "Idempotency-Key"
    assert first.json()["id"] in error["message"] and "different request" in error["message"]
    # a trajectory is another request, even with the same fields
    trajectory = client.post(
        "/v1/trajectories", json={"kind": "reverse", "prompt": "a red circle"}, headers={"Idempotency-Key": "k-2"}
    )
    assert trajectory.status_code == 409


def test_idempotency_keys_belong_to_their_api_key(client, monkeypatch):
    other_key = "second-key"
    client.app.state.core.key_hashes.add(hash_key(other_key))
    mine = client.post("/v1/generations", json={"prompt": "x"}, headers={"Idempotency-Key": "shared"})
    theirs = client.post(
        "/v1/generations",
        json={"prompt": "x"},
        headers={"Idempotency-Key": "shared", "Authorization": f"Bearer {other_key}"},
    )
    assert mine.status_code == theirs.status_code == 202 and mine.json()["id"] != theirs.json()["id"]


def test_a_malformed_idempotency_key_is_422(client):
    for value in ("", "x" * 256, "caf\u00e9".encode()):  # an empty one, a long one, one not in ASCII
        response = client.post("/v1/generations", json={"prompt": "x"}, headers={"Idempotency-Key": value})
        assert response.status_code == 422, value
        assert response.json()["error"]["param"] == "Idempotency-Key"


def test_openapi_documents_the_idempotency_key(client):
    operation = client.get("/openapi.json").json()["paths"]["/v1/generations"]["post"]
    header = next(p for p in operation["parameters"] if p["name"] == "Idempotency-Key")
    assert header["in"] == "header" and "409" in header["description"]
    assert {"200", "202"} <= set(operation["responses"])


def test_a_gateway_whose_redis_connections_stay_busy_says_it_is_overloaded():
    """Redis up, every pooled connection busy past LATENTD_REDIS_POOL_WAIT_S: a 503 with Retry-After that names the
    gateway's load, not Redis away (a burst of submits on a busy CPU met the pool's wait; docs/api.md)."""
    import asyncio

    from services.common.errors import Unavailable
    from services.core.core import Core

    async def scenario() -> Unavailable:
        settings = Settings(redis_url=REDIS_URL, redis_max_connections=2, redis_pool_wait_s=0.3, retry_after_s=7)
        core = await Core.open(settings)
        pool = core.store.redis.connection_pool
        held = []
        try:
            with pytest.raises(redis.exceptions.ConnectionError):
                while len(held) < 3:  # the pool has 2: the third waits out the pool's wait
                    held.append(await pool.get_connection())
            with pytest.raises(Unavailable) as refused:
                await core.resolve_model(None)
            return refused.value
        finally:
            for connection in held:
                await pool.release(connection)
            await core.close()

    error = asyncio.run(scenario())
    assert error.status_code == 503 and error.retry_after_s == 7
    assert error.message.startswith("the gateway is overloaded: all of its Redis connections stayed busy"), (
        error.message
    )


@pytest.mark.parametrize(
    "image, param, message",
    [
        ({"job_id": "", "index": 0}, "image.job_id", "image.job_id must not be empty"),
        ({"job_id": "abc", "index": -3}, "image.index", "image.index must be between 0 and 15, got -3"),
        (5, "image", "image must be a string or an object {job_id, index}, got 5"),
        (
            "aGVsbG8=",
            "image",
            "image must be a base64-encoded PNG or JPEG picture (not a picture file that can be read)",
        ),
    ],
)
def test_a_picture_field_is_refused_in_the_form_it_was_sent_in(client, image, param, message):
    """`image` is base64 or {job_id, index}: the refusal speaks of the form the value came in, in the caller's
    field names (pydantic's union members, "str" and "JobImage", never show)."""
    refused = client.post("/v1/generations", json={"prompt": "x", "image": image})
    assert refused.status_code == 422
    assert refused.json()["error"] == {"type": "invalid_request_error", "message": message, "param": param}


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"kind": "forward", "strength": 0.5}, "strength", "strength applies to reverse and guidance_sweep trajectories only, not forward; leave it out"),
        ({"kind": "reverse", "timesteps": [0, 500]}, "timesteps", "timesteps applies to forward trajectories only, not reverse; leave it out"),
        ({"kind": "forward", "guidance_scales": [1.0]}, "guidance_scales", "guidance_scales applies to guidance_sweep trajectories only, not forward; leave it out"),
        ({"kind": "guidance_sweep", "trajectory_every": 2}, "trajectory_every", "trajectory_every applies to reverse trajectories only, not guidance_sweep; leave it out"),
        ({"kind": "reverse", "space": "pixel"}, "space", "space applies to forward trajectories only, not reverse; leave it out"),
        ({"kind": "guidance_sweep", "guidance_scale": 3}, "guidance_scale", "guidance_scale applies to forward and reverse trajectories only, not guidance_sweep; leave it out"),
    ],
)  # fmt: skip
def test_a_trajectory_field_its_kind_does_not_read_is_refused_by_name(client, body, param, message):
    """Fields of one kind sent to another are refused, not ignored; a client sending a field at its default is
    not refused (the CLI and the page send their defaults)."""
    refused = client.post("/v1/trajectories", json={"prompt": "x"} | body)
    assert refused.status_code == 422
    assert refused.json()["error"] == {"type": "invalid_request_error", "message": message, "param": param}
    defaults = {"noise_seed": 0, "space": "latent", "trajectory_every": 1, "timesteps": None, "strength": None}
    assert client.post("/v1/trajectories", json={"kind": "reverse", "prompt": "x"} | defaults).status_code == 202


@pytest.mark.parametrize(
    "field, value",
    [
        ("prompt", "a red circle"),
        ("seed", 3),
        ("num_inference_steps", 20),
        ("guidance_scale", 2.0),
        ("eta", 0.5),
        ("output_format", "jpeg"),
    ],
)
def test_a_forward_trajectory_of_an_image_refuses_what_would_generate_a_picture(client, field, value):
    """With an image a forward trajectory noises that picture: a prompt, seed or step count would be ignored, so
    it is refused by name; the same field is read (accepted) when the forward trajectory generates its picture."""
    picture = {"job_id": "nope", "index": 0}
    refused = client.post("/v1/trajectories", json={"kind": "forward", "image": picture, field: value})
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["param"] == field, error
    assert error["message"] == (
        f"{field} describes the picture a forward trajectory generates from a prompt; a forward trajectory of an "
        f"image noises that image as it is: leave {field} out"
    )
    generated = {"kind": "forward", "prompt": "a red circle", field: value}
    assert client.post("/v1/trajectories", json=generated).status_code == 202
    own = {"kind": "forward", "image": picture, "noise_seed": 4, "space": "pixel", "output_format": "png"}
    assert client.post("/v1/trajectories", json=own).json()["error"]["param"] == "image.job_id"  # read, then resolved


def test_a_trajectory_takes_an_earlier_jobs_image_by_reference(client):
    """{job_id, index} is a trajectory's picture as a generation's: resolved (here: no such job), not refused as a
    wrong type."""
    for kind, prompt in (("forward", {}), ("reverse", {"prompt": "x"})):
        body = {"kind": kind, "image": {"job_id": "nope", "index": 0}} | prompt
        refused = client.post("/v1/trajectories", json=body).json()["error"]
        assert refused["param"] == "image.job_id" and refused["message"] == "image: no job 'nope'", refused


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"num_inference_steps": True}, "num_inference_steps", "num_inference_steps must be an integer, got true"),
        ({"guidance_scale": False}, "guidance_scale", "guidance_scale must be a number, got false"),
        ({"image": {"job_id": "j", "index": True}}, "image.index", "image.index must be an integer, got true"),
        ({"image": True}, "image", "image must be a string or an object {job_id, index}, got true"),
    ],
)
def test_true_and_false_are_not_numbers(client, body, param, message):
    """pydantic's lax mode reads true as 1: a request with "num_inference_steps": true ran one step."""
    refused = client.post("/v1/generations", json={"prompt": "x"} | body)
    assert refused.status_code == 422
    assert refused.json()["error"] == {"type": "invalid_request_error", "message": message, "param": param}


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"eta": None}, "eta", "eta must be a number, got null"),
        ({"negative_prompt": None}, "negative_prompt", "negative_prompt must be a string, got null"),
    ],
)
def test_null_where_a_field_takes_none_says_what_it_takes(client, body, param, message):
    """Most fields take null for "the default"; these have a value for a default and say so, in the caller's words
    (pydantic's "Input should be a valid number, got None" is not)."""
    refused = client.post("/v1/generations", json={"prompt": "x"} | body)
    assert refused.status_code == 422
    assert refused.json()["error"] == {"type": "invalid_request_error", "message": message, "param": param}


def test_a_size_is_refused_with_the_range_the_model_allows(client):
    """Not a generic 8..2048 that the model refuses in turn: its own multiple and maximum, whatever the value."""
    for width in (2049, 4, 0, 10**20):
        refused = client.post("/v1/generations", json={"prompt": "x", "width": width}).json()["error"]
        assert refused["param"] == "width", refused
        assert refused["message"] == f"width must be a multiple of 8 between 8 and 64, got {width}", refused


def test_a_missing_or_non_json_body_is_told_what_the_endpoint_takes(client):
    for path in ("/v1/generations", "/v1/trajectories", "/v1/images/generations"):
        refused = client.post(path)
        assert refused.status_code == 422 and refused.json()["error"] == {
            "type": "invalid_request_error",
            "message": "the request needs a body: a JSON object (Content-Type: application/json)",
            "param": None,
        }
    # what fetch() sends for a string body: text/plain
    refused = client.post("/v1/generations", content='{"prompt": "x"}', headers={"content-type": "text/plain"})
    assert refused.status_code == 422
    assert refused.json()["error"]["message"] == (
        "the body must be a JSON object sent as Content-Type: application/json, got a body of another Content-Type"
    ), refused.text
    refused = client.post(
        "/v1/generations", content=b'{"prompt": "caf\xe9"}', headers={"content-type": "application/json"}
    )
    assert refused.status_code == 422 and refused.json()["error"]["message"] == (
        "the body is not valid JSON: it is not UTF-8 text (a compressed body, Content-Encoding gzip or the like, is "
        "not accepted)"
    ), refused.text
    refused = client.post("/v1/generations", json=["x"])
    assert refused.json()["error"]["message"] == (
        "the body must be a JSON object sent as Content-Type: application/json, got ['x']"
    ), refused.text


def test_a_picture_count_past_every_bound_is_told_the_deployments(client):
    """The schema allows 16 pictures a job, this gateway 4: 17 and 5 are both told "between 1 and 4"."""
    for path, field in (("/v1/generations", "num_images"), ("/v1/images/generations", "n")):
        for count in (17, 5, 0):
            refused = client.post(path, json={"prompt": "x", field: count}).json()["error"]
            assert refused == {
                "type": "invalid_request_error",
                "message": f"{field} must be between 1 and 4, got {count}",
                "param": field,
            }


def test_a_long_value_is_echoed_cut_with_its_length(client):
    assert client.get("/v1/jobs/" + "j" * 5000).json()["error"]["message"] == f"no job '{'j' * 78}… (5000 characters)"
    refused = client.post("/v1/generations", json={"prompt": "x", "sampler": "s" * 300}).json()["error"]
    assert refused["param"] == "sampler" and refused["message"].endswith("… (300 characters)")


WEIRD_VALUES = [None, True, -1, 0, 2**63, 1e308, -0.0, 0.5, "", "x", "nan", "1e5", "é" * 600, [], [1], {}, {"a": 1},
                "512x512", "data:image/png;base64,AAAA", "aGVsbG8="]  # fmt: skip


def test_no_body_breaks_the_gateway_and_every_refusal_names_its_field(client):
    """Seeded single-field mutations of a valid body at every JSON endpoint: never a 5xx, and every 422 names
    the field it refuses, in its message and in `param`."""
    import random

    rnd = random.Random(7)
    schemas = client.app.openapi()["components"]["schemas"]
    for path, schema in (("/v1/generations", "GenerationCreate"), ("/v1/trajectories", "TrajectoryCreate"),
                         ("/v1/images/generations", "OpenAIImageRequest")):  # fmt: skip
        fields = list(schemas[schema]["properties"])
        base = {"prompt": "a red circle"} | ({"kind": "reverse"} if schema == "TrajectoryCreate" else {})
        for _ in range(150):
            body = dict(base)
            for field in rnd.sample(fields, rnd.choice([1, 1, 2])):
                body[field] = rnd.choice(WEIRD_VALUES)
            answer = client.post(path, json=body)
            assert answer.status_code in (200, 202, 404, 413, 422, 429, 503), (path, body, answer.text)
            if answer.status_code == 503:  # the OpenAI endpoint waits for a worker there is not
                assert "did not finish" in answer.json()["error"]["message"], answer.text
            if answer.status_code == 422:
                error = answer.json()["error"]
                if error["param"] is not None:
                    assert error["param"].split(".")[0] in error["message"], (body, error)


def test_openapi_documents_the_error_shape_the_gateway_answers_with(client):
    """Every 4xx and 5xx in the OpenAPI document is the one error shape (not FastAPI's default HTTPValidationError,
    which the gateway never sends), and what the gateway answers parses as it, so generated clients get it right."""
    from services.core.schemas import ErrorResponse

    spec = client.get("/openapi.json").json()
    documented = 0
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for code, response in operation["responses"].items():
                if code[0] in "45" and path != "/readyz":  # its 503 is the readiness report, as its 200
                    schema = response["content"]["application/json"]["schema"]
                    assert schema["$ref"] == "#/components/schemas/ErrorResponse", (method, path, code)
                    documented += 1
            if method == "post" and path.endswith(("generations", "trajectories")):
                assert {"401", "413", "422", "429", "503"} <= set(operation["responses"]), path
                assert "Retry-After" in operation["responses"]["429"]["headers"]
    assert documented > 30 and "HTTPValidationError" not in spec["components"]["schemas"]
    answers = [
        client.post("/v1/generations", json={"prompt": 5}),
        client.get("/v1/jobs/nope"),
        client.get("/v1/models", headers={"Authorization": "Bearer wrong"}),
        client.get("/v1/jobs/nope/images/x"),
    ]
    assert [answer.status_code for answer in answers] == [422, 404, 401, 422]
    for answer in answers:
        ErrorResponse.model_validate(answer.json())


def test_a_synchronous_openai_call_past_its_timeout_is_a_503_to_retry_and_its_job_is_cancelled(client):
    """No worker here: the call waits openai_timeout_s (1 s), then answers 503 with Retry-After like every 503,
    saying its job is cancelled, which it is (nobody is left to fetch its pictures)."""
    answer = client.post("/v1/images/generations", json={"prompt": "a red circle"})
    assert answer.status_code == 503 and answer.headers["retry-after"] == "7"
    message = answer.json()["error"]["message"]
    assert message.endswith("did not finish within 1 s (openai_timeout_s); it is cancelled"), message
    job = client.get("/v1/jobs", params={"limit": 1}).json()["jobs"][0]
    assert job["status"] == "cancelled" and message.startswith(f"job {job['id']} ")


def test_a_synchronous_openai_call_says_its_job_was_cancelled_or_refused_not_a_server_error(client):
    """The job behind a synchronous call can end without pictures: cancelled through the API (409, not a 500), or
    failed by the worker's own check of the request (422 naming the field, as the gateway's refusals do)."""
    import concurrent.futures

    store = JobStore.from_url(REDIS_URL)

    def newest() -> dict:
        while not (jobs := client.get("/v1/jobs", params={"limit": 1, "status": "queued"}).json()["jobs"]):
            time.sleep(0.02)
        return jobs[0]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(client.post, "/v1/images/generations", json={"prompt": "a red circle"})
        job = newest()
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
        answer = call.result(10)
        assert answer.status_code == 409, answer.text
        assert answer.json()["error"] == {
            "type": "conflict_error",
            "message": f"job {job['id']} was cancelled before it finished (POST /v1/jobs/{job['id']}/cancel)",
            "param": "id",
        }
        call = pool.submit(client.post, "/v1/images/generations", json={"prompt": "a red circle"})
        job = newest()
        taken, attempt = store.take("tiny", 15, "test-worker")
        error = {"type": "invalid_request_error", "message": "prompt is 99 tokens, over 77", "param": "prompt"}
        assert store.finish(store.get(taken), attempt, "failed", {"error": error}, ("failed", error))
        answer = call.result(10)
        assert answer.status_code == 422 and answer.json()["error"] == {
            "type": "invalid_request_error",
            "message": f"job {job['id']} failed: prompt is 99 tokens, over 77",
            "param": "prompt",
        }, answer.text


def test_a_path_or_method_no_endpoint_takes_is_said_in_the_error_shape(client):
    missing = client.get("/v1/jobs/a/b")
    assert missing.status_code == 404 and missing.json()["error"] == {
        "type": "not_found_error",
        "message": "no endpoint GET '/v1/jobs/a/b': the endpoints are listed at /docs",
        "param": None,
    }
    wrong = client.delete("/v1/jobs/x")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET"
    assert wrong.json()["error"]["message"] == "'/v1/jobs/x' takes GET, not DELETE: the endpoints are listed at /docs"


def test_a_cancel_answered_while_the_job_ran_wins_over_a_result_that_comes_after_it(client):
    """The cancel is answered 200 with the job still running (it stops at its next step); if its worker finishes
    the job first, the job ends cancelled all the same, with no images, as the 200 promised."""
    job = client.post("/v1/generations", json={"prompt": "a red circle", "num_inference_steps": 2}).json()
    store = JobStore.from_url(REDIS_URL)
    taken, attempt = store.take("tiny", 15, "test-worker")
    assert taken == job["id"]
    answered = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert answered.status_code == 200 and answered.json()["status"] == "running"
    fields = {"images": ["a1-image-0"], "timings": {"run_s": 0.5}, "progress": {"step": 2, "total": 2}}
    done = {"id": job["id"], "images": 1, "frames": 0}
    assert store.finish(store.get(taken), attempt, "succeeded", fields, ("succeeded", done), {"a1-image-0": b"png"})
    ended = store.get(taken)
    assert ended.status == "cancelled" and ended.images == [] and ended.timings == {"run_s": 0.5}
    assert store.blob(taken, "a1-image-0") is None
    names = [fields[b"event"] for _, fields in store.redis.xrange(f"latentd:job:{taken}:events")]
    assert names[-1] == b"cancelled" and b"succeeded" not in names


def test_a_trajectorys_params_hold_only_what_its_kind_reads(client):
    """A forward trajectory of a picture shows what is noised and how (no drawn seed or step count that nothing
    used); a reverse one no forward or sweep fields; the same rule (rules.trajectory_params) for both doors."""
    import base64
    import io

    from PIL import Image

    from services.common import protocol

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, "PNG")
    picture = base64.b64encode(buffer.getvalue()).decode()
    forward = client.post("/v1/trajectories", json={"kind": "forward", "image": picture, "timesteps": [0, 500]})
    assert forward.status_code == 202, forward.text
    assert forward.json()["params"] == {
        "kind": "forward",
        "model": "tiny",
        "width": 32,
        "height": 32,
        "timesteps": [0, 500],
        "noise_seed": 0,
        "space": "latent",
        "has_image": True,
    }
    store = JobStore.from_url(REDIS_URL)
    assert store.get(forward.json()["id"]).total_steps == 0  # its worker reports no denoising steps: it makes none
    assert protocol.params_from_proto(store.get(forward.json()["id"]).to_proto()) == forward.json()["params"]
    client.post(f"/v1/jobs/{forward.json()['id']}/cancel")  # (this gateway's queue holds two)
    for kind in ("forward", "reverse", "guidance_sweep"):
        job = client.post("/v1/trajectories", json={"kind": kind, "prompt": "x", "seed": 1}).json()
        client.post(f"/v1/jobs/{job['id']}/cancel")
        assert job["params"]["seed"] == 1 and ("guidance_scales" in job["params"]) == (kind == "guidance_sweep")
        assert ("trajectory_every" in job["params"]) == (kind == "reverse") and job["params"]["kind"] == kind
        assert ("guidance_scale" in job["params"]) == (kind != "guidance_sweep")
        assert protocol.params_from_proto(store.get(job["id"]).to_proto()) == job["params"], kind


def test_a_malformed_resume_point_is_refused_naming_the_header_or_query_it_came_in(client):
    job = client.post("/v1/generations", json={"prompt": "x"}).json()
    by_header = client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "garbage"})
    by_query = client.get(f"/v1/jobs/{job['id']}/events", params={"last_event_id": "1-2-3"})
    client.post(f"/v1/jobs/{job['id']}/cancel")
    assert by_header.status_code == by_query.status_code == 422
    assert by_header.json()["error"] == {
        "type": "invalid_request_error",
        "message": "Last-Event-ID must be an event id like 1700000000000-0, got 'garbage'",
        "param": "Last-Event-ID",
    }
    assert by_query.json()["error"]["param"] == "last_event_id"
    assert by_query.json()["error"]["message"].startswith("last_event_id must be an event id like")
