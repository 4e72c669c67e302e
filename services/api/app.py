"""The gateway's app factory: a lifespan that opens and closes Redis, one router per resource, one error shape."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from celery import Celery
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from services.api import errors, metrics, web
from services.api.routers import generations, health, jobs, models, openai_images, trajectories
from services.common.jobstore import JobStore
from services.common.settings import Settings, get_settings
from services.common.tasks import queue_for


def celery_client(settings: Settings) -> Celery:
    """A producer only: tasks are sent by name, the worker's code is never imported here."""
    client = Celery("latentd-gateway", broker=settings.redis_url)
    client.conf.update(
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
    )
    return client


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.settings = settings
        app.state.key_hashes = settings.key_hashes()
        app.state.store = JobStore.from_url(settings.redis_url, settings.result_ttl_s)
        app.state.celery = celery_client(settings)
        app.state.aredis = aioredis.Redis.from_url(settings.redis_url)  # SSE readers wait on XREAD without a thread
        metrics.register_queue_depth(app.state.store.redis, lambda: app.state.store.models().keys(), queue_for)
        metrics.serve_metrics_from_env()
        try:
            yield
        finally:
            metrics.unregister_queue_depth()
            app.state.celery.close()
            app.state.store.redis.close()
            await app.state.aredis.aclose()

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
            metrics.record_rejection("payload_too_large")
            return JSONResponse(
                {
                    "error": {
                        "type": "payload_too_large",
                        "param": None,
                        "message": f"request body is {length} bytes; the limit is {settings.max_body_bytes}",
                    }
                },
                status_code=413,
            )
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
