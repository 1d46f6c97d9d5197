"""``/docs`` without a CDN: the browser loads nothing from outside this server.

FastAPI's default pages load Swagger UI and ReDoc from jsdelivr (and a favicon from
fastapi.tiangolo.com): a third party would see who reads the docs, and could serve them
altered scripts. With the ``swagger-ui-bundle`` package installed, ``/docs`` is Swagger UI
served from this server; without it, a static page that lists the operations and links
the schema. ReDoc has no offline package, so ``/redoc`` is not served.
"""

from __future__ import annotations

import html
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from medlens.api.problems import Problem

ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}


def swagger_ui_dir() -> Path | None:
    """The folder of the installed Swagger UI bundle, or None."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    path = Path(str(swagger_ui_path))
    return path if all((path / name).is_file() for name in ASSETS) else None


def _static_page(app: FastAPI) -> str:
    """Every operation with its summary, and a link to the schema; no scripts."""
    rows = []
    for path, ops in app.openapi()["paths"].items():
        for method, op in ops.items():
            rows.append(
                f"<tr><td><code>{html.escape(method.upper())}</code></td>"
                f"<td><code>{html.escape(path)}</code></td>"
                f"<td>{html.escape(op.get('summary', ''))}</td></tr>"
            )
    title = html.escape(app.title)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
        f"<body><h1>{title} {html.escape(app.version)}</h1>"
        "<p>The OpenAPI schema: <a href='/openapi.json'>/openapi.json</a>. "
        "(Install <code>swagger-ui-bundle</code> for the interactive Swagger UI.)</p>"
        f"<table><tr><th>method</th><th>path</th><th>what</th></tr>{''.join(rows)}</table>"
        "</body></html>"
    )


def install(app: FastAPI) -> None:
    """``/docs`` (and its assets under ``/docs/assets``); the app must be built with
    ``docs_url=None, redoc_url=None``."""
    assets = swagger_ui_dir()

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        if assets is None:
            return HTMLResponse(_static_page(app))
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - docs",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon-32x32.png",
        )

    @app.get("/docs/assets/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> FileResponse:
        if assets is None or name not in ASSETS:
            raise Problem(404, "Not found", f"no documentation asset {name!r}")
        return FileResponse(
            assets / name, media_type=ASSETS[name], headers={"Cache-Control": "max-age=86400"}
        )
