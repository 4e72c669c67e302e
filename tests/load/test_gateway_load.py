"""The gateway under load and abuse, at CI scale, against real processes (issue 12's table, row by row):
SSE fan-out on the real stack, and a gateway of its own settings (a small body limit, a key's share of 24)
on the same Redis and worker for huge bodies, OpenAI waiters and a flooding key. The full-size figures come
from `make bench-gateway` (benchmarks/bench_gateway.py), which uses the same load tools."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import redis

from benchmarks import gateway_load as load
from scripts import run_stack
from services.common.jobstore import JobStore
from services.common.settings import hash_key
from tests.fixtures.tiny_model import published_info

pytestmark = pytest.mark.timeout(180)
KEYS = ("load-flood", "load-quiet", "load-waiter", "load-probe", "load-waiter-2", "load-waiter-3")
WAITERS = (KEYS[2], KEYS[4], KEYS[5])  # 50 waiting jobs are more than one key's share
IDLE_MODEL = published_info("loadtest")  # published, served by no worker: its jobs wait
SHARE = 24
BODY_LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def gateway(real_stack, tmp_path_factory):
    """A second gateway process on the real stack's Redis and worker, with settings of its own."""
    JobStore.from_url(real_stack.redis_url).publish_model(IDLE_MODEL)
    port = run_stack.free_port()
    log = open(tmp_path_factory.mktemp("load") / "gateway.log", "w")
    proc = run_stack.start_api(
        real_stack.redis_url,
        port,
        log=log,
        api_key_hashes=",".join(hash_key(k) for k in KEYS),
        max_body_bytes=BODY_LIMIT,
        max_queue_per_model=256,
        max_queue_per_key=SHARE,
        api_metrics_port="off",
    )
    url = f"http://127.0.0.1:{port}"
    run_stack.wait_ready(url, timeout_s=60, procs=(proc,))
    yield port, proc
    run_stack.stop([proc])
    redis.Redis.from_url(real_stack.redis_url).hdel("latentd:models", IDLE_MODEL.name)


def cancel_all(port: int, redis_url: str, model: str, keys) -> None:
    client = redis.Redis.from_url(redis_url)
    for job_id in [m.decode() for m in client.smembers(f"latentd:pending:{model}")]:
        for key in keys:
            httpx.post(f"http://127.0.0.1:{port}/v1/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {key}"})


def test_200_sse_readers_get_every_event_over_a_constant_number_of_redis_connections(real_stack):
    """Was: 200 readers of one job, 100 got every event, the others were cut off silently (one Redis
    connection per reader, past the pool's limit)."""
    port = int(real_stack.url.rsplit(":", 1)[1])
    redis_port = int(real_stack.redis_url.rsplit(":", 1)[1].split("/")[0])
    client = redis.Redis.from_url(real_stack.redis_url)
    key = real_stack.keys[0]
    ids = [
        httpx.post(
            f"{real_stack.url}/v1/generations",
            json={"prompt": "a red circle", "num_inference_steps": 15, "seed": i},
            headers=real_stack.headers(),
        ).json()["id"]
        for i in range(2)
    ]

    async def readers():
        return await asyncio.gather(*(load.sse_reader("127.0.0.1", port, ids[i % 2], key) for i in range(200)))

    with load.Sampler(lambda: load.tcp_connections_to(real_stack.api.pid, redis_port), 0.1) as connections:
        results = asyncio.run(readers())
    expected = {job_id: client.xlen(f"latentd:job:{job_id}:events") for job_id in ids}
    incomplete = [(r.status, r.error) for r in results if not r.complete]
    assert not incomplete, incomplete[:5]
    assert all(r.events == expected[ids[i % 2]] for i, r in enumerate(results))
    assert {r.terminal for r in results} == {"succeeded"}
    assert connections.max <= 12, connections.max  # the pool (8), the Celery producer: not one per reader


def test_chunked_bodies_over_the_limit_are_413_without_being_read(gateway):
    """Was: a chunked 64 MiB body was read whole and parsed (no answer in 120 s, +4.1 GB)."""
    port, proc = gateway
    time.sleep(0.2)
    baseline = load.rss_bytes(proc.pid)

    async def uploads():
        chunked = [load.endless_upload("127.0.0.1", port, "/v1/generations", KEYS[3], total=4 << 20) for _ in range(20)]
        sized = load.endless_upload("127.0.0.1", port, "/v1/generations", KEYS[3], total=4 << 20, chunked=False)
        return await asyncio.wait_for(asyncio.gather(*chunked, sized), 60)

    with load.Sampler(lambda: load.rss_bytes(proc.pid), 0.02) as rss:
        results = asyncio.run(uploads())
    assert [r.status for r in results] == [413] * 21, [(r.status, r.error, r.sent) for r in results if r.status != 413]
    assert rss.max - baseline < 40e6, (rss.max - baseline) / 1e6

    async def small_chunked():  # a chunked body under the limit is read and served as usual
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = json.dumps({"model": "loadtest", "prompt": "a red circle"}).encode()
        writer.write(
            f"POST /v1/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[3]}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + f"{len(body):x}\r\n".encode()
            + body
            + b"\r\n0\r\n\r\n"
        )
        status = int((await reader.readline()).split()[1])
        writer.close()
        return status

    assert asyncio.run(small_chunked()) == 202
    refused = httpx.post(
        f"http://127.0.0.1:{port}/v1/generations",
        content=b'{"prompt": "' + b"x" * BODY_LIMIT + b'"}',
        headers={"Authorization": f"Bearer {KEYS[3]}", "Content-Type": "application/json"},
    )
    assert refused.status_code == 413 and refused.json()["error"]["type"] == "payload_too_large"


def test_a_submit_answers_in_milliseconds_while_50_openai_calls_wait(gateway, real_stack):
    """Was: each waiting OpenAI call held one of the gateway's threads; a submit took 5 s behind 48."""
    port, proc = gateway
    client = redis.Redis.from_url(real_stack.redis_url)
    pending = f"latentd:pending:{IDLE_MODEL.name}"
    threads_before = _threads(proc.pid)

    async def run():
        body = {"model": IDLE_MODEL.name, "prompt": "a red circle", "num_inference_steps": 5}
        calls = [
            asyncio.ensure_future(
                load.request("127.0.0.1", port, "POST", "/v1/images/generations", WAITERS[i % 3], body)
            )
            for i in range(50)
        ]
        deadline = time.monotonic() + 30
        while client.scard(pending) < 50 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        waiting, threads = client.scard(pending), _threads(proc.pid)
        latencies = []
        for index in range(10):
            started = time.perf_counter()
            status, _, _ = await load.request(
                "127.0.0.1", port, "POST", "/v1/generations", KEYS[3], body | {"seed": index}
            )
            latencies.append(time.perf_counter() - started)
            assert status == 202
        cancel_all(port, real_stack.redis_url, IDLE_MODEL.name, (*WAITERS, KEYS[3]))
        answers = await asyncio.wait_for(asyncio.gather(*calls), 30)
        return waiting, threads, latencies, answers

    waiting, threads, latencies, answers = asyncio.run(run())
    assert waiting >= 50
    assert threads - threads_before < 10, (threads_before, threads)  # no thread per waiter
    assert sorted(latencies)[5] < 0.25 and max(latencies) < 1.0, latencies
    assert [status for status, _, _ in answers] == [409] * 50  # each told its job was cancelled
    assert all(b"cancelled" in body for _, _, body in answers)


def _threads(pid: int) -> int:
    for line in open(f"/proc/{pid}/status").read().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def test_a_flooding_key_gets_its_share_and_the_quiet_keys_job_goes_next(gateway, real_stack):
    """Was: one key's 100 jobs filled the model's queue and another key's single job got 429."""
    port, _ = gateway
    model = real_stack.model
    body = {"model": model, "prompt": "a red circle", "num_inference_steps": 4}

    async def flood():
        return await asyncio.gather(
            *(load.request("127.0.0.1", port, "POST", "/v1/generations", KEYS[0], body) for _ in range(40))
        )

    answers = asyncio.run(flood())
    accepted = [json.loads(b)["id"] for s, _, b in answers if s == 202]
    refused = [(h, json.loads(b)["error"]) for s, h, b in answers if s == 429]
    assert len(accepted) == SHARE and len(refused) == 40 - SHARE, [
        (s, b[:300]) for s, _, b in answers if s not in (202, 429)
    ]
    headers, error = refused[0]
    assert headers["retry-after"] and f"max_queue_per_key = {SHARE}" in error["message"]
    quiet = httpx.post(
        f"http://127.0.0.1:{port}/v1/generations", json=body, headers={"Authorization": f"Bearer {KEYS[1]}"}
    )
    assert quiet.status_code == 202
    store = JobStore.from_url(real_stack.redis_url)
    try:
        deadline = time.monotonic() + 120
        while "started_at" not in (job := store.get(quiet.json()["id"])).timings and time.monotonic() < deadline:
            time.sleep(0.02)
        started = job.timings["started_at"]
        flood_jobs = [store.get(job_id) for job_id in accepted]
        before = [j for j in flood_jobs if j.timings.get("started_at", float("inf")) < started]
        # the worker runs 16 jobs at once: the quiet key's job is the next one taken, ahead of the flood's rest
        assert len(before) <= 16 + 1, len(before)
        assert sum(1 for j in flood_jobs if j.timings.get("started_at", float("inf")) > started) >= SHARE - 17
    finally:
        cancel_all(port, real_stack.redis_url, model, KEYS[:2])
    done = httpx.get(
        f"http://127.0.0.1:{port}/v1/jobs/{quiet.json()['id']}", headers={"Authorization": f"Bearer {KEYS[1]}"}
    )
    assert done.status_code == 200


def test_several_server_processes_share_a_port_and_one_metrics_endpoint(own_redis):
    """LATENTD_PROCESSES: the parent serves the metrics of all its server processes, summed."""
    from prometheus_client.parser import text_string_to_metric_families

    port, metrics_port = run_stack.free_port(), run_stack.free_port()
    proc = run_stack.start_api(own_redis, port, processes=2, api_metrics_port=metrics_port)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/livez", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert len(load.process_tree(proc.pid)) >= 3  # the parent and two servers
        for _ in range(40):
            assert httpx.get(f"{url}/livez", headers={"Connection": "close"}).status_code == 200
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        samples = {
            (s.name, s.labels.get("route")): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert samples[("latentd_http_requests_total", "/livez")] >= 40
        assert ("latentd_sse_readers", None) in samples
    finally:
        run_stack.stop([proc])
