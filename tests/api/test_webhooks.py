"""Webhooks: a job with a webhook_url is POSTed to it once it ends, signed as Standard Webhooks say, retried until
the receiver answers 2xx; a bad webhook_url is a 422 naming it, by either door. The receiver is a real HTTP server
on loopback; the signatures are checked with the client's verify_webhook, itself checked against the published
Standard Webhooks example."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import httpx
import pytest
import redis
from prometheus_client import REGISTRY

from client.latentd_client import WebhookVerificationError, verify_webhook
from services.common import rules
from services.common.errors import InvalidInput
from services.common.grpc_gen.latentd.v1 import latentd_pb2 as pb
from services.common.grpc_gen.latentd.v1 import latentd_pb2_grpc as pb_grpc
from services.common.jobstore import WEBHOOKS_KEY
from services.common.signing import signature, signing_key
from tests.conftest import WEBHOOK_SECRET
from tests.fixtures.gateway import in_process_gateway
from tests.fixtures.tiny_model import published_info

pytestmark = pytest.mark.timeout(120)

# The example of the Standard Webhooks specification (and of its reference libraries' tests).
SPEC = dict(
    secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    id="msg_p5jXN8AQM9LWM0D4loKWxJek",
    timestamp=1614265330,
    body=b'{"test": 2432232314}',
    signature="v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
)
REDIS_URL = "redis://127.0.0.1:6379/8"


class Receiver:
    """An HTTP server on loopback that records every call and answers with the next of `answers` (then 204)."""

    def __init__(self, answers: tuple[int | float, ...] = ()):
        """`answers`: a status to answer, or a float: seconds to stall before answering 204 (a slow receiver)."""
        self.calls: list[tuple[dict, bytes, float]] = []
        self.answers = list(answers)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body, time.time()))
                answer = receiver.answers.pop(0) if receiver.answers else 204
                if isinstance(answer, float):
                    time.sleep(answer)
                    answer = 204
                self.send_response(answer)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/latentd?source=test"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout_s: float = 60) -> list[tuple[dict, bytes, float]]:
        deadline = time.monotonic() + timeout_s
        while len(self.calls) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.calls) >= count, f"{len(self.calls)} webhook calls of {count} within {timeout_s} s"
        return self.calls

    def close(self):
        self.server.shutdown()


@pytest.fixture
def receiver():
    made = []

    def make(*answers: int) -> Receiver:
        made.append(Receiver(answers))
        return made[-1]

    yield make
    for one in made:
        one.close()


def verified(call: tuple[dict, bytes, float]) -> dict:
    headers, body, received_at = call
    return verify_webhook(WEBHOOK_SECRET, headers, body, now=received_at)


# ---- the signature -----------------------------------------------------------------------------
def test_the_signature_is_standard_webhooks_published_example():
    key = signing_key(SPEC["secret"])
    assert signature(key, SPEC["id"], SPEC["timestamp"], SPEC["body"]) == SPEC["signature"]
    headers = {"Webhook-Id": SPEC["id"], "Webhook-Timestamp": str(SPEC["timestamp"])}
    rotated = {"webhook-signature": "v1,bm9ldHU= " + SPEC["signature"]}  # one matching signature of several
    payload = verify_webhook(SPEC["secret"], headers | rotated, SPEC["body"], now=SPEC["timestamp"] + 10)
    assert payload == {"test": 2432232314}


@pytest.mark.parametrize(
    "change, why",
    [
        (dict(body=b'{"test": 2432232315}'), "does not match"),
        (dict(secret="whsec_" + "QUFBQUFBQUFBQUFBQUFBQQ=="), "does not match"),
        (dict(now=SPEC["timestamp"] + 301), "more than the 300 s allowed"),
        (dict(now=SPEC["timestamp"] - 301), "more than the 300 s allowed"),
        (dict(drop="webhook-signature"), "lacks the webhook-signature"),
        (dict(timestamp="soon"), "not a whole number"),
        (dict(signature="v1,é"), "does not match"),  # not ASCII: a mismatch, not a TypeError
    ],
)
def test_a_call_that_is_not_the_deployments_or_is_stale_is_refused(change, why):
    headers = {"webhook-id": SPEC["id"], "webhook-timestamp": str(change.get("timestamp", SPEC["timestamp"]))}
    headers["webhook-signature"] = change.get("signature", SPEC["signature"])
    headers.pop(change.get("drop", ""), None)
    with pytest.raises(WebhookVerificationError, match=why):
        verify_webhook(
            change.get("secret", SPEC["secret"]),
            headers,
            change.get("body", SPEC["body"]),
            now=change.get("now", SPEC["timestamp"]),
        )


# ---- the rule ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url, message",
    [
        ("ftp://example.com/x", "webhook_url must be an absolute http or https URL, got 'ftp://example.com/x'"),
        ("/relative/path", "webhook_url must be an absolute http or https URL, got '/relative/path'"),
        ("https://user:secret@example.com/", "webhook_url must not carry a user name or password"),
        (
            "http://example.com:99999/",
            "webhook_url is not a URL (Port out of range 0-65535), got 'http://example.com:99999/'",
        ),
        (
            "http://127.0.0.1:8080/",
            "webhook_url must reach a public address; '127.0.0.1' is loopback, private, link-local or reserved",
        ),
        (
            "http://[::1]/",
            "webhook_url must reach a public address; '::1' is loopback, private, link-local or reserved",
        ),
        (
            "http://169.254.169.254/latest/meta-data",
            "webhook_url must reach a public address; '169.254.169.254' is loopback, private, link-local or reserved",
        ),
        (
            "http://localhost/",
            "webhook_url must reach a public address; 'localhost' is loopback, private, link-local or reserved",
        ),
        (
            "http://exa mple.com/",
            "webhook_url must be printable ASCII without spaces (percent-encode the rest), got 'http://exa mple.com/'",
        ),
    ],
)
def test_a_bad_webhook_url_is_refused_naming_it(url, message):
    with pytest.raises(InvalidInput) as refused:
        rules.check_webhook_url(url, allow_private=False)
    assert (refused.value.message, refused.value.param) == (message, "webhook_url")


def test_private_targets_pass_where_the_deployment_allows_them():
    assert rules.check_webhook_url("http://127.0.0.1:9/x", allow_private=True) == "http://127.0.0.1:9/x"
    assert rules.check_webhook_url("https://hooks.example.com/a?b=c", allow_private=False)


@pytest.fixture
def gateway(model_path):
    """A gateway (REST, in process) with no worker: its jobs stay queued until cancelled, which ends them."""
    info = published_info(tokenizer_path=str(model_path / "tokenizer"))
    settings = dict(webhook_secret=WEBHOOK_SECRET, webhook_allow_private=True, webhook_retry_s=0.2, webhook_timeout_s=1)
    with in_process_gateway(REDIS_URL, "hook-key", info, **settings) as client:
        yield client


def test_both_submits_refuse_a_bad_webhook_url_before_queueing(gateway, model_path):
    info = published_info(tokenizer_path=str(model_path / "tokenizer"))
    with in_process_gateway(REDIS_URL, "strict-key", info) as strict:  # private targets not allowed
        for path, body in (
            ("/v1/generations", {"prompt": "a red circle"}),
            ("/v1/trajectories", {"kind": "reverse", "prompt": "a red circle"}),
        ):
            answer = strict.post(path, json=body | {"webhook_url": "http://10.1.2.3/hook"})
            assert answer.status_code == 422
            assert answer.json()["error"]["param"] == "webhook_url"
            assert "must reach a public address; '10.1.2.3'" in answer.json()["error"]["message"]
        too_long = strict.post(
            "/v1/generations", json={"prompt": "x", "webhook_url": "https://a.example/" + "x" * 2048}
        )
        assert too_long.status_code == 422 and too_long.json()["error"]["param"] == "webhook_url"
        assert str(rules.MAX_WEBHOOK_URL_CHARS) in too_long.json()["error"]["message"]
        assert strict.get("/v1/jobs").json()["jobs"] == []  # nothing was queued


def counted(outcome: str) -> float:
    """latentd_webhook_deliveries_total{outcome} of this process (the in-process gateway's sender)."""
    return REGISTRY.get_sample_value("latentd_webhook_deliveries_total", {"outcome": outcome}) or 0.0


def test_a_cancelled_job_calls_its_webhook_once_and_a_failed_call_is_retried(gateway, receiver):
    before = {outcome: counted(outcome) for outcome in ("delivered", "retrying")}
    hook = receiver(500, 503)  # two failures, then 204
    job = gateway.post("/v1/generations", json={"prompt": "a red circle", "webhook_url": hook.url}).json()
    assert job["webhook_url"] == hook.url and "webhook_url" not in job["params"]
    plain = gateway.post("/v1/generations", json={"prompt": "a blue square"}).json()
    assert plain["webhook_url"] is None
    assert gateway.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    gateway.post(f"/v1/jobs/{plain['id']}/cancel")
    calls = hook.wait_for(3)
    time.sleep(1.0)  # nothing more comes once one call was answered 2xx
    assert len(hook.calls) == 3
    payloads = [verified(call) for call in calls]
    assert {call[0]["webhook-id"] for call in calls} == {f"{job['id']}.cancelled"}  # a repeat says it is one
    assert payloads[0]["type"] == "job.cancelled"
    assert payloads[0]["data"] == gateway.get(f"/v1/jobs/{job['id']}").json()
    gaps = [later[2] - earlier[2] for earlier, later in zip(calls, calls[1:])]
    # no call before its retry was due: 0.2 s after the first failure, 0.2 · 4 = 0.8 s after the second (a claim
    # may come later than due, on a busy machine: never sooner)
    assert gaps[0] >= 0.2 - 0.05 and gaps[1] >= 0.8 - 0.05, gaps
    assert redis.Redis.from_url(REDIS_URL).zcard(WEBHOOKS_KEY) == 0
    assert counted("retrying") - before["retrying"] == 2 and counted("delivered") - before["delivered"] == 1


def test_a_receiver_that_answers_410_gone_is_not_called_again(gateway, receiver):
    gave_up = counted("gave_up")
    hook = receiver(410)
    job = gateway.post("/v1/generations", json={"prompt": "a red circle", "webhook_url": hook.url}).json()
    gateway.post(f"/v1/jobs/{job['id']}/cancel")
    hook.wait_for(1)
    time.sleep(1.0)
    assert len(hook.calls) == 1 and counted("gave_up") == gave_up + 1


def test_a_receiver_that_does_not_answer_in_time_is_called_again(gateway, receiver):
    """Each call has webhook_timeout_s (1 s here) in all: a receiver stalling 3 s is cut at 1 s and called again,
    with the same bytes (the payload says when the job ended, not when it is sent)."""
    hook = receiver(3.0)  # stalls, then answers; the second call is answered at once
    job = gateway.post("/v1/generations", json={"prompt": "a red circle", "webhook_url": hook.url}).json()
    gateway.post(f"/v1/jobs/{job['id']}/cancel")
    first, second = hook.wait_for(2)[:2]
    assert second[2] - first[2] < 2.9  # the first call was given up at 1 s, not waited out
    assert first[1] == second[1] and verified(second)["type"] == "job.cancelled"


def test_a_call_settles_only_its_own_claim():
    """A call whose claim lapsed (a slow receiver, a gateway paused) and that another process claimed again does not
    move or drop the newer claim when it ends. (The job store alone, on a database no sender watches.)"""
    import asyncio

    import redis.asyncio as aioredis

    from services.common.jobstore import AsyncJobStore, job_key

    url = "redis://127.0.0.1:6379/5"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.hset(job_key("j"), mapping={"kind": "generation", "webhook": "http://x.example/", "webhook_attempts": 2})
    client.zadd(WEBHOOKS_KEY, {"j": 1e12})  # claimed by attempt 2 (its lease far ahead)
    stale, newer = 1, 2  # attempt 1's claim lapsed before its call ended

    async def scenario():
        store = AsyncJobStore(aioredis.Redis.from_url(url))
        await store.settle_webhook("j", stale, None)  # would drop the newer claim
        await store.settle_webhook("j", stale, 100.0)  # would move it
        after_stale = client.zscore(WEBHOOKS_KEY, "j")
        await store.settle_webhook("j", newer, None)  # the holder's settle counts
        await store.redis.aclose()
        return after_stale

    try:
        assert asyncio.run(scenario()) == 1e12 and client.zscore(WEBHOOKS_KEY, "j") is None
    finally:
        client.flushdb()


def test_a_finished_job_posts_its_result_by_either_door(real_stack, receiver):
    hook = receiver()
    body = {"prompt": "a red circle", "num_inference_steps": 2, "seed": 3, "webhook_url": hook.url}
    rest = httpx.post(f"{real_stack.url}/v1/generations", json=body, headers=real_stack.headers()).json()
    with grpc.insecure_channel(real_stack.grpc_target) as channel:
        stub = pb_grpc.LatentdServiceStub(channel)
        auth = (("authorization", f"Bearer {real_stack.keys[0]}"),)
        params = pb.GenerationParams(prompt="a blue square", num_inference_steps=2, seed=4)
        submitted = stub.SubmitGeneration(
            pb.SubmitGenerationRequest(params=params, webhook_url=hook.url), metadata=auth
        )
        assert submitted.job.webhook_url == hook.url
        with pytest.raises(grpc.RpcError) as refused:
            stub.SubmitGeneration(pb.SubmitGenerationRequest(params=params, webhook_url="gopher://x"), metadata=auth)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "webhook_url must be an absolute http or https URL" in refused.value.details()
    calls = hook.wait_for(2)
    by_job = {verified(call)["data"]["id"]: verified(call) for call in calls}
    assert set(by_job) == {rest["id"], submitted.job.id}
    for job_id, payload in by_job.items():
        assert payload["type"] == "job.succeeded"
        shown = httpx.get(f"{real_stack.url}/v1/jobs/{job_id}", headers=real_stack.headers()).json()
        assert payload["data"] == shown and shown["status"] == "succeeded" and len(shown["images"]) == 1
    headers = calls[0][0]
    assert headers["content-type"] == "application/json" and headers["user-agent"].startswith("latentd-webhooks/")
