"""The offline API docs, in process: what the gateway serves, and that the image carries it."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.common.settings import Settings, hash_key
from tests.conftest import ROOT


@pytest.fixture
def client():
    settings = Settings(redis_url="redis://127.0.0.1:6379/12", api_key_hashes=hash_key("secret-key"))
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.mark.parametrize(
    ("path", "assets"),
    [
        ("/docs", ("/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css")),
        ("/redoc", ("/docs-assets/redoc.standalone.js",)),
    ],
)
def test_the_api_docs_load_their_assets_from_the_gateway(client, path, assets):
    page = client.get(path)
    assert page.status_code == 200
    assert "default-src 'self'" in page.headers["content-security-policy"]
    urls = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert urls and all(url.startswith("/") for url in urls), urls
    for asset in assets:
        assert asset in urls
        assert client.get(asset).status_code == 200


def test_the_gateway_image_installs_the_docs_assets():
    """The image installs requirements/api.txt: the swagger-ui and redoc files come along."""
    assert re.search(r"^fastapi-offline==", (ROOT / "requirements" / "api.txt").read_text(), re.M)
