"""End to end against the real stack: gateway (uvicorn) -> Redis -> Celery worker (threads) -> engine -> SSE."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import pytest
from PIL import Image

from tests.integration.sse import read_events

TERMINAL = ("succeeded", "failed", "cancelled")


def submit(stack, body: dict, key_index: int = 0, path: str = "/v1/generations") -> dict:
    response = httpx.post(stack.url + path, json=body, headers=stack.headers(stack.keys[key_index]), timeout=30)
    assert response.status_code == 202, response.text
    return response.json()


def wait_job(stack, job_id: str, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{stack.url}/v1/jobs/{job_id}", headers=stack.headers(), timeout=10).json()
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not finished in {timeout_s} s: {job}")


def test_submit_streams_every_step_then_the_image(real_stack):
    job = submit(real_stack, {"prompt": "a red circle", "num_inference_steps": 6, "seed": 7, "preview_every": 3})
    assert job["status"] == "queued" and job["params"]["seed"] == 7
    events = read_events(f"{real_stack.url}/v1/jobs/{job['id']}/events", real_stack.headers())
    names = [e["event"] for e in events]
    assert names == ["queued", "started"] + ["step"] * 6 + ["succeeded"], names
    steps = [e["data"] for e in events if e["event"] == "step"]
    assert [s["step"] for s in steps] == list(range(1, 7)) and {s["total"] for s in steps} == {6}
    timesteps = [s["timestep"] for s in steps]
    assert timesteps == sorted(timesteps, reverse=True)
    assert [("preview" in s) for s in steps] == [False, False, True, False, False, True]
    ids = [e["id"] for e in events]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    done = httpx.get(f"{real_stack.url}/v1/jobs/{job['id']}", headers=real_stack.headers()).json()
    assert done["status"] == "succeeded" and done["progress"] and done["timings"]["run_s"] > 0
    image = httpx.get(real_stack.url + done["images"][0], headers=real_stack.headers())
    assert image.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(image.content))
    assert picture.size == (done["params"]["width"], done["params"]["height"])


def test_same_seed_gives_the_same_picture_and_the_seed_is_reported(real_stack):
    body = {"prompt": "a blue square", "num_inference_steps": 3}
    first = wait_job(real_stack, submit(real_stack, body)["id"])
    again = wait_job(real_stack, submit(real_stack, dict(body, seed=first["params"]["seed"]))["id"])
    other = wait_job(real_stack, submit(real_stack, dict(body, seed=first["params"]["seed"] + 1))["id"])
    fetch = lambda job: httpx.get(real_stack.url + job["images"][0], headers=real_stack.headers()).content  # noqa: E731
    pixels = lambda job: Image.open(io.BytesIO(fetch(job))).tobytes()  # noqa: E731
    assert pixels(first) == pixels(again)
    assert pixels(first) != pixels(other)


def test_resume_with_last_event_id_misses_nothing(real_stack):
    job = submit(real_stack, {"prompt": "two dots", "num_inference_steps": 5})
    url = f"{real_stack.url}/v1/jobs/{job['id']}/events"
    first = read_events(url, real_stack.headers(), stop_after=4)  # the reader drops after 4 events
    rest = read_events(url, real_stack.headers(), last_event_id=first[-1]["id"])
    everything = read_events(url, real_stack.headers())
    assert [e["id"] for e in first + rest] == [e["id"] for e in everything]
    assert rest[-1]["event"] == "succeeded"
    via_query = read_events(f"{url}?last_event_id={first[1]['id']}", real_stack.headers())
    assert [e["id"] for e in via_query] == [e["id"] for e in everything[2:]]


def test_cancel_takes_a_running_job_out_at_the_next_step(real_stack):
    job = submit(real_stack, {"prompt": "slow", "num_inference_steps": 400})
    url = f"{real_stack.url}/v1/jobs/{job['id']}/events"
    read_events(url, real_stack.headers(), stop_after=3)  # queued, started, first step: it is running
    response = httpx.post(f"{real_stack.url}/v1/jobs/{job['id']}/cancel", headers=real_stack.headers())
    assert response.status_code == 200
    events = read_events(url, real_stack.headers())
    assert events[-1]["event"] == "cancelled"
    done = wait_job(real_stack, job["id"])
    assert done["status"] == "cancelled" and done["images"] == []
    assert max(e["data"]["step"] for e in events if e["event"] == "step") < 400
    # a finished job cannot be cancelled
    finished = wait_job(real_stack, submit(real_stack, {"prompt": "quick", "num_inference_steps": 2})["id"])
    again = httpx.post(f"{real_stack.url}/v1/jobs/{finished['id']}/cancel", headers=real_stack.headers())
    assert again.status_code == 409 and again.json()["error"]["param"] == "id"


def test_cancel_right_after_submit_never_succeeds(real_stack):
    job = submit(real_stack, {"prompt": "never mind", "num_inference_steps": 50})
    httpx.post(f"{real_stack.url}/v1/jobs/{job['id']}/cancel", headers=real_stack.headers())
    done = wait_job(real_stack, job["id"])
    assert done["status"] == "cancelled" and done["images"] == []
    events = read_events(f"{real_stack.url}/v1/jobs/{job['id']}/events", real_stack.headers())
    assert [e["event"] for e in events if e["event"] in TERMINAL] == ["cancelled"]


def test_another_keys_job_is_invisible(real_stack):
    job = wait_job(real_stack, submit(real_stack, {"prompt": "mine", "num_inference_steps": 2})["id"])
    bob = real_stack.headers(real_stack.keys[1])
    for method, path in (("GET", ""), ("GET", "/events"), ("GET", "/images/0"), ("POST", "/cancel")):
        response = httpx.request(method, f"{real_stack.url}/v1/jobs/{job['id']}{path}", headers=bob)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"]["type"] == "not_found_error"
    anonymous = httpx.get(f"{real_stack.url}/v1/jobs/{job['id']}")
    assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "authentication_error"
    wrong = httpx.get(f"{real_stack.url}/v1/jobs/{job['id']}", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401


def _png_b64(size=(40, 40)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


BAD_INPUTS = [  # (path, body, status, param, words the message must hold)
    (
        "/v1/generations",
        {"prompt": "x", "num_inference_steps": 0},
        422,
        "num_inference_steps",
        ["between 1 and 1000", "0"],
    ),
    ("/v1/generations", {"prompt": "x", "guidance_scale": -1}, 422, "guidance_scale", ["between 0 and 100", "-1"]),
    ("/v1/generations", {"prompt": "x", "width": 63}, 422, "width", ["multiple of", "63"]),
    ("/v1/generations", {"prompt": "word " * 200}, 422, "prompt", ["tokens", "at most"]),
    ("/v1/generations", {"prompt": "x", "num_images": 100}, 422, "num_images", ["between 1 and", "100"]),
    ("/v1/generations", {"prompt": "x", "colour": "red"}, 422, "colour", ["unknown field"]),
    ("/v1/generations", {"prompt": "x", "num_inference_steps": "many"}, 422, "num_inference_steps", ["integer"]),
    ("/v1/generations", {"prompt": "x", "model": "no-such-model"}, 404, "model", ["unknown model"]),
    ("/v1/generations", {"num_inference_steps": 5}, 422, "prompt", ["required"]),
    ("/v1/trajectories", {"kind": "forward", "image": "bm90IGFuIGltYWdl"}, 422, "image", ["PNG or JPEG"]),
    ("/v1/trajectories", {"kind": "forward", "image": "%%%"}, 422, "image", ["base64"]),
    (
        "/v1/trajectories",
        {"kind": "forward", "image": _png_b64(), "timesteps": [0, 1001]},
        422,
        "timesteps.1",
        ["between 0 and", "1001"],
    ),
    ("/v1/trajectories", {"kind": "forward", "image": _png_b64(), "timesteps": [-1]}, 422, "timesteps.0", ["-1"]),
    ("/v1/trajectories", {"kind": "sideways", "prompt": "x"}, 422, "kind", ["forward"]),
    (
        "/v1/trajectories",
        {"kind": "guidance_sweep", "prompt": "x", "guidance_scales": [1, -2]},
        422,
        "guidance_scales.1",
        ["between 0 and 100"],
    ),
]


@pytest.mark.parametrize(
    "path,body,status,param,words",
    BAD_INPUTS,
    ids=[f"{p.rsplit('/', 1)[1]}-{i}" for i, (p, *_rest) in enumerate(BAD_INPUTS)],
)
def test_bad_input_names_the_field_and_range(real_stack, path, body, status, param, words):
    response = httpx.post(real_stack.url + path, json=body, headers=real_stack.headers(), timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"type", "message", "param"}
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error
    assert "Traceback" not in response.text
    assert httpx.get(real_stack.url + "/readyz").status_code == 200


def test_unknown_job_and_broken_json(real_stack):
    missing = httpx.get(f"{real_stack.url}/v1/jobs/does-not-exist", headers=real_stack.headers())
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "id"
    broken = httpx.post(
        real_stack.url + "/v1/generations",
        content=b"{not json",
        headers=dict(real_stack.headers(), **{"content-type": "application/json"}),
    )
    assert broken.status_code == 422 and "error" in broken.json()
    assert httpx.get(real_stack.url + "/readyz").status_code == 200


def test_models_lists_what_a_live_worker_serves(real_stack):
    body = httpx.get(real_stack.url + "/v1/models", headers=real_stack.headers()).json()
    [model] = body["data"]
    assert model["name"] == real_stack.model and model["workers"] >= 1
    assert model["native_width"] > 0 and "DDIM" in model["scheduler"]


def test_trajectories_forward_reverse_and_sweep(real_stack):
    T = httpx.get(real_stack.url + "/v1/models", headers=real_stack.headers()).json()["data"][0]["num_train_timesteps"]
    forward = wait_job(
        real_stack,
        submit(
            real_stack,
            {"kind": "forward", "image": _png_b64(), "noise_seed": 3, "space": "pixel"},
            path="/v1/trajectories",
        )["id"],
    )
    assert forward["status"] == "succeeded", forward["error"]
    ts = [f["timestep"] for f in forward["frames"]]
    assert ts[0] == 0 and ts[-1] == T and len(ts) == len(set(ts))
    bars = [f["alpha_bar"] for f in forward["frames"]]
    assert bars[0] == 1.0 and all(a > b for a, b in zip(bars, bars[1:]))
    frame = httpx.get(real_stack.url + forward["frames"][0]["url"], headers=real_stack.headers())
    assert Image.open(io.BytesIO(frame.content)).getpixel((5, 5))[0] > 150  # t=0 is the red upload itself

    reverse_id = submit(
        real_stack,
        {"kind": "reverse", "prompt": "x", "num_inference_steps": 4, "trajectory_every": 2},
        path="/v1/trajectories",
    )["id"]
    events = read_events(f"{real_stack.url}/v1/jobs/{reverse_id}/events", real_stack.headers())
    reverse = wait_job(real_stack, reverse_id)
    assert reverse["status"] == "succeeded", reverse["error"]
    assert [(f["step"], f["what"]) for f in reverse["frames"]] == [
        (2, "x_t"),
        (2, "x0_pred"),
        (4, "x_t"),
        (4, "x0_pred"),
    ]
    # frames stream live: step 2's frames come right after step 2, before step 3, once each
    order = [
        (e["event"], e["data"].get("step"), e["data"].get("index")) for e in events if e["event"] in ("step", "frame")
    ]
    assert order[order.index(("step", 2, None)) + 1 :][:2] == [("frame", 2, 0), ("frame", 2, 1)]
    assert sum(e["event"] == "frame" for e in events) == 4
    frame_url = next(e["data"]["url"] for e in events if e["event"] == "frame" and e["data"]["index"] == 3)
    assert httpx.get(real_stack.url + frame_url, headers=real_stack.headers()).content[:4] == b"\x89PNG"

    events_url = None
    sweep = submit(
        real_stack,
        {
            "kind": "guidance_sweep",
            "prompt": "a large red circle on a white background",
            "num_inference_steps": 3,
            "seed": 5,
        },
        path="/v1/trajectories",
    )
    events_url = f"{real_stack.url}/v1/jobs/{sweep['id']}/events"
    events = read_events(events_url, real_stack.headers())
    sweep = wait_job(real_stack, sweep["id"])
    assert sweep["status"] == "succeeded", sweep["error"]
    assert [f["guidance_scale"] for f in sweep["frames"]] == [0, 1, 3, 7.5, 15]
    assert sum(e["event"] == "frame" for e in events) == 5
    pictures = {httpx.get(real_stack.url + f["url"], headers=real_stack.headers()).content for f in sweep["frames"]}
    assert len(pictures) > 1  # the scales change the picture


def test_openai_client_generates_images(real_stack):
    import openai

    client = openai.OpenAI(base_url=real_stack.url + "/v1", api_key=real_stack.keys[0], max_retries=0, timeout=120)
    response = client.images.generate(
        prompt="a green triangle", n=2, response_format="b64_json", extra_body={"num_inference_steps": 3, "seed": 11}
    )
    assert len(response.data) == 2
    pictures = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in response.data]
    assert pictures[0].format == "PNG" and pictures[0].tobytes() != pictures[1].tobytes()
    by_url = client.images.generate(
        prompt="a green triangle", n=1, response_format="url", extra_body={"num_inference_steps": 3, "seed": 11}
    )
    # the URL is on LATENTD_PUBLIC_URL (the test stack's: another name for its address), not on the Host it was
    # asked with, which the caller chooses
    assert by_url.data[0].url.startswith(real_stack.url.replace("127.0.0.1", "localhost") + "/v1/jobs/")
    fetched = httpx.get(by_url.data[0].url, headers=real_stack.headers())
    again = Image.open(io.BytesIO(fetched.content)).tobytes()
    # the same seed gives the same picture; batched with a second image, float sums may differ by one level
    assert max(abs(a - b) for a, b in zip(again, pictures[0].tobytes())) <= 2
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.images.generate(prompt="x", size="63x63")
    assert "multiple of" in str(caught.value)


def test_sigkill_mid_job_is_requeued_when_its_lease_lapses_and_finishes_exactly_once(real_stack):
    job = submit(real_stack, {"prompt": "survivor", "num_inference_steps": 12})
    url = f"{real_stack.url}/v1/jobs/{job['id']}/events"
    read_events(url, real_stack.headers(), stop_after=4)  # it is running: two steps done
    real_stack.kill_worker()
    time.sleep(0.5)
    assert (
        httpx.get(f"{real_stack.url}/v1/jobs/{job['id']}", headers=real_stack.headers()).json()["status"] == "running"
    )
    real_stack.start_worker()  # its reaper finds the lapsed lease; the broker's visibility timeout is an hour
    done = wait_job(real_stack, job["id"], timeout_s=120)
    assert done["status"] == "succeeded" and done["attempt"] == 2
    events = read_events(url, real_stack.headers())
    assert sum(e["event"] == "succeeded" for e in events) == 1
    assert sum(e["event"] == "started" for e in events) == 2
    requeued = [e["data"] for e in events if e["event"] == "queued" and e["data"].get("requeued")]
    assert len(requeued) == 1 and "lease" in requeued[0]["reason"]
    last_start = max(i for i, e in enumerate(events) if e["event"] == "started")
    assert [e["data"]["step"] for e in events[last_start:] if e["event"] == "step"] == list(range(1, 13))
    from scripts.run_stack import wait_ready

    wait_ready(real_stack.url, timeout_s=120)


def test_every_frame_can_be_fetched_as_soon_as_its_event_arrives(real_stack):
    """Forward and sweep frames are stored before their events go out, as reverse frames are."""
    for body in (
        {"kind": "guidance_sweep", "prompt": "a red circle", "num_inference_steps": 2, "guidance_scales": [1, 7.5]},
        {"kind": "forward", "prompt": "a red circle", "num_inference_steps": 2, "timesteps": [0, 500, 1000]},
    ):
        job = submit(real_stack, body, path="/v1/trajectories")
        url = f"{real_stack.url}/v1/jobs/{job['id']}/events"
        headers = real_stack.headers()
        with httpx.stream("GET", url, headers=headers, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data:") and '"url"' in line:
                    frame_url = json.loads(line[5:])["url"]
                    picture = httpx.get(real_stack.url + frame_url, headers=headers, timeout=10)
                    assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG"), frame_url
                if line.startswith("event: succeeded"):
                    break


def test_models_list_their_queue_depth_and_the_default(real_stack):
    models = httpx.get(f"{real_stack.url}/v1/models", headers=real_stack.headers(), timeout=10).json()["data"]
    (model,) = [m for m in models if m["name"] == real_stack.model]
    assert model["default"] is True and model["queue_depth"] >= 0 and model["workers"] >= 1


def test_a_request_picks_its_sampler_and_the_model_lists_them(real_stack):
    models = httpx.get(f"{real_stack.url}/v1/models", headers=real_stack.headers(), timeout=10).json()["data"]
    (model,) = [m for m in models if m["name"] == real_stack.model]
    assert "dpmpp_2m" in model["samplers"] and model["default_sampler"] in model["samplers"]
    body = {"prompt": "a red circle", "num_inference_steps": 4, "sampler": "dpmpp_2m", "guidance_rescale": 0.5}
    done = wait_job(real_stack, submit(real_stack, body)["id"])
    assert done["status"] == "succeeded" and done["params"]["sampler"] == "dpmpp_2m"
    defaults = {"guidance_start": model["default_guidance_start"], "guidance_stop": model["default_guidance_stop"]}
    assert {k: done["params"][k] for k in defaults} == defaults  # the model's (models/shapes-ldm/latentd.json)
    interval = {"guidance_start": 0.25, "guidance_stop": 0.75}
    done = wait_job(real_stack, submit(real_stack, body | interval)["id"])
    assert done["status"] == "succeeded" and {k: done["params"][k] for k in interval} == interval
    refused = httpx.post(
        real_stack.url + "/v1/generations",
        json={"prompt": "x", "sampler": "euler", "eta": 0.5},
        headers=real_stack.headers(),
        timeout=10,
    )
    assert refused.status_code == 422 and refused.json()["error"] == {
        "type": "invalid_request_error",
        "message": "eta applies to the ddim sampler only; got eta 0.5 with sampler 'euler'",
        "param": "eta",
    }
