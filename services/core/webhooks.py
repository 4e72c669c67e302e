"""Webhooks: a job submitted with a `webhook_url` is POSTed to it once it ends (succeeded, failed or cancelled).

Delivery is at least once. The script that ends a job (jobstore: every way a job ends goes through `leave`) adds
it to latentd:webhooks in the same step, so an ended job is never missed; every gateway process (REST and gRPC)
runs a WebhookSender, which claims due jobs with a lease (a process that dies mid-call leaves its claims to the
others once the lease runs out) and settles each after its call: done on a 2xx, or due again after a backoff
(rules.WEBHOOK_RETRY_S · 4^(n−1), capped at rules.WEBHOOK_MAX_RETRY_S), until `webhook_attempts` calls; a 410
Gone also ends it (the receiver asks for no more). A receiver must therefore accept a repeat: every call for one
job carries the same `webhook-id`.

The call, as Standard Webhooks (standardwebhooks.com) describe it:

    POST <webhook_url>
    content-type: application/json
    webhook-id: <job id>.<status>
    webhook-timestamp: <unix seconds of this call>
    webhook-signature: v1,<base64 HMAC-SHA256(key, "<webhook-id>.<webhook-timestamp>.<body>")>   (with a secret)

    {"type": "job.succeeded", "timestamp": "<ISO 8601 of the job's end>", "data": <the job, as GET /v1/jobs/{id}>}

The target is resolved at each call and, unless the deployment allows private targets, refused if any of its
addresses is loopback, private, link-local or reserved; the call then goes to the address checked (not to a
second lookup that could answer otherwise), with the host name kept for TLS and the Host header. No redirect is
followed and the response body is not read.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import logging
import socket
import time
import urllib.parse
from datetime import UTC, datetime

import httpx
import redis.exceptions
from prometheus_client import Counter, Histogram

from services.common import rules
from services.common.jobs import JobRecord
from services.common.jobstore import AsyncJobStore, cancel_and_wait
from services.common.settings import Settings
from services.common.signing import HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, signature, signing_key

log = logging.getLogger("latentd.webhooks")

deliveries_total = Counter(
    "latentd_webhook_deliveries_total",
    "Webhook calls by outcome: delivered (a 2xx), retrying (another call is due later), gave_up (the last "
    "attempt failed, or the receiver answered 410 Gone), refused (a target on a private address or no host name); "
    "expired: due webhooks dropped because their job expired first.",
    ["outcome"],
)
delivery_seconds = Histogram(
    "latentd_webhook_delivery_seconds",
    "Seconds from a job's end to its webhook's delivery (a 2xx), retries included.",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)


RESOLVER_THREADS = 4  # host-name lookups of webhook calls at once, per gateway process


class TargetRefused(Exception):
    """The webhook's host resolves to an address the deployment does not call."""


def payload(job: JobRecord) -> bytes:
    """The same bytes at every attempt (so a receiver may compare a repeat): the job as it ended, and when."""
    ended = job.ended_at or job.created_at  # (a job that ended before ended_at was written: its creation)
    return json.dumps(
        {
            "type": f"job.{job.status}",
            "timestamp": datetime.fromtimestamp(float(ended), UTC).isoformat(),
            "data": job.view(),
        },
        separators=(",", ":"),
    ).encode()


class WebhookSender:
    """Claims due webhooks and calls them, up to `concurrency` at once, until stopped."""

    def __init__(self, settings: Settings, store: AsyncJobStore, *, concurrency: int = 32, poll_s: float = 0.5):
        self.settings = settings
        self.store = store
        self.concurrency = concurrency
        self.poll_s = poll_s
        # a claim outlives a call (its lookup and its timeout) several times over before another process retakes it
        self.lease_s = 3 * settings.webhook_timeout_s + 10
        self.key = signing_key(settings.webhook_secret) if settings.webhook_secret else None
        if self.key is None:
            log.warning("LATENTD_WEBHOOK_SECRET is not set: webhook calls go out unsigned")
        if settings.webhook_span_s > settings.result_ttl_s:  # settings.py refuses this where retries were asked for
            log.warning(
                "webhook retries span up to %.0f s, past LATENTD_RESULT_TTL_S=%d: a job's last calls can find its record "
                "expired (counted as expired); lower LATENTD_WEBHOOK_ATTEMPTS to fit",
                settings.webhook_span_s,
                settings.result_ttl_s,
            )
        self.client = httpx.AsyncClient(
            timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False, verify=True
        )
        self._calls: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        self._resolver = concurrent.futures.ThreadPoolExecutor(RESOLVER_THREADS, thread_name_prefix="webhook-dns")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webhooks")

    async def stop(self) -> None:
        """Stop claiming and drop the calls in flight: their claims lapse and another process makes them."""
        for task in [t for t in (self._task, *self._calls) if t is not None]:
            try:
                await cancel_and_wait(task)  # a task awaiting redis.asyncio may need the cancel more than once
            except Exception:  # a call that ended with an error as it was stopped
                log.debug("a webhook task ended with an error as it was stopped", exc_info=True)
        await self.client.aclose()
        self._resolver.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        while True:
            free = self.concurrency - len(self._calls)
            if free <= 0:
                await asyncio.wait(self._calls, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                claimed, expired = await self.store.claim_webhooks(self.lease_s, free)
            except Exception as error:  # Redis away (the jobs wait there), or anything else: the sender goes on
                redis_away = isinstance(error, (redis.exceptions.RedisError, OSError))
                log.warning("could not claim due webhooks (%s); trying again", error, exc_info=not redis_away)
                await asyncio.sleep(max(self.poll_s, 1.0))
                continue
            if expired:  # their records went first (RESULT_TTL_S): nothing is left to send
                deliveries_total.labels(outcome="expired").inc(expired)
                log.warning("%d due webhook(s) dropped: their jobs expired before a 2xx", expired)
            for job_id, attempt in claimed:
                call = asyncio.create_task(self._deliver(job_id, attempt))
                self._calls.add(call)
                call.add_done_callback(self._calls.discard)
            if len(claimed) < free:
                await asyncio.sleep(self.poll_s)

    async def _deliver(self, job_id: str, attempt: int) -> None:
        try:
            job = await self.store.get(job_id)
            if job is None or not job.webhook_url or not job.terminal:  # expired; or never due (kept defensively)
                await self.store.settle_webhook(job_id, attempt, None)
                return
            try:
                async with asyncio.timeout(self.settings.webhook_timeout_s):  # the whole call: lookup, connect, answer
                    outcome = await self._call(job)
            except TimeoutError:
                outcome = None, f"no answer within {self.settings.webhook_timeout_s:g} s"
            except Exception as error:  # anything else this call raised is this attempt's failure, never the sender's
                log.warning("webhook of job %s: attempt %d raised", job_id, attempt, exc_info=True)
                outcome = None, f"{type(error).__name__}: {error}"
            if outcome is None:
                deliveries_total.labels(outcome="delivered").inc()
                delivery_seconds.observe(max(0.0, time.time() - (job.ended_at or time.time())))
                await self.store.settle_webhook(job_id, attempt, None)
                return
            final, why = outcome
            if final or attempt >= self.settings.webhook_attempts:
                deliveries_total.labels(outcome="refused" if final == "refused" else "gave_up").inc()
                log.warning("webhook of job %s: gave up after %d attempts (%s)", job_id, attempt, why)
                await self.store.settle_webhook(job_id, attempt, None)
                return
            delay = rules.webhook_retry_delay_s(attempt, self.settings.webhook_retry_s)
            deliveries_total.labels(outcome="retrying").inc()
            log.info("webhook of job %s: attempt %d failed (%s); again in %.1f s", job_id, attempt, why, delay)
            await self.store.settle_webhook(job_id, attempt, delay)
        except (redis.exceptions.RedisError, OSError) as error:  # the claim's lease runs out; another call follows
            log.warning("webhook of job %s: Redis failed (%s); its claim lapses and it is tried again", job_id, error)

    async def _call(self, job: JobRecord) -> tuple[str | None, str] | None:
        """None when delivered; else (why it is final, or None where a retry may help; what happened)."""
        body = payload(job)
        message_id = f"{job.id}.{job.status}"
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "latentd-webhooks/1",
            HEADER_ID: message_id,
            HEADER_TIMESTAMP: str(timestamp),
        }
        if self.key is not None:
            headers[HEADER_SIGNATURE] = signature(self.key, message_id, timestamp, body)
        try:
            url, extensions, host = await self._target(job.webhook_url)
        except TargetRefused as error:
            return "refused", str(error)
        except OSError as error:  # the name does not resolve (now): a later attempt may
            return None, f"could not resolve the host: {error}"
        try:
            async with self.client.stream(
                "POST", url, content=body, headers=headers | {"host": host}, extensions=extensions
            ) as response:
                status = response.status_code
        except httpx.HTTPError as error:
            return None, f"{type(error).__name__}: {error}"
        if 200 <= status < 300:
            return None
        if status == 410:
            return "gone", "the receiver answered 410 Gone"
        return None, f"the receiver answered {status}"

    async def _target(self, url: str) -> tuple[str, dict, str]:
        """The URL with its host replaced by the address it was checked at, the TLS name, and the Host header."""
        parts = urllib.parse.urlsplit(url)
        https = parts.scheme.lower() == "https"
        port = parts.port or (443 if https else 80)
        try:
            # on a pool of its own: a receiver's slow DNS must not hold the threads every submit uses
            resolve = functools.partial(socket.getaddrinfo, parts.hostname, port, type=socket.SOCK_STREAM)
            infos = await asyncio.get_running_loop().run_in_executor(self._resolver, resolve)
        except UnicodeError as error:  # a host name IDNA cannot encode: no later attempt fares better
            raise TargetRefused(f"{parts.hostname!r} is not a host name that resolves ({error})") from None
        addresses = [info[4][0] for info in infos]
        if not self.settings.webhook_allow_private:
            private = [a for a in addresses if not rules.public_address(a)]
            if private:
                raise TargetRefused(f"{parts.hostname} resolves to {private[0]}, a private address")
        address = addresses[0]
        netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        pinned = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        host = parts.netloc.rpartition("@")[2]
        return pinned, ({"sni_hostname": parts.hostname} if https else {}), host
