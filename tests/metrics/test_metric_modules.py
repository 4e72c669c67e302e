"""The metric modules themselves: names, types, thread safety, the Redis-backed gauges, the servers."""

from __future__ import annotations

import threading
import urllib.request

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from services.api import metrics as api_metrics
from services.common import workers
from services.common.jobstore import leases_key, pending_key
from services.worker import heartbeat
from services.worker import metrics as worker_metrics

REDIS_URL = "redis://127.0.0.1:6379/13"


def scrape(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(families, name: str, suffix: str = "", **labels) -> float:
    family = families[name]
    for s in family.samples:
        if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {name}{suffix} {labels}")


@pytest.fixture()
def client():
    r = redis.Redis.from_url(REDIS_URL)
    r.flushdb()
    yield r
    r.flushdb()
    api_metrics.unregister_queue_depth()


def test_worker_counters_are_exact_under_many_task_threads():
    port = worker_metrics.start_metrics_server(0, addr="127.0.0.1")
    model, threads, per_thread = "thread-test", 32, 500
    before = scrape(port)
    start = threading.Barrier(threads)

    def work():
        start.wait()
        for _ in range(per_thread):
            worker_metrics.record_steps(model)
            worker_metrics.observe_unet_call(model, rows=3, seconds=0.002)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    after = scrape(port)
    assert "latentd_steps" not in before or all(s.labels.get("model") != model for s in before["latentd_steps"].samples)
    assert sample(after, "latentd_steps", "_total", model=model) == threads * per_thread
    assert sample(after, "latentd_batch_rows", "_count", model=model) == threads * per_thread
    assert sample(after, "latentd_batch_rows", "_sum", model=model) == 3 * threads * per_thread
    assert after["latentd_unet_step_seconds"].type == "histogram"
    assert "process_resident_memory_bytes" in after


def test_queue_wait_clamps_clock_skew_and_failures_name_the_error_type():
    model = "wait-test"
    worker_metrics.observe_queue_wait(model, enqueued_at=100.0, started_at=103.5)
    worker_metrics.observe_queue_wait(model, enqueued_at=200.0, started_at=199.0)  # skew: 0 not negative
    worker_metrics.record_failure(model, ValueError("bad"))
    worker_metrics.record_failure(model, "NonFiniteOutputError")
    families = scrape(worker_metrics.start_metrics_server(0, addr="127.0.0.1"))
    assert sample(families, "latentd_queue_wait_seconds", "_sum", model=model) == pytest.approx(3.5)
    assert sample(families, "latentd_queue_wait_seconds", "_count", model=model) == 2
    assert sample(families, "latentd_job_failures", "_total", model=model, error_type="ValueError") == 1
    assert sample(families, "latentd_job_failures", "_total", model=model, error_type="NonFiniteOutputError") == 1


def test_engine_active_requests_is_read_at_scrape_time():
    active = {"n": 3, "s": 0.0}
    worker_metrics.track_engine("gauge-test", lambda: active["n"], lambda: active["s"])
    port = worker_metrics.start_metrics_server(0, addr="127.0.0.1")
    assert sample(scrape(port), "latentd_engine_active_requests", model="gauge-test") == 3
    active["n"], active["s"] = 0, 42.5  # an iteration running 42.5 s: what LatentdEngineStalled watches
    assert sample(scrape(port), "latentd_engine_active_requests", model="gauge-test") == 0
    assert sample(scrape(port), "latentd_engine_iteration_seconds", model="gauge-test") == 42.5


def test_queue_depth_and_live_workers_come_from_redis_at_scrape(client):
    # 8 jobs pending (queued or running), 2 of them running (a lease each), as the scripts leave them; the model's
    # Celery messages do not count
    client.sadd(pending_key("depth-test"), *[f"j{n}" for n in range(8)])
    client.zadd(leases_key("depth-test"), {"j0": 1e12, "j1": 1e12})
    client.rpush("latentd.depth-test", *["wake-up"] * 9)
    api_metrics.register_queue_depth(client, lambda: ["depth-test", "idle-model"])
    beat = heartbeat.Heartbeat(client, ["depth-test"], worker="host-1", ttl_s=10)
    beat.beat()
    port = api_metrics.start_metrics_server(0, addr="127.0.0.1")
    families = scrape(port)
    assert sample(families, "latentd_queue_depth", model="depth-test") == 6
    assert sample(families, "latentd_queue_depth", model="idle-model") == 0
    # alive but its probe never consumed: not a live worker
    assert sample(families, "latentd_workers_live", model="depth-test") == 0
    heartbeat.mark_consumed(client, ["depth-test"], "host-1", ttl_s=10)
    client.zadd(leases_key("depth-test"), {"j2": 1e12, "j3": 1e12})  # two more taken
    families = scrape(port)
    assert sample(families, "latentd_workers_live", model="depth-test") == 1
    assert sample(families, "latentd_queue_depth", model="depth-test") == 4
    assert workers.live_workers(client, ["depth-test"], stale_after_s=5) == {"depth-test": ["host-1"]}


def test_the_job_stores_memory_and_its_limit_come_from_redis_at_scrape(client):
    """What LatentdRedisNearlyFull watches: Redis's used_memory against its maxmemory (0 where none is set)."""
    api_metrics.register_queue_depth(client, lambda: [])
    port = api_metrics.start_metrics_server(0, addr="127.0.0.1")
    before = client.config_get("maxmemory")["maxmemory"]
    try:
        client.config_set("maxmemory", 3 * 2**30)
        families = scrape(port)
        assert sample(families, "latentd_redis_maxmemory_bytes") == 3 * 2**30
        used = sample(families, "latentd_redis_memory_used_bytes")
        assert 0 < used == pytest.approx(client.info("memory")["used_memory"], rel=0.5)
        client.config_set("maxmemory", 0)
        assert sample(scrape(port), "latentd_redis_maxmemory_bytes") == 0
    finally:
        client.config_set("maxmemory", before)


def test_queue_depth_scrape_survives_redis_down():
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    api_metrics.register_queue_depth(dead, lambda: ["m"])
    try:
        families = scrape(api_metrics.start_metrics_server(0, addr="127.0.0.1"))
        assert "latentd_queue_depth" not in families or not families["latentd_queue_depth"].samples
        assert "latentd_http_request_duration_seconds" in families
    finally:
        api_metrics.unregister_queue_depth()


def test_http_metrics_use_route_templates():
    api_metrics.observe_http_request("/v1/jobs/{job_id}", "GET", 404, 0.01)
    families = scrape(api_metrics.start_metrics_server(0, addr="127.0.0.1"))
    assert (
        sample(families, "latentd_http_requests", "_total", route="/v1/jobs/{job_id}", method="GET", status="404") >= 1
    )
    assert families["latentd_http_request_duration_seconds"].type == "histogram"
