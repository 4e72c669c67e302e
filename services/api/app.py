"""The gateway's app factory: a lifespan that opens the application core (Redis, the event hub, the Celery
producer) and closes it, one router per resource, one error shape."""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.api import errors, metrics, web
from services.api.edge import Edge
from services.api.routers import generations, health, jobs, models, openai_images, trajectories
from services.common import rules
from services.common.jobstore import MODELS_KEY, sync_client
from services.common.settings import Settings, get_settings
from services.core import Core, schemas


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.core = await Core.open(settings)
        # one of several server processes: the parent serves the metrics of all (services/api/__main__.py)
        own_metrics = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        scrape_redis = sync_client(settings.redis_url, 2)  # read at scrape time only
        if own_metrics:
            metrics.register_queue_depth(
                scrape_redis, lambda: [name.decode() for name in scrape_redis.hkeys(MODELS_KEY)]
            )
            metrics.serve_metrics_from_env()
        try:
            yield
        finally:
            if own_metrics:
                metrics.unregister_queue_depth()
            scrape_redis.close()
            await app.state.core.close()

    app = FastAPI(
        title="latentd",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc come from services.api.web, with their assets served locally
        redoc_url=None,
        description="Latent diffusion inference: text to image, trajectories, streamed progress.",
        # a path with a trailing slash is a 404 that names the path without it, not a redirect: its Location would
        # be built from the request's Host header, which the caller chooses
        redirect_slashes=False,
    )

    app.add_middleware(
        Edge, max_body_bytes=settings.max_body_bytes, max_body_buffer_bytes=settings.max_body_buffer_bytes
    )
    errors.install(app)
    for router in (generations, trajectories, jobs, models, openai_images, health):
        app.include_router(router.router)
    web.install(app)
    app.openapi = lambda: _openapi(app, rules.images_allowed(settings.max_num_images))
    return app


# The request models whose bounds the document states: FastAPI writes them through its own models, which hold a
# bound as a float (9223372036854775807 became 9.223372036854776e+18, a number past the largest seed); they are put
# back as the request models state them.
_BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_REQUEST_MODELS = {
    model.__name__: model
    for model in (
        schemas.GenerationCreate,
        schemas.TrajectoryCreate,
        schemas.OpenAIImageRequest,
        schemas.OpenAIImageEditRequest,
        schemas.JobImage,
    )
}
# ... and the picture counts: the deployment's own limit (LATENTD_MAX_NUM_IMAGES), not the schema's.
_IMAGE_COUNTS = ("num_images", "n")


def _openapi(app: FastAPI, images_allowed: int) -> dict:
    if app.openapi_schema is None:
        document = FastAPI.openapi(app)
        for name, component in document.get("components", {}).get("schemas", {}).items():
            model = _REQUEST_MODELS.get(name)
            if model is None:
                continue
            _copy_bounds(component, model.model_json_schema())
            for field in _IMAGE_COUNTS:
                if field in component.get("properties", {}):
                    component["properties"][field]["maximum"] = images_allowed
    return app.openapi_schema


def _copy_bounds(target: object, exact: object) -> None:
    """Put the bounds of `exact` (a pydantic JSON schema) into `target` (the same schema as FastAPI wrote it)."""
    if isinstance(target, dict) and isinstance(exact, dict):
        for key in _BOUND_KEYS:
            if key in target and key in exact:
                target[key] = exact[key]
        for key, value in target.items():
            if key in exact and key != "$defs":
                _copy_bounds(value, exact[key])
    elif isinstance(target, list) and isinstance(exact, list) and len(target) == len(exact):
        for one, other in zip(target, exact):
            _copy_bounds(one, other)
