"""A minimal Celery app with the heartbeat installed, run as a real worker by test_heartbeat."""

import os

from celery import Celery

from services.worker import heartbeat

REDIS_URL = os.environ["LATENTD_TEST_REDIS_URL"]

app = Celery("heartbeat-test", broker=REDIS_URL)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="heartbeat-test.noop")
def noop() -> str:
    return "ok"


heartbeat.install(app, ["tiny-model"], REDIS_URL, interval_s=0.3, ttl_s=5)
