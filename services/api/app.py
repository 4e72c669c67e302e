"""The gateway's app factory: a lifespan that opens the application core (Redis, the event hub, the Celery
producer) and closes it, one router per resource, one error shape."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from services.api import errors, metrics, web
from services.api.routers import generations, health, jobs, models, openai_images, trajectories
from services.common.errors import PayloadTooLarge
from services.common.jobstore import MODELS_KEY
from services.common.settings import Settings, get_settings
from services.common.tasks import queue_for
from services.core import Core
from services.core import metrics as core_metrics


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.core = await Core.open(settings)
        scrape_redis = redis.Redis.from_url(settings.redis_url, socket_timeout=2)  # read at scrape time only
        metrics.register_queue_depth(
            scrape_redis, lambda: [name.decode() for name in scrape_redis.hkeys(MODELS_KEY)], queue_for
        )
        metrics.serve_metrics_from_env()
        try:
            yield
        finally:
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
    )

    @app.middleware("http")
    async def limit_body_and_observe(request: Request, call_next):
        started = time.perf_counter()
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_body_bytes:
            core_metrics.record_rejection("payload_too_large")
            error = PayloadTooLarge(f"request body is {length} bytes; the limit is {settings.max_body_bytes}")
            return JSONResponse(error.body(), status_code=error.status_code)
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.observe_http_request(
            getattr(route, "path", "unmatched"), request.method, response.status_code, time.perf_counter() - started
        )
        return response

    errors.install(app)
    for router in (generations, trajectories, jobs, models, openai_images, health):
        app.include_router(router.router)
    web.install(app)
    return app
