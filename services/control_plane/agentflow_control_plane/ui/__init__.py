"""The operator dashboard, served at ``/ui``: static files only.

The pages are plain HTML, CSS and JavaScript modules (no build step, nothing fetched
from elsewhere). They call the public API like any client: REST under ``/v1`` with the
token the operator pastes, and the event stream over WebSocket with short-lived tickets.
So serving them needs no credentials and grants nothing.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).parent / "static"

#: Everything comes from this origin; no inline script, no framing. A token the page
#: holds is only as safe as the page: this keeps injected markup from running or leaking.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Revalidate (ETag) on every load, so an upgraded control plane serves its own pages.
    "Cache-Control": "no-cache",
}


class _DashboardFiles(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(_HEADERS)
        return response


def mount_ui(app: FastAPI) -> None:
    """Serve the dashboard at ``/ui/`` (``/ui`` redirects there)."""
    app.mount("/ui", _DashboardFiles(directory=STATIC_DIR, html=True), name="ui")


__all__ = ["STATIC_DIR", "mount_ui"]
