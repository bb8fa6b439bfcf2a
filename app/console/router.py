"""/console: the console's files, shipped in this package (app/console/static), open since they hold no data.

Every data call the page makes goes to the public API with the key the person pasted (kept in the tab's
sessionStorage), so the page itself needs no key. Its responses carry a strict Content-Security-Policy:
scripts, styles and connections from this origin only, images from it or from `blob:` (face images are
fetched with the key and shown as object URLs), no inline script, no framing.
"""

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

from app.auth.dependencies import open_route
from app.problems import not_found

router = APIRouter(prefix="/console", include_in_schema=False)

STATIC = files("app.console") / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _asset_names() -> dict[str, str]:
    """The files that may be served, by name (a fixed list: no path from the request reaches the disk)."""
    return {
        entry.name: MEDIA_TYPES[suffix]
        for entry in STATIC.iterdir()
        if entry.is_file() and (suffix := "." + entry.name.rsplit(".", 1)[-1]) in MEDIA_TYPES
    }


ASSETS = _asset_names()


def _file(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise not_found("console-file", name)
    return Response((STATIC / name).read_bytes(), media_type=media_type, headers=HEADERS)


@router.get("", dependencies=[open_route()])
async def console_page() -> Response:
    """The console's page."""
    return _file("index.html")


@router.get("/{name}", dependencies=[open_route()])
async def console_asset(name: str) -> Response:
    """One of the console's scripts or styles."""
    return _file(name)
