"""The worker's broker options that the fault suite relies on (services/worker/broker.py, celery_app.py)."""

from __future__ import annotations

from services.common.settings import get_settings
from services.worker.broker import unacked_mutex_expire


def test_the_unacked_sweeps_lock_is_bounded_by_the_visibility_timeout(monkeypatch):
    """kombu's sweep of unacknowledged messages runs under a lock that outlives a worker killed while holding it;
    kombu keeps it 300 s, the worker a quarter of the visibility timeout (the fault suite's 8 s: 2 s)."""
    from services.worker.celery_app import create_celery

    monkeypatch.setenv("LATENTD_VISIBILITY_TIMEOUT_S", "8")
    get_settings.cache_clear()
    try:
        options = create_celery().conf.broker_transport_options
    finally:
        monkeypatch.delenv("LATENTD_VISIBILITY_TIMEOUT_S")
        get_settings.cache_clear()
    assert options["visibility_timeout"] == 8 and options["unacked_mutex_expire"] == 2
    assert unacked_mutex_expire(3600) == 300 and unacked_mutex_expire(2) == 1
