"""The page at `/` and the API docs at `/docs` and `/redoc`, all served from files installed with the gateway.

Nothing here reaches the network: the page is plain ES modules and CSS under `static/`, and Swagger UI and
ReDoc load their JS and CSS from the `fastapi_offline` package (its copy of the swagger-ui and redoc dist
files), so an air-gapped gateway still shows something to look at. The page calls the public REST API and
SSE like any other frontend.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
DOCS_ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
PAGE_PREFIX = "/web"
DOCS_ASSETS_PREFIX = "/docs-assets"

# The browser itself refuses anything that is not this gateway: a guarantee that the page and the docs never
# call out (Redoc's sidebar would fetch its vendor's logo from a CDN; with this it does not try).
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; "
    "base-uri 'self'; frame-ancestors 'self'"
)
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'self'"
)


class RevalidatedFiles(StaticFiles):
    """The page's modules, revalidated on every load (ETag, so mostly 304s): after an upgrade the browser never
    runs an old module beside the new index.html."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def install(app: FastAPI) -> None:
    """Mount the page and the offline docs. The FastAPI app must be built with docs_url=None, redoc_url=None."""
    app.mount(PAGE_PREFIX, RevalidatedFiles(directory=STATIC_DIR), name="web")
    app.mount(DOCS_ASSETS_PREFIX, StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(
            STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache", "Content-Security-Policy": PAGE_CSP}
        )

    def _root(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = _root(request)
        html = get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS_PREFIX}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS_PREFIX}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS_PREFIX}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # the validator badge would call swagger.io
        )
        html.headers["Content-Security-Policy"] = DOCS_CSP
        return html

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = _root(request)
        html = get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS_PREFIX}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS_PREFIX}/favicon.png",
            with_google_fonts=False,
        )
        html.headers["Content-Security-Policy"] = DOCS_CSP
        return html
