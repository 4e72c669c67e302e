"""The gateway's app factory: a lifespan that opens the application core (Redis, the event hub, the Celery
producer) and closes it, one router per resource, one error shape."""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.api import errors, metrics, web
from services.api.edge import Edge
from services.api.routers import generations, health, jobs, models, openai_images, trajectories
from services.common.jobstore import MODELS_KEY, sync_client
from services.common.settings import Settings, get_settings
from services.common.tasks import queue_for
from services.core import Core


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
                scrape_redis, lambda: [name.decode() for name in scrape_redis.hkeys(MODELS_KEY)], queue_for
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
    )

    app.add_middleware(
        Edge, max_body_bytes=settings.max_body_bytes, max_body_buffer_bytes=settings.max_body_buffer_bytes
    )
    errors.install(app)
    for router in (generations, trajectories, jobs, models, openai_images, health):
        app.include_router(router.router)
    web.install(app)
    return app
