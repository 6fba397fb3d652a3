"""Cross-origin requests, for browser and other web apps. Off by default.

Enabled by `serve --cors-origins ORIGINS`, else the environment variable
OVMS_PLUGIN_CORS_ORIGINS, else `cors_origins` in settings.yaml (a list, or one string);
ORIGINS are separated by commas or spaces. Each is an origin as browsers send it
(`http://localhost:3000`, `https://app.example.com`, `null` for file pages), `*` for any, or
a pattern with `*` wildcards (`http://localhost:*`, `chrome-extension://*`); compared without
regard to case.

- A preflight (OPTIONS with Origin and Access-Control-Request-Method) from an allowed origin
  is answered 204 here, before the API key is checked (browsers send preflights without
  credentials): the origin, the methods (GET, HEAD, POST, DELETE, OPTIONS), the headers it
  asked for, and Access-Control-Max-Age.
- Every response to an allowed origin, streamed ones included, carries
  Access-Control-Allow-Origin (that origin), `Vary: Origin` and
  Access-Control-Expose-Headers (X-Request-ID, Retry-After).
- A request whose Origin is not allowed (with CORS off: any Origin but the server's own) is
  refused 403, preflight or not. A browser would not let the page read the answer anyway,
  but it does send "simple" requests without asking first: this keeps a web page the user
  happens to visit from pulling or deleting models, or running them, through this server.
  Clients that are not browsers send no Origin and are not affected.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ovms_plugin import settings
from ovms_plugin.http.common import error_response, json_response
from ovms_plugin.http.ops import Handler

log = logging.getLogger(__name__)

ENV = "OVMS_PLUGIN_CORS_ORIGINS"
SETTING = "cors_origins"
METHODS = ("GET", "HEAD", "POST", "DELETE", "OPTIONS")
EXPOSED = "X-Request-ID, Retry-After"
MAX_AGE = "600"  # seconds a browser may keep a preflight's answer
_ORIGIN = re.compile(r"^(\*|null|[a-z][a-z0-9+.-]*://[^\s/,]+)$")


@dataclass(frozen=True)
class CorsPolicy:
    origins: tuple[str, ...] = ()  # lower-case origins or patterns; empty: CORS is off

    @property
    def enabled(self) -> bool:
        return bool(self.origins)

    def allows(self, origin: str) -> bool:
        origin = origin.strip().lower()
        return any(p == "*" or fnmatch.fnmatchcase(origin, p) for p in self.origins)


CORS = web.AppKey("cors", CorsPolicy)


def parse_origins(value: Any, where: str = "--cors-origins") -> tuple[str, ...]:
    """The origins of a flag, variable or setting (a string separated by commas or spaces,
    or a list of strings); raises ValueError naming the bad one."""
    if value is None:
        return ()
    if isinstance(value, str):
        items: Iterable[Any] = re.split(r"[,\s]+", value)
    elif isinstance(value, list | tuple):
        items = value
    else:
        raise ValueError(f"{where} must be a list of origins or a string of them separated by "
                         f"commas, got {value!r}")
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{where}: {item!r} is not an origin (a string like "
                             "http://localhost:3000)")
        origin = item.strip().rstrip("/").lower()
        if not origin:
            continue
        if not _ORIGIN.match(origin):
            raise ValueError(f"{where}: {item!r} is not an origin; give scheme://host[:port] "
                             "(like http://localhost:3000, no path), 'null', '*', or a "
                             "pattern like http://localhost:*")
        out.append(origin)
    return tuple(dict.fromkeys(out))


def configured_origins(flag: Any = None) -> tuple[str, ...]:
    """The allowed origins: the flag's when given, else $OVMS_PLUGIN_CORS_ORIGINS, else the
    `cors_origins` setting. Raises settings.SettingsError for a bad value."""
    try:
        if flag is not None:
            return parse_origins(flag)
        if os.environ.get(ENV):
            return parse_origins(os.environ[ENV], ENV)
        return parse_origins(settings.current().cors_origins, f"setting {SETTING}")
    except ValueError as e:
        raise settings.SettingsError(str(e)) from None


def setup(app: web.Application, origins: Iterable[str] = ()) -> None:
    """Keeps the policy on the app and adds the CORS headers to every response; the
    middleware (`middleware`, before the API key check) answers preflights."""
    app[CORS] = CorsPolicy(tuple(origins))
    app.on_response_prepare.append(_add_headers)
    if app[CORS].enabled:
        log.info("cross-origin requests allowed from: %s", ", ".join(app[CORS].origins))


def _same_origin(request: web.Request, origin: str) -> bool:
    """The Origin is this server's own (a page it served calling it)."""
    host = request.headers.get("Host", "")
    return bool(host) and origin.lower() in (f"http://{host}".lower(),
                                             f"https://{host}".lower())


def _refuse(request: web.Request, message: str) -> web.Response:
    if request.path.startswith("/api/"):  # the Ollama routes answer {"error": "..."}
        return json_response({"error": message}, 403)
    return error_response(403, message, code="origin_not_allowed")


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    origin = request.headers.get("Origin")
    if origin is None:
        return await handler(request)
    policy = request.app.get(CORS) or CorsPolicy()
    preflight = request.method == "OPTIONS" and \
        "Access-Control-Request-Method" in request.headers
    if not policy.allows(origin) and (preflight or not _same_origin(request, origin)):
        if policy.enabled:
            why = f"origin {origin!r} is not allowed by this server's --cors-origins"
        else:
            why = (f"cross-origin requests are off on this server (origin {origin!r}); start "
                   "it with --cors-origins ORIGIN to allow a web app")
        return _refuse(request, why)
    if not preflight:
        return await handler(request)
    method = request.headers["Access-Control-Request-Method"].strip().upper()
    if method not in METHODS:
        return _refuse(request, f"method {method} is not allowed here; use one of "
                                f"{', '.join(METHODS)}")
    headers = {"Access-Control-Allow-Origin": origin,
               "Access-Control-Allow-Methods": ", ".join(METHODS),
               "Access-Control-Max-Age": MAX_AGE,
               "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"}
    asked = request.headers.get("Access-Control-Request-Headers", "").strip()
    if asked:
        headers["Access-Control-Allow-Headers"] = asked
    return web.Response(status=204, headers=headers)


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: CORS headers for an allowed origin (a preflight has its own)."""
    origin = request.headers.get("Origin")
    policy = request.app.get(CORS)
    if origin is None or policy is None or not policy.allows(origin) or \
            "Access-Control-Allow-Origin" in response.headers:
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = EXPOSED
    vary = response.headers.get("Vary")
    response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"
