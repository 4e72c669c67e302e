"""Kombu's Redis transport when Redis itself crashes under a consuming worker (kombu 5.7).

Celery reacts to a lost broker connection by closing it and connecting again. Closing the channel restores its
unacknowledged messages first (`QoS.restore_unacked`), through a connection the close has already taken apart:
an AttributeError ("'NoneType' object has no attribute 'hostname'", from `Channel._connparams`), which Celery
takes for an unrecoverable error. The worker then finishes its running jobs and exits 1 instead of
reconnecting (seen with Redis SIGKILLed under two consuming workers: tests/faults). The same happens to the acks
of the jobs that were running, sent after the reconnect through the old channel.

Redis full (its maxmemory, noeviction) refuses kombu's MULTI of an ack, even of its ZREM, and of a delivery's
unacked entry: Celery took that for unrecoverable too, and the worker exited (tests/faults, Redis full past the
retry budget). Those give up as well, keeping kombu's in-memory count of delivered messages right.

`install()` lets both give up instead: the messages stay in kombu's unacked index, which the new connection's
sweep (`unacked_restore_interval`) puts back on the queue after the visibility timeout. For latentd that is only
a spare "run one job" token: a task that finds no queued job returns at once (services/worker/tasks.py), and
the jobs themselves live in the job store with leases, not in the messages.

That sweep runs under a Redis lock (`unacked_mutex`) that expires after `unacked_mutex_expire`, 300 s by
default: a worker SIGKILLed while it holds the lock stops every other worker's sweep for five minutes (a
redelivery the fault suite waits 60 s for did not come, once in a CI run). The sweep takes milliseconds;
`unacked_mutex_expire()` bounds the lock by the visibility timeout instead.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from services.common.jobstore import redis_full

log = logging.getLogger(__name__)


UNACKED_MUTEX_KEY = "unacked_mutex"  # kombu's default name of the sweep's lock


def unacked_mutex_expire(visibility_timeout_s: int) -> int:
    """Seconds the unacked sweep's lock lives: a quarter of the visibility timeout, 1 to 300 (kombu's default)."""
    return max(1, min(300, int(visibility_timeout_s) // 4))


def _tolerating_a_lost_connection(
    method: Callable[..., Any], what: str, books: Callable[..., Any] | None = None
) -> Callable[..., Any]:
    """`method` that gives up on a connection closed under it, and on Redis full; `books`: what it must still do in
    memory then (kombu's virtual QoS: the delivered-tag count that decides whether the worker may take more)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except AttributeError as error:  # the channel's connection is gone (closed while Redis was away)
            log.warning("broker connection gone: %s left to the visibility timeout (%s)", what, error)
            return None
        except redis.exceptions.RedisError as error:
            if not redis_full(error):
                raise
            # Redis full refuses kombu's MULTI of an ack (even its ZREM): Celery would take that for unrecoverable
            # and the worker would exit. Its message stays in the unacked index, a spare token after the timeout.
            log.warning("Redis full: %s left to the visibility timeout (%s)", what, error)
            return books(self, *args, **kwargs) if books is not None else None

    wrapper.__latentd_tolerant__ = True
    return wrapper


def install() -> None:
    """Once per process, before the worker consumes."""
    qos = kombu_redis.QoS
    if getattr(qos.restore_unacked, "__latentd_tolerant__", False):
        return
    qos.restore_unacked = _tolerating_a_lost_connection(qos.restore_unacked, "unacknowledged messages")
    qos.ack = _tolerating_a_lost_connection(qos.ack, "an acknowledgement", virtual.QoS.ack)
    qos.append = _tolerating_a_lost_connection(qos.append, "a delivered message's unacked entry", virtual.QoS.append)
