"""A served model as workers publish it in Redis (`latentd:models`) and as the doors show it.

The worker fills a `ModelInfo` from the model it loaded; the gateway reads it back to resolve and
check requests (`limits()`), and shows `view()` on GET /v1/models and `to_proto()` on gRPC ListModels.
Fields a newer worker adds that this gateway does not know yet ride along in `extra` and are shown.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.common.rules import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_INPAINT_STRENGTH,
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_PARAMS,
    DEFAULT_SAMPLER,
    DEFAULT_STRENGTH,
    MAX_GUIDANCE_FRACTION,
    MIN_GUIDANCE_FRACTION,
    ModelLimits,
)

# Not shown to clients: where the worker keeps the tokenizer whose limit is checked, and its class.
PRIVATE_FIELDS = ("tokenizer_path", "tokenizer_class")
OWNED_BY = "latentd"  # OpenAI's `owned_by` of every model entry: models served from this deployment's folders


@dataclass
class ModelInfo:
    name: str
    native_width: int
    native_height: int
    scheduler: str
    max_prompt_tokens: int
    num_train_timesteps: int
    size_multiple: int
    max_inference_steps: int
    tokenizer_path: str = ""
    samplers: list[str] = field(default_factory=lambda: [DEFAULT_SAMPLER])  # those its scheduler config allows
    default_sampler: str = DEFAULT_SAMPLER  # what a request without `sampler` gets
    sampler_max_inference_steps: dict[str, int] = field(default_factory=dict)  # each sampler's step limit
    default_guidance_rescale: float = 0.0  # what a request without `guidance_rescale` gets
    default_guidance_start: float = MIN_GUIDANCE_FRACTION  # ... without `guidance_start` (the interval, rules.py)
    default_guidance_stop: float = MAX_GUIDANCE_FRACTION  # ... without `guidance_stop`
    # the family (a worker from before families serves Stable Diffusion 1.x/2.x: these defaults)
    family: str = "sd"  # sd | sdxl | sd3 | flux
    pipeline: str = "StableDiffusionPipeline"  # the diffusers pipeline class of its folder
    prediction_type: str = "epsilon"  # epsilon | v_prediction | flow (the velocity ε − x0 of rectified flow)
    flow_shift: float | None = None  # flow models: the σ schedule's static shift s (None where it is dynamic)
    dynamic_shift: bool = False  # flow models: the shift μ follows the picture's token count (Flux-dev)
    guidance_form: str = "cfg"  # cfg | distilled (the backbone embeds guidance_scale: Flux-dev) | none
    true_cfg: bool = False  # Flux: true_cfg_scale > 1 guides with the negative prompt too
    default_guidance_scale: float = DEFAULT_GUIDANCE_SCALE  # what a request without `guidance_scale` gets
    default_num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS  # ... without `num_inference_steps`
    default_strength: float = DEFAULT_STRENGTH  # ... with an image and without `strength`
    default_inpaint_strength: float = DEFAULT_INPAINT_STRENGTH  # ... with a mask too
    created: int = 0  # Unix seconds: when its folder's model_index.json was written (OpenAI's `created`)
    params: list[str] = field(default_factory=lambda: list(DEFAULT_PARAMS))  # the request fields it reads
    tokenizer_class: str = "CLIPTokenizer"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        known.setdefault("max_inference_steps", data.get("num_train_timesteps", 1000))
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelInfo:
        return cls.from_dict(json.loads(text))

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        return json.dumps(data.pop("extra") | data)

    def limits(self, count_tokens: Callable[[str], int] | None = None) -> ModelLimits:
        return ModelLimits(
            name=self.name,
            native_width=self.native_width,
            native_height=self.native_height,
            size_multiple=self.size_multiple,
            max_inference_steps=self.max_inference_steps,
            max_prompt_tokens=self.max_prompt_tokens,
            count_tokens=count_tokens,
            samplers=tuple(self.samplers),
            default_sampler=self.default_sampler,
            sampler_max_steps=dict(self.sampler_max_inference_steps),
            default_guidance_rescale=self.default_guidance_rescale,
            default_guidance_start=self.default_guidance_start,
            default_guidance_stop=self.default_guidance_stop,
            family=self.family,
            params=tuple(self.params),
            default_num_inference_steps=self.default_num_inference_steps,
            default_guidance_scale=self.default_guidance_scale,
            default_strength=self.default_strength,
            default_inpaint_strength=self.default_inpaint_strength,
        )

    def view(self, workers: int, queue_depth: int = 0, default: bool = False) -> dict[str, Any]:
        """The public entry of GET /v1/models (OpenAI's `id` and `object` included)."""
        data = dataclasses.asdict(self)
        public = {k: v for k, v in data.pop("extra").items() if k not in PRIVATE_FIELDS}
        public |= {k: v for k, v in data.items() if k not in PRIVATE_FIELDS}
        live = {"workers": workers, "queue_depth": queue_depth, "default": default}
        openai = {"id": self.name, "object": "model", "created": self.created, "owned_by": OWNED_BY}
        return public | openai | live

    def to_proto(self, workers: int, queue_depth: int = 0, default: bool = False):
        from services.common.grpc_gen.latentd.v1 import latentd_pb2 as pb

        return pb.Model(
            name=self.name,
            native_width=self.native_width,
            native_height=self.native_height,
            scheduler=self.scheduler,
            workers=workers,
            raw_json=json.dumps(self.view(workers, queue_depth, default)),
            max_prompt_tokens=self.max_prompt_tokens,
            num_train_timesteps=self.num_train_timesteps,
            size_multiple=self.size_multiple,
            max_inference_steps=self.max_inference_steps,
            queue_depth=queue_depth,
            is_default=default,
            samplers=self.samplers,
            default_sampler=self.default_sampler,
            default_guidance_rescale=self.default_guidance_rescale,
            default_guidance_start=self.default_guidance_start,
            default_guidance_stop=self.default_guidance_stop,
            family=self.family,
            pipeline=self.pipeline,
            prediction_type=self.prediction_type,
            flow_shift=self.flow_shift,
            dynamic_shift=self.dynamic_shift,
            guidance_form=self.guidance_form,
            true_cfg=self.true_cfg,
            default_guidance_scale=self.default_guidance_scale,
            default_num_inference_steps=self.default_num_inference_steps,
            params=self.params,
            default_strength=self.default_strength,
            default_inpaint_strength=self.default_inpaint_strength,
        )


@dataclass
class ServedModel:
    """A model a live worker serves, as the doors list it."""

    info: ModelInfo
    workers: int
    queue_depth: int
    default: bool

    def view(self) -> dict[str, Any]:
        return self.info.view(self.workers, self.queue_depth, self.default)

    def to_proto(self):
        return self.info.to_proto(self.workers, self.queue_depth, self.default)
