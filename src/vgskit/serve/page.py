"""The search page at ``/``: record a spoken query in the browser (or pick a file) and see the images it finds.

Everything the page needs is served by the application from ``vgskit/serve/static/`` (no CDN, no external font
or script), so it works offline. The page records PCM from the microphone with an AudioWorklet (a
ScriptProcessor where worklets are missing) and encodes it as a 16-bit mono WAV in the browser, a format the
service's decoder reads; uploaded files are sent as they are. It then calls ``POST /search``, ``GET /indices`` and
``GET /images/...`` with URLs relative to the page, so the service also works behind a path prefix.

The page is sent with a Content-Security-Policy that allows scripts, styles, requests and images from the
service's own origin only (plus ``blob:``, the recorded query, for playing it back): the page has no inline script,
style or event-handler attribute.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).with_name("static")

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "media-src 'self' blob:",
    "connect-src 'self' blob:",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
))
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # microphone use stays limited to this page's own origin (never a framing page)
    "Permissions-Policy": "microphone=(self), camera=(), geolocation=()",
    "Cache-Control": "no-cache",
}


def mount_page(app: FastAPI) -> None:
    """Serve the page at ``/`` and its assets under ``/static/`` (left out of the OpenAPI description)."""
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(html, headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
