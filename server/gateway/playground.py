"""The browser playground: GET / (and /playground) serves one chat page over this server's own /v1 API.

Its three files ship in the package (server/gateway/static); nothing is fetched from elsewhere. The page is
public like /health; what it sends to /v1 carries the API key typed into it. The Content-Security-Policy allows
only this origin's own script, style and API, and no inline script at all, so model output cannot run code.
Off with --no-playground (DSV2_PLAYGROUND=false).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.responses import FileResponse

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {"playground.js": "text/javascript", "playground.css": "text/css"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
@router.get("/playground")
async def page() -> FileResponse:
    return FileResponse(STATIC / "playground.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/playground/{name}")
async def asset(name: str) -> FileResponse:
    from server.gateway.errors import APIError

    if name not in ASSETS:
        raise APIError(f"unknown route GET /playground/{name}", 404)
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=HEADERS)
