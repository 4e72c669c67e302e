"""The page at / and the offline API docs, in process: what the gateway serves, and that it ships in the package."""

from __future__ import annotations

import re
import tomllib

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.api.web import STATIC_DIR
from services.common.settings import Settings, hash_key
from tests.conftest import ROOT

STATIC_FILES = sorted(p.relative_to(STATIC_DIR.parent).as_posix() for p in STATIC_DIR.rglob("*") if p.is_file())


@pytest.fixture
def client():
    settings = Settings(redis_url="redis://127.0.0.1:6379/12", api_key_hashes=hash_key("secret-key"))
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_the_page_is_served_at_the_root_without_a_key(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in re.findall(r'(?:src|href)="(web/[^"]+)"', page.text):
        assert client.get("/" + asset).status_code == 200, asset
    assert client.get("/v1/models").status_code == 401  # the API itself still wants the key
    assert "/" not in client.get("/openapi.json").json()["paths"]


def test_modules_are_served_as_javascript(client):
    for path in STATIC_FILES:
        if path.endswith(".js"):
            response = client.get("/web/" + path.removeprefix("static/"))
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/javascript"), path
            assert response.headers["cache-control"] == "no-cache"


def test_the_static_files_reach_nothing_outside_the_gateway():
    for path in STATIC_FILES:
        text = (STATIC_DIR.parent / path).read_text()
        text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import|@font-face", text), path


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


def test_package_data_ships_every_static_file():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "services.api.web"
    ]
    shipped = {p.relative_to(STATIC_DIR.parent).as_posix() for g in globs for p in STATIC_DIR.parent.glob(g)}
    missing = [path for path in STATIC_FILES if path not in shipped]
    assert STATIC_FILES and not missing, f"not in pyproject's package-data: {missing}"


def test_the_gateway_image_installs_the_docs_assets():
    """The image installs requirements/api.txt and copies services/: the docs assets and the page come along."""
    assert re.search(r"^fastapi-offline==", (ROOT / "requirements" / "api.txt").read_text(), re.M)
    assert "COPY services/ services/" in (ROOT / "deploy" / "docker" / "gateway.Dockerfile").read_text()
