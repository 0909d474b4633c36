"""The OpenAPI page at /docs, whole without internet: Swagger UI's script, style and icon are
served by the app from a package's copy (fastapi-swagger's, Swagger UI 5, which reads
OpenAPI 3.1) instead of a CDN, where a gateway behind a firewall or a laptop offline would
show a blank page. ReDoc has no packaged copy, so /redoc is off; /openapi.json is the
document itself."""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"


def install_docs(app: FastAPI) -> None:
    folder = resources.files("fastapi_swagger") / "resources"
    app.mount(ASSETS, StaticFiles(directory=str(folder)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")  # behind a proxy, under a prefix
        return get_swagger_ui_html(
            openapi_url=root + (app.openapi_url or "/openapi.json"),
            title=f"{app.title} API",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon-32x32.png",
        )
