"""Operations: the request log and metrics, the API key, errors as HTTP responses, and the
/health, /ready and /metrics routes.

Middlewares, outermost first: `access` (request id, one log line per request, the server's
metrics), `auth` (Bearer API key on every route but /health), `errors` (service errors,
aiohttp's own 404/405/413 and anything unexpected, as OpenAI-shaped error bodies)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ovms_plugin import engine_check, kinds
from ovms_plugin.http.common import (
    BODY_TIMEOUT,
    CLIENT_GONE,
    MODEL,
    REQUEST_ID,
    RUNTIME,
    STATE,
    error_response,
    json_response,
    service_error_response,
)
from ovms_plugin.http.metrics import Exposition
from ovms_plugin.service.errors import ServiceError

log = logging.getLogger("ovms_plugin.http.access")
errlog = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = {"/health"}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
CLIENT_CLOSED = 499  # nginx's "client closed request", for the log and metrics only


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def access(request: web.Request, handler: Handler) -> web.StreamResponse:
    given = request.headers.get("X-Request-ID", "")
    rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
    request[REQUEST_ID] = rid
    metrics = request.app[STATE].metrics
    metrics.in_flight += 1
    started = time.monotonic()
    status = 500
    try:
        resp = await handler(request)
        status = CLIENT_CLOSED if request.get(CLIENT_GONE) else resp.status
        return resp
    except (asyncio.CancelledError, ConnectionError):  # the client went away
        status = CLIENT_CLOSED
        raise
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        seconds = time.monotonic() - started
        metrics.in_flight -= 1
        metrics.observe(_route(request), request.method, status, seconds)
        log.info("request id=%s method=%s path=%s model=%s status=%d latency_ms=%.1f", rid,
                 request.method, _cut(request.path), _cut(request.get(MODEL) or "-"), status,
                 seconds * 1000)


def _cut(text: object, limit: int = 200) -> str:
    """Fields from outside in the access log, bounded (a 1 MiB model name is one line of
    200 characters and its length, not a megabyte of log)."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response names its request id."""
    if REQUEST_ID in request:
        response.headers["X-Request-ID"] = request[REQUEST_ID]


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    key = request.app[STATE].api_key
    if key and request.path not in OPEN_PATHS:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 key.encode()):
            message = ("missing API key: send 'Authorization: Bearer <key>'"
                       if not token else "incorrect API key")
            return error_response(401, message, code="invalid_api_key",
                                  headers={"WWW-Authenticate": 'Bearer realm="ovms-plugin"'})
    return await handler(request)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ServiceError as e:
        return service_error_response(e)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[STATE].max_body_bytes
        return error_response(413, f"the request body is larger than this server accepts "
                                   f"({limit} bytes; see --max-body-mb)",
                              code="request_too_large")
    except web.HTTPRequestTimeout:
        seconds = request.app.get(BODY_TIMEOUT) or 0
        resp = error_response(408, f"the request body did not arrive in full within "
                                   f"{seconds:g} s (see --body-timeout); send the whole body "
                                   "at once", code="request_timeout")
        resp.force_close()  # the rest of the body is not read: the connection ends here
        return resp
    except web.HTTPNotFound:
        return error_response(404, f"no route {request.method} {request.path}; see /v1/models, "
                                   "/v1/chat/completions, /aog/v0.2/services/<service>",
                              code="not_found")
    except web.HTTPMethodNotAllowed as e:
        return error_response(405, f"{request.method} is not allowed on {request.path}; "
                                   f"use {', '.join(sorted(e.allowed_methods))}",
                              code="method_not_allowed",
                              headers={"Allow": ",".join(sorted(e.allowed_methods))})
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(e.status, e.reason, code=None)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as e:
        errlog.exception("internal error serving %s %s", request.method, request.path)
        return error_response(500, f"internal error: {type(e).__name__}: {e}",
                              code="internal_error")


# --- routes ------------------------------------------------------------------------------

async def health(request: web.Request) -> web.Response:
    """Live: the process answers."""
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Ready: preloading is done, OpenVINO imports, every loaded model's engine runs (none is
    dead, stalled or being restarted), and the server is not shutting down."""
    state, rt = request.app[STATE], request.app[RUNTIME]
    if state.preload_error:
        return json_response({"status": "unavailable", "reason": state.preload_error}, 503)
    if state.loading:
        return json_response({"status": "loading",
                              "reason": f"loading model(s) {', '.join(state.loading)}"}, 503)
    ok, why = await engine_check.check()
    if ok:
        ok, why = rt.health()
    lost = [n for n in state.pinned if n not in rt.models and n not in rt.restarting()]
    if ok and lost:  # a preloaded model whose engine could not be started again
        ok, why = False, (f"model(s) {', '.join(lost)} should be loaded but are not: their "
                          "engine died and could not be restarted (see the log); the next "
                          "request for them loads them again")
    body = {"status": "ready" if ok else "unavailable", "reason": why,
            "models": sorted(rt.models)}
    if rt.restarting():
        body["restarting"] = rt.restarting()
    return json_response(body, 200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    out = Exposition()
    request.app[STATE].metrics.export(out)
    rt = request.app[RUNTIME]
    export_models(out, await rt.running())
    for model, (n, total, last) in sorted(rt.loads.items()):
        labels = {"model": model}
        out.counter("model_loads_total", "Times the model was loaded (a request that finds it "
                    "unloaded waits for a load).", labels, n)
        out.counter("model_load_seconds_total", "Time spent loading the model.", labels,
                    round(total, 3))
        out.gauge("model_last_load_seconds", "How long the model's last load took.", labels,
                  round(last, 3))
    restarting = set(rt.restarting())
    for model, events in sorted(rt.engine_events().items()):
        labels = {"model": model}
        out.counter("engine_stalls_total", "Engine workers the watchdog found stalled (no "
                    "progress for engine_stall_seconds) and killed.", labels, events["stalls"])
        out.counter("engine_deaths_total", "Engine workers that exited on their own.", labels,
                    events["deaths"])
        out.counter("engine_restarts_total", "Engine workers started again after a stall or "
                    "death.", labels, events["restarts"])
        out.gauge("engine_restarting", "1 while the model's engine is being restarted.",
                  labels, 1 if model in restarting else 0)
    return web.Response(body=out.render().encode(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)


def export_models(out: Exposition, running: list[dict[str, Any]]) -> None:
    """Runtime.running()'s loaded models and their engine metrics."""
    for item in running:
        d = item.get("details", {})
        model = {"model": item.get("name", "")}
        engine = d.get("engine", "")
        out.gauge("model_loaded", "1 for each loaded model.",
                  {**model, "engine": engine, "device": d.get("device", "")}, 1)
        out.gauge("model_alive", "1 while the model's engine worker runs.", model,
                  1 if d.get("alive") else 0)
        out.gauge("model_requests_in_flight", "Requests running or waiting in the engine.",
                  model, d.get("in_flight"))
        m = d.get("metrics") or {}
        out.gauge("model_worker_rss_bytes", "Physical memory of the model's engine worker.",
                  model, m.get("worker_rss_bytes"))
        kind = next((k for k in kinds.all() if k.name == engine), None)
        if kind is not None:  # each kind exports its engine's own families
            kind.export_metrics(out, model, m)
