"""``/dashboard``: a live page of the fleet, served by the API under the management rules.

The page is static HTML and JavaScript with a vendored charting library (uPlot, MIT, see
``dashboard/vendor``); it polls the API's own read endpoints (stats, health, workers,
metrics, series, alerts) every two seconds and calls the management endpoints for its
controls, so it shows nothing the API does not and keeps no store of its own.

Who may open it follows the management endpoints: with ``API_TOKEN`` set, a bearer token,
or ``/dashboard?token=<API_TOKEN>`` once, which sets an HttpOnly, SameSite=Strict session
cookie (an HMAC of the token, never the token) and redirects to a clean address; without a
token, loopback clients only. A cookie rides along with any request to the site, so a
management call made with it must also carry the ``X-Dashboard`` header, which a page of
another site cannot set without a CORS preflight this API never grants.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from common.settings import ApiSettings

# Module level: FastAPI resolves the (string) annotations against the module's globals.
BEARER = HTTPBearer(auto_error=False)
HERE = Path(__file__).with_name("dashboard")
SESSION_COOKIE = "dashboard_session"
CSRF_HEADER = "x-dashboard"
# What the page loads: nothing else under the folder is served.
ASSETS = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
    "uPlot.iife.min.js": "text/javascript",
    "uPlot.min.css": "text/css",
}
VENDOR = HERE / "vendor" / "uplot-1.6.32"


def session_value(token: str) -> str:
    return hmac.new(token.encode(), b"dashboard-session", hashlib.sha256).hexdigest()


def authorize(request: Request, bearer: str | None, token: str | None) -> None:
    """The management rule: the token (bearer or the dashboard's cookie), else loopback."""
    if token:
        if bearer and hmac.compare_digest(bearer.encode(), token.encode()):
            return
        cookie = request.cookies.get(SESSION_COOKIE, "")
        if cookie and hmac.compare_digest(cookie.encode(), session_value(token).encode()):
            if request.method in ("GET", "HEAD") or request.headers.get(CSRF_HEADER) == "1":
                return
            raise HTTPException(403, detail=f"a session call must carry the {CSRF_HEADER} header")
        raise HTTPException(
            401,
            detail="a valid bearer token is required (Authorization: Bearer <API_TOKEN>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    host = request.client.host if request.client else ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host in ("localhost", "testclient")
    if not loopback:
        raise HTTPException(
            403, detail="no API_TOKEN is configured: management is open to loopback only"
        )


def add_dashboard(app: FastAPI, settings: ApiSettings, manage: Any) -> None:
    @app.get("/dashboard", include_in_schema=False, response_model=None)
    def dashboard(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
        token: str | None = Query(None, max_length=1024),
    ) -> Response:
        if token is not None and settings.token:
            if not hmac.compare_digest(token.encode(), settings.token.encode()):
                raise HTTPException(401, detail="wrong token")
            # The token leaves the address (and the history) at once.
            response = RedirectResponse("/dashboard", status_code=303)
            response.set_cookie(
                SESSION_COOKIE,
                session_value(settings.token),
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
                path="/",
            )
            return response
        authorize(request, credentials.credentials if credentials else None, settings.token)
        return FileResponse(HERE / "index.html", media_type="text/html", headers=_NO_STORE)

    @app.get("/dashboard/assets/{name}", include_in_schema=False, dependencies=[manage])
    def asset(name: str) -> FileResponse:
        if name not in ASSETS:
            raise HTTPException(404, detail=f"no asset {name!r}")
        folder = VENDOR if name.startswith("uPlot") else HERE
        return FileResponse(folder / name, media_type=ASSETS[name])


_NO_STORE = {"Cache-Control": "no-store", "X-Frame-Options": "DENY"}
