"""Settings that cannot work together are refused at start, naming each setting and what to change."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from services.common import rules
from services.common.settings import Settings


def test_the_default_webhook_retries_fit_inside_the_result_ttl():
    # 8 calls of at most 10 s, 5 + 20 + 80 + 320 + 900 · 3 s between them
    assert rules.webhook_span_s(8, 5.0, 10.0) == 80 + 5 + 20 + 80 + 320 + 900 * 3 == 3205
    settings = Settings()
    span = rules.webhook_span_s(settings.webhook_attempts, settings.webhook_retry_s, settings.webhook_timeout_s)
    assert span <= settings.result_ttl_s


def test_webhook_retries_that_outlast_the_jobs_record_are_refused():
    with pytest.raises(
        ValidationError, match=r"LATENTD_WEBHOOK_ATTEMPTS=12 with .* up to 6845 s .* LATENTD_RESULT_TTL_S=3600"
    ):
        Settings(webhook_attempts=12)
    with pytest.raises(ValidationError, match="up to 3205 s after its job ends, past LATENTD_RESULT_TTL_S=600"):
        Settings(result_ttl_s=600, webhook_attempts=8)
    assert Settings(result_ttl_s=600, webhooks=False, webhook_attempts=8).result_ttl_s == 600  # no webhooks: nothing


def test_a_lowered_ttl_with_the_default_webhook_retries_starts_and_the_sender_says_so(monkeypatch, caplog):
    """The TTL alone lowered (to keep Redis small, say): the gateway starts; the sender warns that the last retries
    can find the record gone."""
    from services.core.webhooks import WebhookSender

    monkeypatch.setenv("LATENTD_RESULT_TTL_S", "600")
    settings = Settings()
    assert settings.result_ttl_s == 600 and settings.webhook_span_s == 3205
    with caplog.at_level("WARNING", logger="latentd.webhooks"):
        sender = WebhookSender(settings, store=None)
    asyncio.run(sender.stop())
    assert "webhook retries span up to 3205 s, past LATENTD_RESULT_TTL_S=600" in caplog.text
    assert Settings(result_ttl_s=600, webhook_attempts=3, webhook_retry_s=10).result_ttl_s == 600  # 30 + 10 + 40 s


def test_webhook_settings_from_the_environment_count_as_asked_for(monkeypatch):
    monkeypatch.setenv("LATENTD_RESULT_TTL_S", "600")
    monkeypatch.setenv("LATENTD_WEBHOOK_ATTEMPTS", "8")
    with pytest.raises(ValidationError, match="LATENTD_WEBHOOK_ATTEMPTS=8"):
        Settings()
