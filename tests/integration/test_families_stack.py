"""Each family end to end through the real stack (tests/conftest.py `families_stack`: one Celery worker serving the
tiny SDXL, SD3 and Flux folders, the gateway under uvicorn, the gRPC door): REST with SSE, gRPC, the `latentd`
command, /v1/models and ListModels telling each model's family, and the refusals the gateway makes per family."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from PIL import Image

from services.common.grpc_gen.latentd.v1 import latentd_pb2 as pb
from services.common.grpc_gen.latentd.v1 import latentd_pb2_grpc as pb_grpc
from tests.integration.sse import read_events

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[2]
FAMILIES = {"tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "tiny-flux": "flux"}
TERMINAL = ("succeeded", "failed", "cancelled")


def _picture_b64(size: int = 32) -> str:
    import base64

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


PICTURE = _picture_b64()  # the tiny families' native size


def auth(stack):
    return (("authorization", f"Bearer {stack.keys[0]}"),)


def post(stack, path: str, body: dict) -> httpx.Response:
    return httpx.post(stack.url + path, json=body, headers=stack.headers(), timeout=30)


def wait_job(stack, job_id: str, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{stack.url}/v1/jobs/{job_id}", headers=stack.headers(), timeout=10).json()
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not finished in {timeout_s} s")


def test_models_tell_each_family(families_stack):
    models = {
        m["id"]: m
        for m in httpx.get(families_stack.url + "/v1/models", headers=families_stack.headers()).json()["data"]
    }
    assert {name: m["family"] for name, m in models.items()} == FAMILIES
    sdxl, sd3, flux = models["tiny-sdxl"], models["tiny-sd3"], models["tiny-flux"]
    assert (sdxl["pipeline"], sd3["pipeline"], flux["pipeline"]) == (
        "StableDiffusionXLPipeline",
        "StableDiffusion3Pipeline",
        "FluxPipeline",
    )
    assert (sdxl["prediction_type"], sd3["prediction_type"], flux["prediction_type"]) == ("epsilon", "flow", "flow")
    assert (sd3["flow_shift"], sd3["dynamic_shift"], flux["flow_shift"], flux["dynamic_shift"]) == (
        3.0,
        False,
        None,
        True,
    )
    assert sd3["scheduler"] == "FlowMatchEulerDiscreteScheduler / shift 3"
    assert flux["scheduler"] == "FlowMatchEulerDiscreteScheduler / dynamic shift 0.5..1.15"
    assert (sdxl["guidance_form"], sd3["guidance_form"], flux["guidance_form"]) == ("cfg", "cfg", "distilled")
    assert (sdxl["true_cfg"], flux["true_cfg"]) == (False, True)
    assert (sd3["samplers"], flux["default_sampler"]) == (["flow_euler"], "flow_euler")
    assert (sdxl["default_guidance_scale"], sd3["default_num_inference_steps"], flux["max_prompt_tokens"]) == (
        5.0,
        28,
        32,
    )
    assert "crop_top" in sdxl["params"] and "true_cfg_scale" in flux["params"] and "eta" not in sd3["params"]
    assert all("tokenizer_class" not in m and "tokenizer_path" not in m for m in models.values())
    with grpc.insecure_channel(families_stack.grpc_target) as channel:
        listed = pb_grpc.LatentdServiceStub(channel).ListModels(pb.ListModelsRequest(), metadata=auth(families_stack))
    by_name = {m.name: m for m in listed.models}
    assert {name: m.family for name, m in by_name.items()} == FAMILIES
    assert by_name["tiny-sd3"].flow_shift == 3.0 and not by_name["tiny-flux"].HasField("flow_shift")
    assert by_name["tiny-flux"].guidance_form == "distilled" and by_name["tiny-flux"].true_cfg
    assert list(by_name["tiny-sdxl"].params) == sdxl["params"]
    assert by_name["tiny-sd3"].default_num_inference_steps == 28 and by_name["tiny-flux"].default_guidance_scale == 3.5
    # the image pipelines' default strengths, without and with a mask
    assert [(m["default_strength"], m["default_inpaint_strength"]) for m in (sdxl, sd3, flux)] == [
        (0.3, 0.9999),
        (0.6, 0.6),
        (0.6, 0.6),
    ]
    assert by_name["tiny-sdxl"].default_inpaint_strength == 0.9999 and by_name["tiny-flux"].default_strength == 0.6


FIELDS = {  # one request per family with what it alone reads
    "tiny-sdxl": {"eta": 0.5, "crop_top": 8, "original_width": 64, "original_height": 64, "negative_prompt": "blue"},
    "tiny-sd3": {"guidance_scale": 4.0},
    "tiny-flux": {"guidance_scale": 3.5, "true_cfg_scale": 2.0, "negative_prompt": "blue"},
}


@pytest.mark.parametrize("model", list(FAMILIES))
def test_each_family_generates_through_rest_grpc_and_the_cli(families_stack, model, tmp_path):
    body = {"model": model, "prompt": "a red circle", "num_inference_steps": 3, "seed": 4, **FIELDS[model]}
    created = post(families_stack, "/v1/generations", body)
    assert created.status_code == 202, created.text
    job = created.json()
    events = read_events(f"{families_stack.url}/v1/jobs/{job['id']}/events", families_stack.headers())
    assert [e["event"] for e in events] == ["queued", "started", "step", "step", "step", "succeeded"]
    done = wait_job(families_stack, job["id"])
    assert done["params"] | body == done["params"]  # the family's own fields kept as given
    png = httpx.get(families_stack.url + done["images"][0], headers=families_stack.headers()).content
    rest_picture = Image.open(io.BytesIO(png))
    assert rest_picture.size == (32, 32)

    params = pb.GenerationParams(model=model, prompt="a red circle", num_inference_steps=3, seed=4)
    for name, value in FIELDS[model].items():
        setattr(params, name, value)
    with grpc.insecure_channel(families_stack.grpc_target) as channel:
        stub = pb_grpc.LatentdServiceStub(channel)
        replies = list(stub.GenerateStream(pb.GenerateStreamRequest(params=params), metadata=auth(families_stack)))
        assert replies[-1].event.type == pb.EVENT_TYPE_SUCCEEDED
        grpc_png = stub.GetArtifact(
            pb.GetArtifactRequest(job_id=replies[0].job.id, kind=pb.ARTIFACT_KIND_IMAGE, index=0),
            metadata=auth(families_stack),
        ).data
    assert grpc_png == png  # the same request through either door: the same picture

    flags = {
        "tiny-sdxl": ["--eta", "0.5", "--crop", "8,0", "--original-size", "64x64", "--negative", "blue"],
        "tiny-sd3": ["--guidance", "4"],
        "tiny-flux": ["--guidance", "3.5", "--true-cfg", "2", "--negative", "blue"],
    }[model]
    out = tmp_path / "cli.png"
    env = os.environ | {
        "LATENTD_URL": f"grpc://{families_stack.grpc_target}",
        "LATENTD_API_KEY": families_stack.keys[0],
    }
    result = subprocess.run(
        [sys.executable, "-m", "client.latentd_client.cli", "generate", "a red circle", "--model", model]
        + ["--steps", "3", "--seed", "4", *flags, "-o", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == png


@pytest.mark.parametrize(
    "body,param,words",
    [
        ({"model": "tiny-sdxl", "true_cfg_scale": 2.0}, "true_cfg_scale", ["does not apply", "sdxl family"]),
        ({"model": "tiny-flux", "crop_top": 8}, "crop_top", ["does not apply", "flux family"]),
        ({"model": "tiny-sd3", "guidance_rescale": 0.7}, "guidance_rescale", ["does not apply", "sd3 family"]),
        ({"model": "tiny-sd3", "eta": 0.5}, "eta", ["ddim sampler only", "flow_euler"]),
        ({"model": "tiny-flux", "sampler": "euler"}, "sampler", ["one of flow_euler", "got 'euler'"]),
        ({"model": "tiny-sd3", "image": PICTURE, "strength": 0.0}, "strength", ["leaves none", "at least 0.0357"]),
        ({"model": "tiny-flux", "strength": 0.5}, "strength", ["applies to image to image only"]),
        ({"model": "tiny-sdxl", "image": _picture_b64(36)}, "image", ["image is 36x36", "multiple of 8"]),
        # the gateway counts with the model's T5 tokenizer: 40 words are 41 T5 tokens, past the fixture's 32
        ({"model": "tiny-sd3", "prompt": "red " * 40}, "prompt", ["41 tokens", "at most 32"]),
    ],
)
def test_the_gateway_refuses_per_family(families_stack, body, param, words):
    response = post(families_stack, "/v1/generations", {"prompt": "a red circle", **body})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and all(w in error["message"] for w in words), error


def _mask_b64() -> str:
    import base64

    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_image_to_image_and_inpainting_on_every_family_through_both_doors(families_stack):
    """Flux from a picture at strength 0.6 of 8 steps runs the 5 steps its pipeline runs (the flow pipelines'
    count): REST's step events say 5, and gRPC's first reply says so before the worker starts; the same request
    gives the same picture through either door. SDXL from a picture, SD3 inpainting with a mask."""
    body = {"model": "tiny-flux", "prompt": "a red circle", "num_inference_steps": 8, "seed": 2, "strength": 0.6}
    created = post(families_stack, "/v1/generations", body | {"image": PICTURE})
    assert created.status_code == 202, created.text
    events = read_events(f"{families_stack.url}/v1/jobs/{created.json()['id']}/events", families_stack.headers())
    steps = [e["data"] for e in events if e["event"] == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5] and {s["total"] for s in steps} == {5}
    rest = wait_job(families_stack, created.json()["id"])
    png = httpx.get(families_stack.url + rest["images"][0], headers=families_stack.headers()).content
    params = pb.GenerationParams(model="tiny-flux", prompt="a red circle", num_inference_steps=8, seed=2)
    params.strength = 0.6
    params.image = base64.b64decode(PICTURE)
    with grpc.insecure_channel(families_stack.grpc_target) as channel:
        stub = pb_grpc.LatentdServiceStub(channel)
        replies = list(stub.GenerateStream(pb.GenerateStreamRequest(params=params), metadata=auth(families_stack)))
        assert replies[0].job.total_steps == 5 and replies[-1].event.type == pb.EVENT_TYPE_SUCCEEDED
        grpc_png = stub.GetArtifact(
            pb.GetArtifactRequest(job_id=replies[0].job.id, kind=pb.ARTIFACT_KIND_IMAGE, index=0),
            metadata=auth(families_stack),
        ).data
    assert grpc_png == png

    for fields, strength in (
        ({"model": "tiny-sdxl", "image": PICTURE, "strength": 0.5}, 0.5),
        ({"model": "tiny-sd3", "image": PICTURE, "mask": _mask_b64(), "strength": 1.0, "guidance_scale": 4.0}, 1.0),
        ({"model": "tiny-sdxl", "image": PICTURE, "strength": None}, 0.3),  # the model's default, as its pipeline
    ):
        created = post(families_stack, "/v1/generations", body | {"num_inference_steps": 4} | fields)
        assert created.status_code == 202, created.text
        done = wait_job(families_stack, created.json()["id"])
        assert done["status"] == "succeeded" and done["params"]["has_mask"] == ("mask" in fields), done
        assert done["params"]["strength"] == strength

    # the OpenAI Images API's edits, as the openai client sends it (multipart), on a flow model
    edited = httpx.post(
        families_stack.url + "/v1/images/edits",
        headers=families_stack.headers(),
        files={"image": ("in.png", base64.b64decode(PICTURE), "image/png")},
        data={"model": "tiny-flux", "prompt": "a blue square", "n": "2", "response_format": "b64_json"}
        | {"num_inference_steps": "4", "strength": "0.5", "seed": "3"},
        timeout=120,
    )
    assert edited.status_code == 200, edited.text
    pictures = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in edited.json()["data"]]
    assert [p.size for p in pictures] == [(32, 32), (32, 32)]


def test_flow_trajectories_carry_sigma_through_both_doors(families_stack):
    forward = post(
        families_stack,
        "/v1/trajectories",
        {
            "kind": "forward",
            "model": "tiny-sd3",
            "prompt": "a red circle",
            "num_inference_steps": 2,
            "timesteps": [0, 500, 1000],
        },
    ).json()
    frames = wait_job(families_stack, forward["id"])["frames"]
    assert [f["sigma"] for f in frames] == [0.0, 0.5, 1.0] and all("alpha_bar" not in f for f in frames)
    params = pb.TrajectoryParams(
        kind=pb.TRAJECTORY_KIND_REVERSE,
        generation=pb.GenerationParams(model="tiny-flux", prompt="a red circle", num_inference_steps=2, seed=1),
        every=1,
    )
    with grpc.insecure_channel(families_stack.grpc_target) as channel:
        stub = pb_grpc.LatentdServiceStub(channel)
        job = stub.SubmitTrajectory(pb.SubmitTrajectoryRequest(params=params), metadata=auth(families_stack)).job
        events = list(stub.StreamJobEvents(pb.StreamJobEventsRequest(job_id=job.id), metadata=auth(families_stack)))
        assert events[-1].event.type == pb.EVENT_TYPE_SUCCEEDED
        done = stub.GetJob(pb.GetJobRequest(job_id=job.id), metadata=auth(families_stack)).job
    sigmas = [f.sigma for f in done.frames if f.what == "x_t"]
    assert len(sigmas) == 2 and sigmas[0] == 1.0 and 0 < sigmas[1] < 1
    assert not done.frames[0].HasField("alpha_bar") and json.loads(done.frames[0].metadata_json)["sigma"] == 1.0
