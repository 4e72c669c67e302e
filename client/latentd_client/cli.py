"""`latentd`: the command line of latentd (REST by default; grpc://host:port URLs use gRPC).

    latentd generate "a red circle on a white background" --steps 50 --guidance 7.5 --seed 1 -o out.png
    latentd generate "a blue circle on a white background" --image out.png --strength 0.6 [--mask mask.png] -o edit.png
    latentd trajectory forward --prompt "a blue square" --seed 3 --out-dir frames/
    latentd jobs get|cancel|watch JOB_ID
    latentd jobs list [--status running,queued] [--limit 20 | --all]
    latentd models
URL and key: --url / --api-key, or LATENTD_URL / LATENTD_API_KEY.
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from services.common import rules

from .client import DEFAULT_URL, Client
from .errors import JobFailedError, LatentdError
from .types import Job, JobEvent

PREVIEW_COLUMNS = 32


# ---- terminal drawing ---------------------------------------------------------------------
def progress_line(event: JobEvent, width: int = 30) -> str:
    step, total = event.step or 0, event.total or 0
    filled = int(width * step / total) if total else 0
    extra = f" t={event.data['timestep']}" if "timestep" in event.data else ""
    return f"[{'#' * filled}{'.' * (width - filled)}] {step}/{total}{extra}"


def half_blocks(png: bytes, columns: int = PREVIEW_COLUMNS) -> str:
    """The picture as ANSI 24-bit half blocks: one character = two pixels stacked (▀ fg over bg)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    rows = max(2, round(image.height * columns / image.width / 2) * 2)
    pixels = image.resize((columns, rows)).load()
    lines = []
    for y in range(0, rows, 2):
        cells = []
        for x in range(columns):
            (r1, g1, b1), (r2, g2, b2) = pixels[x, y], pixels[x, y + 1]
            cells.append(f"\x1b[38;2;{r1};{g1};{b1}m\x1b[48;2;{r2};{g2};{b2}m▀")
        lines.append("".join(cells) + "\x1b[0m")
    return "\n".join(lines)


def _preview_bytes(event: JobEvent) -> bytes | None:
    preview = event.preview
    if not isinstance(preview, str):
        return None
    try:
        return base64.b64decode(preview.split(",", 1)[-1])
    except ValueError:
        return None


class Progress:
    """Live progress from step events on stderr; previews drawn on stdout when it is a terminal."""

    def __init__(self, out: TextIO = sys.stderr, draw_previews: bool | None = None):
        self.out = out
        self.draw_previews = sys.stdout.isatty() if draw_previews is None else draw_previews
        self.preview_height = 0
        self.width = 0  # of the line drawn last: a shorter one is padded over it

    def redraw(self, line: str) -> None:
        """`line` in place of the last one, none of which is left showing after it."""
        self.out.write("\r" + line.ljust(self.width))
        self.width = len(line)

    def __call__(self, event: JobEvent) -> None:
        if event.type == "step":
            png = _preview_bytes(event) if self.draw_previews else None
            if png:
                art = half_blocks(png)
                if self.preview_height:
                    sys.stdout.write(f"\x1b[{self.preview_height}F")
                sys.stdout.write(art + "\n")
                sys.stdout.flush()
                self.preview_height = art.count("\n") + 1
            self.redraw(progress_line(event))
        elif event.type == "frame":
            self.redraw(f"frame {event.data.get('index', '?')}")
        elif event.terminal:
            self.out.write(f"\n{event.type}\n")
            self.width = 0
        else:
            self.redraw(event.type)
        self.out.flush()


def follow(client: Client, job_id: str, show: Progress | None) -> Job:
    for event in client.events(job_id):
        if show:
            show(event)
    job = client.get_job(job_id)
    if job.status != "succeeded":
        message = (job.error or {}).get("message") or f"job {job.id} {job.status}"
        raise JobFailedError(message, job, type=(job.error or {}).get("type"))
    return job


def _numbered(path: Path, index: int, count: int) -> Path:
    return path if count == 1 else path.with_name(f"{path.stem}-{index}{path.suffix}")


# ---- commands -----------------------------------------------------------------------------
def cmd_generate(client: Client, args) -> int:
    job = client.generate(
        args.prompt,
        negative_prompt=args.negative,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        eta=args.eta,
        seed=args.seed,
        width=args.width,
        height=args.height,
        num_images=args.num_images,
        output_format=args.format,
        preview_every=args.preview_every,
        model=args.model,
        sampler=args.sampler,
        guidance_rescale=args.guidance_rescale,
        guidance_start=args.guidance_start,
        guidance_stop=args.guidance_stop,
        webhook_url=args.webhook_url,
        **family_fields(args),
        **picture_fields(args),
    )
    print(f"job {job.id} queued (seed {job.seed})", file=sys.stderr)
    job = follow(client, job.id, None if args.quiet else Progress())
    out = Path(args.output or default_output(args.format))
    out.parent.mkdir(parents=True, exist_ok=True)
    for artifact in job.images:
        path = _numbered(out, artifact.index, len(job.images))
        path.write_bytes(client.image(job.id, artifact.index))
        print(path)
    return 0


def default_output(output_format: str | None) -> str:
    """out.png, or out.jpeg / out.webp: the name says what the bytes are (the server's default format is PNG)."""
    return f"out.{output_format or 'png'}"


# ---- argument types: a bad value is argparse's own error (usage, "latentd ...: error: argument --x: ...", exit 2)
def _two_ints(example: str):
    """The type of "WIDTHxHEIGHT" (or "TOP,LEFT" for --crop): two ints."""

    def two_ints(text: str) -> tuple[int, int]:
        parts = text.replace(",", "x").split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise argparse.ArgumentTypeError(f"takes two integers, e.g. {example}; got {text!r}")
        return int(parts[0]), int(parts[1])

    return two_ints


def _list_of(convert, noun: str):
    """The type of a comma-separated list, e.g. --timesteps 0,250,999."""

    def list_of(text: str) -> list:
        try:
            return [convert(item) for item in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes comma-separated {noun}; got {text!r}") from None

    return list_of


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"takes a number of seconds > 0; got {text!r}")
    return value


def family_fields(args) -> dict[str, Any]:
    """The fields of some model families only (`latentd models` lists what each model reads)."""
    original_width, original_height = args.original_size or (None, None)
    target_width, target_height = args.target_size or (None, None)
    crop_top, crop_left = args.crop or (None, None)
    return dict(
        true_cfg_scale=args.true_cfg,
        original_width=original_width,
        original_height=original_height,
        crop_top=crop_top,
        crop_left=crop_left,
        target_width=target_width,
        target_height=target_height,
    )


def _picture(value: str) -> bytes | dict[str, Any]:
    """The type of a picture flag: a file's bytes, or JOB_ID:INDEX (an earlier job's image; JOB_ID: for its
    first), sent as the reference {"job_id", "index"}."""
    path = Path(value)
    if path.is_file():
        return path.read_bytes()
    job_id, sep, index = value.partition(":")
    if sep and job_id and (index == "" or index.isdigit()):
        return {"job_id": job_id, "index": int(index or 0)}
    raise argparse.ArgumentTypeError(
        f"takes a PNG or JPEG file, or JOB_ID:INDEX of an earlier job's image; got {value!r}"
    )


def picture_fields(args) -> dict[str, Any]:
    """Image to image and inpainting (`latentd models` lists what each model reads)."""
    return dict(image=args.image, strength=args.strength, mask=args.mask)


def _frame_label(frame_meta: dict[str, Any], index: int) -> str:
    if "sigma" in frame_meta and "step" not in frame_meta:  # a flow model's forward frame
        return f"sigma={frame_meta['sigma']:.2f}"
    for key in ("timestep", "guidance_scale", "step"):
        if key in frame_meta:
            return f"{key}={frame_meta[key]}"
    return str(index)


def write_frames(frames: list[bytes], labels: list[str], out_dir: Path, gif_ms: int = 200) -> list[Path]:
    """frame-NNN.png, an animated trajectory.gif and a contact sheet contact.png."""
    from PIL import Image, ImageDraw

    out_dir.mkdir(parents=True, exist_ok=True)
    images, written = [], []
    for i, data in enumerate(frames):
        path = out_dir / f"frame-{i:03d}.png"
        path.write_bytes(data)
        written.append(path)
        images.append(Image.open(io.BytesIO(data)).convert("RGB"))
    if not images:
        return written
    gif = out_dir / "trajectory.gif"
    images[0].save(gif, save_all=True, append_images=images[1:], duration=gif_ms, loop=0)
    w, h = images[0].size
    cols = min(len(images), 8)
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * w, rows * (h + 12)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y = (i % cols) * w, (i // cols) * (h + 12)
        sheet.paste(image.resize((w, h)), (x, y))
        draw.text((x + 2, y + h), label, fill="black")
    contact = out_dir / "contact.png"
    sheet.save(contact)
    return written + [gif, contact]


def cmd_trajectory(client: Client, args) -> int:
    kind = {"forward": "forward", "reverse": "reverse", "sweep": "guidance_sweep"}[args.kind]
    fields: dict[str, Any] = dict(
        prompt=args.prompt,
        negative_prompt=args.negative,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        model=args.model,
        sampler=args.sampler,
        guidance_rescale=args.guidance_rescale,
        guidance_start=args.guidance_start,
        guidance_stop=args.guidance_stop,
        webhook_url=args.webhook_url,
        **{k: v for k, v in family_fields(args).items() if v is not None},
    )
    if args.image:  # bytes, or an earlier job's image by reference, as generate sends it
        fields["image"] = args.image
    if args.strength is not None or args.mask:  # reverse, sweep: image to image from --image
        fields.update(strength=args.strength, mask=args.mask)
    if args.timesteps:
        fields["timesteps"] = args.timesteps
    if args.scales:
        fields["guidance_scales"] = args.scales
    fields.update(noise_seed=args.noise_seed, space=args.space, trajectory_every=args.every)
    job = client.trajectory(kind, **fields)
    print(f"job {job.id} queued", file=sys.stderr)
    job = follow(client, job.id, None if args.quiet else Progress())
    frames = [client.frame(job.id, f.index) for f in job.frames]
    labels = [_frame_label(f.metadata, f.index) for f in job.frames]
    for path in write_frames(frames, labels, Path(args.out_dir)):
        print(path)
    return 0


def job_line(job: Job) -> str:
    """One line of `latentd jobs list`: id, kind, status, model, steps done, created (UTC)."""
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(job.created_at)) if job.created_at else "-"
    return f"{job.id}\t{job.kind}\t{job.status}\t{job.model}\t{job.step}/{job.total_steps}\t{created}"


def cmd_jobs_list(client: Client, args) -> int:
    """The newest --limit jobs (with a filter, page after page until that many are found), or every one."""
    limit = None if args.all else args.limit or rules.DEFAULT_LIST_LIMIT
    page_size = min(limit, rules.MAX_LIST_LIMIT) if limit else rules.MAX_LIST_LIMIT
    for job in itertools.islice(client.all_jobs(status=args.status or [], page_size=page_size), limit):
        print(json.dumps(job.raw) if args.json else job_line(job), flush=True)
    return 0


def cmd_jobs(client: Client, args) -> int:
    if args.action == "list":
        return cmd_jobs_list(client, args)
    if args.action == "watch":
        show = Progress()
        for event in client.events(args.job_id, args.after):
            if args.json:
                print(json.dumps({"id": event.id, "event": event.type, "data": event.data}), flush=True)
            else:
                show(event)
        job = client.get_job(args.job_id)
        print(json.dumps(job.raw, indent=2))
        return 0 if job.status == "succeeded" else 1  # as generate: the job it waited for ended without its images
    job = client.get_job(args.job_id) if args.action == "get" else client.cancel(args.job_id)
    print(json.dumps(job.raw, indent=2))
    return 0 if job.status != "failed" else 1


def cmd_models(client: Client, args) -> int:
    models = client.models()
    if args.json:
        print(json.dumps([m.raw for m in models], indent=2))
    for m in models if not args.json else []:
        samplers = ",".join(m.raw.get("samplers") or [])
        family = m.raw.get("family") or "sd"
        print(f"{m.name}\t{m.native_width}x{m.native_height}\t{m.scheduler}\t{samplers}\t{family}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("LATENTD_URL", DEFAULT_URL),
        help="http(s)://host:port (REST) or grpc://host:port; env LATENTD_URL",
    )
    parser.add_argument("--api-key", default=os.environ.get("LATENTD_API_KEY"), help="env LATENTD_API_KEY")
    parser.add_argument("--timeout", type=_seconds, default=30.0, help="seconds per request (streams excepted)")
    sub = parser.add_subparsers(dest="command", required=True)

    def generation_flags(p, prompt_positional: bool):
        if prompt_positional:
            p.add_argument("prompt")
        else:
            p.add_argument("--prompt")
        p.add_argument("--negative", help="negative prompt")
        p.add_argument("--steps", type=int, help="num_inference_steps (server default: the model's, 50 for SD)")
        p.add_argument("--guidance", type=float, help="guidance_scale (server default: the model's, 7.5 for SD)")
        p.add_argument("--seed", type=int)
        p.add_argument("--webhook-url", help="POSTed the job once it ends, signed (docs/api.md, Webhooks)")
        p.add_argument(
            "--sampler",
            help=(
                "ddim, plms, dpmpp_2m, dpmpp_2m_karras, dpmpp_2m_sde, dpmpp_2m_sde_karras, unipc, euler, "
                "euler_karras, lms, lms_karras, heun, heun_karras, dpm2, dpm2_karras, dpm2_ancestral, "
                "dpm2_ancestral_karras, dpmpp_sde, dpmpp_sde_karras, euler_ancestral, lcm; "
                "flow_euler for SD3 and Flux (`latentd models`)"
            ),
        )
        p.add_argument("--guidance-rescale", type=float, help="0..1, after guidance (server default: the model's)")
        p.add_argument(
            "--guidance-start",
            type=float,
            help="guidance interval: the fraction of the steps where guidance starts, 0..1 (server default: the model's)",
        )
        p.add_argument(
            "--guidance-stop",
            type=float,
            help="... and where it stops, guidance-start..1; the conditional prediction alone outside (server default: "
            "the model's)",
        )
        p.add_argument("--true-cfg", type=float, help="Flux: true_cfg_scale, > 1 guides with --negative too")
        p.add_argument(
            "--original-size",
            type=_two_ints("1024x768"),
            help="SDXL: original size conditioning WIDTHxHEIGHT (default: the size)",
        )
        p.add_argument("--crop", type=_two_ints("8,0"), help="SDXL: crop conditioning TOP,LEFT in pixels (default 0,0)")
        p.add_argument(
            "--target-size",
            type=_two_ints("1024x768"),
            help="SDXL: target size conditioning WIDTHxHEIGHT (default: the size)",
        )
        p.add_argument(
            "--strength",
            type=float,
            help="with --image: 0..1, how far it is noised (default: the model's, `latentd models`)",
        )
        p.add_argument(
            "--mask",
            type=_picture,
            help="with --image: inpaint where this PNG/JPEG is white (keep black); or JOB_ID:INDEX",
        )
        p.add_argument("--model")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    g = sub.add_parser("generate", help="text to image (or image to image, inpainting), with live progress")
    generation_flags(g, True)
    g.add_argument(
        "--image",
        type=_picture,
        help="image to image: the starting picture (PNG/JPEG), or JOB_ID:INDEX of a job's image",
    )
    g.add_argument("--eta", type=float)
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("-n", "--num-images", type=int)
    g.add_argument("--format", choices=["png", "jpeg", "webp"])
    g.add_argument("--preview-every", type=int, help="preview every k steps (drawn when stdout is a terminal)")
    g.add_argument(
        "-o",
        "--output",
        help="output file (default: out.png, out.jpeg or out.webp, after --format); -0, -1, ... added for several "
        "images",
    )
    g.set_defaults(run=cmd_generate)

    t = sub.add_parser("trajectory", help="forward noising, reverse denoising or a guidance sweep, as frames")
    t.add_argument("kind", choices=["forward", "reverse", "sweep"])
    generation_flags(t, False)
    t.add_argument(
        "--image",
        type=_picture,
        help="forward: the clean image (PNG/JPEG; default: generated from --prompt); reverse, sweep: start from it "
        "(image to image, with --strength and --mask); or JOB_ID:INDEX of a job's image",
    )
    t.add_argument("--timesteps", type=_list_of(int, "integers"), help="forward: comma-separated training timesteps")
    t.add_argument("--noise-seed", type=int, help="forward: seed of the one noise sample")
    t.add_argument("--space", choices=["pixel", "latent"], help="forward: where noise is added")
    t.add_argument("--every", type=int, help="reverse: keep every k-th step")
    t.add_argument("--scales", type=_list_of(float, "numbers"), help="sweep: comma-separated guidance scales")
    t.add_argument("--out-dir", default="trajectory", help="frames, trajectory.gif and contact.png go here")
    t.set_defaults(run=cmd_trajectory)

    j = sub.add_parser("jobs", help="list your jobs, or get, cancel or watch one")
    j.add_argument("action", choices=["list", "get", "cancel", "watch"])
    j.add_argument("job_id", nargs="?", help="get, cancel, watch: the job")
    j.add_argument("--after", help="watch: resume after this event id")
    j.add_argument("--json", action="store_true", help="watch: one JSON line per event; list: one job per line")
    j.add_argument("--status", type=_list_of(str, "statuses"), help="list: only these, e.g. queued,running")
    j.add_argument("--limit", type=int, help=f"list: the newest this many (default {rules.DEFAULT_LIST_LIMIT})")
    j.add_argument("--all", action="store_true", help="list: every job of the last hour, page after page")
    j.set_defaults(run=cmd_jobs)

    m = sub.add_parser("models", help="the models the workers serve")
    m.add_argument("--json", action="store_true")
    m.set_defaults(run=cmd_models)
    return parser


def check_jobs_arguments(parser: argparse.ArgumentParser, args) -> None:
    """`jobs` flags that the action would ignore are usage errors, not silently dropped."""
    if args.action == "list":
        given = [flag for flag, value in (("JOB_ID", args.job_id), ("--after", args.after)) if value]
        if args.all and args.limit is not None:
            given.append("--limit with --all")
        if args.limit is not None and args.limit < 1:
            parser.error(f"argument --limit: must be at least 1, got {args.limit}")
    else:
        given = [
            flag for flag, value in (("--status", args.status), ("--limit", args.limit), ("--all", args.all)) if value
        ]
        if not args.job_id:
            parser.error(f"jobs {args.action} needs a JOB_ID")
        if args.after and args.action != "watch":
            given.append("--after")
    if given:
        parser.error(f"jobs {args.action} does not take {', '.join(given)}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.run is cmd_jobs:
        check_jobs_arguments(parser, args)
    try:
        with Client(args.url, args.api_key, timeout=args.timeout) as client:
            return args.run(client, args)
    except LatentdError as exc:
        where = f" ({exc.param})" if exc.param and exc.param not in exc.message else ""
        print(f"latentd: error: {exc.message}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush fails silently too
        return 141  # 128 + SIGPIPE, what a shell reports for such a tool


if __name__ == "__main__":
    raise SystemExit(main())
