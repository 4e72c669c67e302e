"""A 401 says how to authenticate (`WWW-Authenticate: Bearer`, RFC 9110 11.6.1) on every REST route, the OpenAI
ones (whose clients send `Authorization: Bearer <key>`) among them. The gateway alone, in process, on real Redis."""

from __future__ import annotations

import pytest
import redis
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.common.settings import Settings, hash_key

REDIS_URL = "redis://127.0.0.1:6379/10"
KEY = "auth-key"


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setenv("LATENTD_API_METRICS_PORT", "off")
    redis.Redis.from_url(REDIS_URL).flushdb()
    with TestClient(create_app(Settings(redis_url=REDIS_URL, api_key_hashes=hash_key(KEY)))) as test_client:
        yield test_client
    redis.Redis.from_url(REDIS_URL).flushdb()


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/v1/images/generations", {"json": {"prompt": "x"}}),
        ("POST", "/v1/images/edits", {"files": {"image": ("in.png", b"x", "image/png")}, "data": {"prompt": "x"}}),
        ("POST", "/v1/generations", {"json": {"prompt": "x"}}),
        ("GET", "/v1/models", {}),
        ("GET", "/v1/jobs/0123456789abcdef", {}),  # the polling hot path authenticates on its own
    ],
)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "Basic YTpi"])
def test_a_401_names_the_bearer_scheme(client, method, path, body, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    response = client.request(method, path, headers=headers, **body)
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_an_authenticated_answer_has_no_challenge(client):
    response = client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200 and "WWW-Authenticate" not in response.headers
