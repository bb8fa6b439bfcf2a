"""/docs (Swagger UI) and /redoc (ReDoc) served with their scripts and styles from this service.

FastAPI's own pages load them from a CDN, which leaves the docs blank on a machine without internet, where
the embedded set-up often runs. The files are the copies the `fastapi-offline` package ships (Swagger UI 5,
which renders OpenAPI 3.1, and ReDoc 2); only its static folder is used, mounted under `/docs-assets`.
"""

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from app.auth.dependencies import open_route

ASSETS_URL = "/docs-assets"
ASSETS_PACKAGE = "fastapi_offline"


def install(app: FastAPI, *, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Add the docs pages to an app created with `docs_url=None, redoc_url=None`."""
    assets = files(ASSETS_PACKAGE) / "static"
    app.mount(ASSETS_URL, StaticFiles(directory=str(assets)), name="docs-assets")

    def urls(request: Request) -> tuple[str, str]:
        root = request.scope.get("root_path", "")
        return f"{root}{app.openapi_url}", f"{root}{ASSETS_URL}"

    @app.get(docs_url, include_in_schema=False, dependencies=[open_route()])
    async def swagger_ui(request: Request) -> HTMLResponse:
        openapi_url, base = urls(request)
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{base}/swagger-ui-bundle.js",
            swagger_css_url=f"{base}/swagger-ui.css",
            swagger_favicon_url=f"{base}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @app.get(redoc_url, include_in_schema=False, dependencies=[open_route()])
    async def redoc(request: Request) -> HTMLResponse:
        openapi_url, base = urls(request)
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{base}/redoc.standalone.js",
            redoc_favicon_url=f"{base}/favicon.png",
            with_google_fonts=False,
        )
