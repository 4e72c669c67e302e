"""`latentd` end to end as a subprocess: PNG out, trajectory frames + GIF, errors exit non-zero."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from client.latentd_client import Client
from tests.conftest import API_KEYS

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]


API_KEY = API_KEYS[0]


def latentd(url, *args, key=API_KEY):
    env = os.environ | {"LATENTD_URL": url, "LATENTD_API_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "client.latentd_client.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_generate_writes_a_png_with_progress(tmp_path, real_stack, transport):
    url = real_stack.url if transport == "rest" else f"grpc://{real_stack.grpc_target}"
    out = tmp_path / "out.png"
    result = latentd(
        url,
        "generate",
        "a red circle on a white background",
        "--steps",
        "5",
        "--guidance",
        "7.5",
        "--seed",
        "1",
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "5/5" in result.stderr and "succeeded" in result.stderr
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (64, 64)


def test_trajectory_writes_frames_gif_and_contact_sheet(tmp_path, real_stack):
    result = latentd(
        real_stack.url,
        "trajectory",
        "forward",
        "--prompt",
        "a blue square",
        "--steps",
        "2",
        "--timesteps",
        "0,250,500,999",
        "--out-dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.glob("frame-*.png")) == [f"frame-00{i}.png" for i in range(4)]
    with Image.open(tmp_path / "trajectory.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == 4
    with Image.open(tmp_path / "contact.png") as sheet:
        assert sheet.size[0] == 4 * 64


def test_errors_exit_nonzero_with_the_server_message(real_stack):
    result = latentd(real_stack.url, "generate", "x", "--steps", "0")
    assert result.returncode == 1
    assert "num_inference_steps must be between 1 and 1000, got 0" in result.stderr
    assert "Traceback" not in result.stderr
    for url in (real_stack.url, f"grpc://{real_stack.grpc_target}"):
        result = latentd(url, "generate", "x", "--guidance-start", "0.9", "--guidance-stop", "0.1")
        assert result.returncode == 1 and "guidance_stop must be between guidance_start (0.9) and 1" in result.stderr
    result = latentd(real_stack.url, "jobs", "get", "nope")
    assert result.returncode == 1 and "nope" in result.stderr
    assert latentd(real_stack.url, "models", key="wrong").returncode == 1


def test_jobs_and_models(real_stack):
    models = latentd(real_stack.url, "models")
    assert models.returncode == 0 and models.stdout.startswith(f"{real_stack.model}\t64x64")


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_jobs_list_shows_the_newest_first_one_per_line(real_stack, transport):
    url = real_stack.url if transport == "rest" else f"grpc://{real_stack.grpc_target}"
    with Client(real_stack.url, API_KEY) as client:
        job = client.wait(client.generate("a red circle", num_inference_steps=2).id, timeout=60)
    listed = latentd(url, "jobs", "list", "--limit", "1")
    assert listed.returncode == 0, listed.stderr
    fields = listed.stdout.rstrip("\n").split("\t")
    assert fields[:5] == [job.id, "generation", "succeeded", real_stack.model, "2/2"] and fields[5].endswith("Z")
    as_json = latentd(url, "jobs", "list", "--status", "succeeded,failed", "--limit", "1", "--json")
    assert json.loads(as_json.stdout)["id"] == job.id
    refused = latentd(url, "jobs", "list", "--status", "done")
    assert refused.returncode == 1 and "status must be one of queued, running" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_half_block_preview_draws_two_pixels_per_cell():
    import io

    from client.latentd_client.cli import half_blocks

    image = Image.new("RGB", (4, 4), (255, 0, 0))
    image.paste((0, 0, 255), (0, 2, 4, 4))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    art = half_blocks(buf.getvalue(), columns=4)
    lines = art.split("\n")
    assert len(lines) == 2 and lines[0].count("▀") == 4
    assert "38;2;255;0;0m" in lines[0] and "48;2;255;0;0m" in lines[0]
    assert "38;2;0;0;255m" in lines[1]


def test_jobs_watch_and_cancel(real_stack):
    with Client(real_stack.url, API_KEY) as client:
        job = client.generate("x", num_inference_steps=300)
    cancelled = latentd(real_stack.url, "jobs", "cancel", job.id)
    assert cancelled.returncode == 0, cancelled.stderr
    watched = latentd(real_stack.url, "jobs", "watch", job.id, "--json")
    lines = [json.loads(line) for line in watched.stdout.splitlines() if line.startswith('{"id"')]
    assert lines[0]["event"] == "queued" and lines[-1]["event"] == "cancelled"
    resumed = latentd(real_stack.url, "jobs", "watch", job.id, "--json", "--after", lines[0]["id"])
    assert [line for line in resumed.stdout.splitlines() if line.startswith('{"id"')] == [
        json.dumps(event) for event in lines[1:]
    ]


def test_progress_draws_previews_on_a_terminal(capsys):
    import base64
    import io

    from client.latentd_client.cli import Progress
    from client.latentd_client.types import JobEvent

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 200, 0)).save(buf, "PNG")
    event = JobEvent(
        "1-0", "step", {"step": 2, "total": 4, "timestep": 500, "preview": base64.b64encode(buf.getvalue()).decode()}
    )
    err = io.StringIO()
    show = Progress(out=err, draw_previews=True)
    show(event)
    show(event)
    drawn = capsys.readouterr().out
    assert drawn.count("38;2;0;200;0m") >= 32 and "\x1b[16F" in drawn  # second frame redrawn in place
    assert "2/4 t=500" in err.getvalue()


def test_a_shorter_progress_line_leaves_nothing_of_the_longer_one_before_it():
    """Each redraw covers the whole of the line before it, as a terminal shows it after a carriage return."""
    from client.latentd_client.cli import Progress
    from client.latentd_client.types import JobEvent

    err = io.StringIO()
    show = Progress(out=err, draw_previews=False)
    for step, timestep in ((1, 981), (2, 1)):
        show(JobEvent(f"{step}-0", "step", {"step": step, "total": 2, "timestep": timestep}))
    show(JobEvent("3-0", "frame", {"index": 3}))
    screen = ""
    for part in err.getvalue().split("\r")[1:]:  # what a carriage return leaves: the new text over the old
        screen = part + screen[len(part) :]
    assert screen.rstrip() == "frame 3"


def test_grpc_server_refuses_open_public_bind():
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTD_API_KEY")}
    result = subprocess.run(
        [sys.executable, "-m", "services.api.grpc_server", "--host", "0.0.0.0", "--port", "0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "no API keys are configured" in result.stderr


@pytest.mark.parametrize(
    "args, flag",
    [
        (["trajectory", "forward", "--prompt", "x", "--timesteps", "0,abc"], "--timesteps"),
        (["trajectory", "sweep", "--prompt", "x", "--scales", "1,x"], "--scales"),
        (["trajectory", "reverse", "--prompt", "x", "--image", "missing.png"], "--image"),
        (["generate", "x", "--image", "missing.png"], "--image"),
        (["generate", "x", "--crop", "1"], "--crop"),
        (["--timeout", "-1", "models"], "--timeout"),
        (["jobs", "list", "--limit", "x"], "--limit"),
    ],
)
def test_bad_local_arguments_are_usage_errors(args, flag):
    """Refused by argparse before any request (no server here): its usage line and exit 2, no traceback."""
    result = latentd("http://127.0.0.1:9", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"error: argument {flag}: " in result.stderr


@pytest.mark.parametrize(
    "args, says",
    [
        (["jobs", "get"], "jobs get needs a JOB_ID"),
        (["jobs", "list", "abc"], "jobs list does not take JOB_ID"),
        (["jobs", "list", "--all", "--limit", "5"], "jobs list does not take --limit with --all"),
        (["jobs", "list", "--limit", "0"], "argument --limit: must be at least 1, got 0"),
        (["jobs", "get", "abc", "--status", "running"], "jobs get does not take --status"),
        (["jobs", "cancel", "abc", "--after", "1-0"], "jobs cancel does not take --after"),
    ],
)
def test_a_jobs_flag_its_action_would_ignore_is_a_usage_error(args, says):
    result = latentd("http://127.0.0.1:9", *args)
    assert result.returncode == 2 and f"error: {says}" in result.stderr, result.stderr


def test_a_reader_that_goes_away_stops_the_cli_quietly(real_stack):
    """`latentd jobs list | head`: the pipe closes before the CLI writes; it ends as a Unix tool does, no traceback."""
    env = os.environ | {"LATENTD_URL": real_stack.url, "LATENTD_API_KEY": API_KEY}
    command = [sys.executable, "-m", "client.latentd_client.cli", "jobs", "list", "--limit", "5"]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the first job is printed (the CLI is still starting)
    stderr = proc.stderr.read()
    assert proc.wait(60) == 141 and stderr == "", stderr


def test_watching_a_job_that_ends_without_its_images_exits_non_zero(real_stack):
    with Client(real_stack.url, API_KEY) as client:
        job = client.generate("x", num_inference_steps=300)
        client.cancel(job.id)
    watched = latentd(real_stack.url, "jobs", "watch", job.id)
    assert watched.returncode == 1 and json.loads(watched.stdout)["status"] == "cancelled", watched.stderr


def test_picture_flags_take_a_job_image_reference(tmp_path, real_stack):
    """trajectory --image JOB_ID:INDEX sends the reference {job_id, index}, as generate does (it read a file)."""
    from client.latentd_client.cli import build_parser

    args = build_parser().parse_args(["trajectory", "reverse", "--prompt", "x", "--image", "abc:1", "--mask", "abc:"])
    assert args.image == {"job_id": "abc", "index": 1} and args.mask == {"job_id": "abc", "index": 0}
    with Client(real_stack.url, API_KEY) as client:
        source = client.generate("x", num_inference_steps=2)
        client.wait(source.id, timeout=60)
    for url, kind in (
        (real_stack.url, "reverse"),
        (real_stack.url, "sweep"),
        (f"grpc://{real_stack.grpc_target}", "reverse"),
    ):
        result = latentd(
            url,
            *("trajectory", kind, "--prompt", "x", "--steps", "2", "--image", f"{source.id}:0", "-q"),
            *("--out-dir", str(tmp_path / kind / url[:4])),
        )
        assert result.returncode == 0, (url, result.stderr)
        job_id = result.stderr.split()[1]
        with Client(real_stack.url, API_KEY) as client:
            assert client.get_job(job_id).params["has_image"] is True  # started from the source's image


@pytest.mark.parametrize("output_format, name", [("webp", "out.webp"), ("jpeg", "out.jpeg"), (None, "out.png")])
def test_the_default_output_name_follows_the_format(tmp_path, real_stack, output_format, name):
    command = [sys.executable, "-m", "client.latentd_client.cli", "generate", "x", "--steps", "2", "-q"]
    env = os.environ | {"LATENTD_URL": real_stack.url, "LATENTD_API_KEY": API_KEY, "PYTHONPATH": str(REPO)}
    flags = ["--format", output_format] if output_format else []
    result = subprocess.run(command + flags, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [name]
    with Image.open(tmp_path / name) as image:
        assert image.format == (output_format or "png").upper()


@pytest.mark.parametrize("job_id", ["../models", "../../readyz", "..", "?limit=1", "a/b", "%2e%2e"])
def test_a_job_id_is_one_path_segment_whatever_it_holds(real_stack, job_id):
    """The CLI (the REST client under it) sends the id as one escaped segment: another endpoint is never reached,
    the answer is the gateway's 'no job' (or, for an id holding a slash, that no endpoint has that path)."""
    result = latentd(real_stack.url, "jobs", "get", job_id)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    says = "no job" if "/" not in job_id else "no endpoint GET '/v1/jobs/"  # the id's own slashes: no route
    assert f"latentd: error: {says}" in result.stderr, result.stderr
