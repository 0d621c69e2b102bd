"""The web app's page and assets, all served by this app (no CDN: it works offline).

One page (`index.html`) answers `/` and `/c/{id}`, so a conversation has a URL that survives a reload;
the script routes from the path. A strict Content-Security-Policy backs the renderer's own guarantee
(untrusted text only ever reaches the page as text nodes): no inline script, no foreign origin, no
plugin, so even a sanitizer bug could not run a script or send data elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

STATIC = Path(__file__).parent / "static"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Revalidate on every load (cheap with ETag): an upgraded server never runs a stale script.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
@router.get("/c/{conversation_id}")
async def page(conversation_id: str | None = None) -> Response:
    return FileResponse(STATIC / "index.html", headers=SECURITY_HEADERS)


class Assets(StaticFiles):
    """StaticFiles with the page's security headers on every asset."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def mount(app: Any) -> None:
    app.include_router(router)
    app.mount("/static", Assets(directory=STATIC), name="static")
