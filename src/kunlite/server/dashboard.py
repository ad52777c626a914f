"""`GET /dashboard`: the live cluster page, static files from the package (no build step).

The page and its scripts hold no data and no secret, so they are served without the API key
(`is_open_path`); the data comes from `GET /v1/cluster`, which the page polls once a second
with `Authorization: Bearer <key>` like any other client. The page asks for the key in a form
and keeps it in sessionStorage (never in the URL: URLs end up in access logs, in the browser's
history and in Referer headers).

A Content-Security-Policy lets the page load scripts, styles and data from this server only.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static" / "dashboard"
PAGE_PATHS = frozenset({"/dashboard", "/dashboard/"})
ASSETS_PREFIX = "/dashboard/static/"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def is_open_path(path: str) -> bool:
    """Whether `path` is the page or one of its static files (answered without the API key)."""
    return path in PAGE_PATHS or path.startswith(ASSETS_PREFIX)


async def dashboard_page(request: Request) -> Response:
    """index.html, with the CSP; not cached, so that a new kunlite's page is picked up."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                                 "Referrer-Policy": "no-referrer"})


def dashboard_routes() -> list[BaseRoute]:
    """The page at /dashboard and its scripts and styles under /dashboard/static/."""
    return [Route("/dashboard", dashboard_page, methods=["GET"]),
            Mount(ASSETS_PREFIX.rstrip("/"), app=StaticFiles(directory=STATIC_DIR), name="dashboard-static")]
