"""What every route shares: the app's keys and state, JSON bodies in, JSON and server-sent
events out, and errors in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from ovms_plugin.http.metrics import HttpMetrics
from ovms_plugin.service import errors, jsonenc
from ovms_plugin.service.errors import ServiceError, invalid
from ovms_plugin.service.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    api_key: str | None
    max_body_bytes: int
    images_dir: Path
    metrics: HttpMetrics = field(default_factory=HttpMetrics)
    pinned: tuple[str, ...] = ()  # preloaded models: never unloaded for being idle
    loading: list[str] = field(default_factory=list)  # preloads not finished yet
    preload_error: str | None = None


RUNTIME = web.AppKey("runtime", Runtime)
STATE = web.AppKey("state", ServerState)

# Request keys (request[...]) read by the access log.
MODEL = "ovms.model"
REQUEST_ID = "ovms.request_id"
CLIENT_GONE = "ovms.client_gone"

# OpenAI's error types: 4xx are invalid_request_error (401 too, as OpenAI sends it).
_TYPES = {429: "rate_limit_error", 500: "server_error", 503: "server_error",
          504: "timeout_error"}
_CODES = {errors.INVALID_ARGUMENT: "invalid_request", errors.INVALID_REQUEST: "invalid_request",
          errors.NOT_FOUND: "not_found", errors.MODEL_NOT_FOUND: "model_not_found",
          errors.SERVICE_NOT_FOUND: "not_found", errors.FAILED_PRECONDITION: "failed_precondition",
          errors.TIMEOUT: "timeout", errors.UNAVAILABLE: "engine_unavailable",
          errors.LOAD_FAILED: "model_load_failed", errors.PULL_FAILED: "pull_failed",
          errors.INTERNAL: "internal_error"}


def _dumps(data: Any) -> str:
    return jsonenc.dumps(data, compact=True)


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    etype = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": errors.public(message), "type": etype, "param": param,
                      "code": code}}


def error_response(status: int, message: str, *, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None
                   ) -> web.Response:
    return web.json_response(error_body(status, message, param, code), status=status,
                             headers=headers, dumps=_dumps)


def service_error_parts(e: ServiceError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """HTTP status, body and headers for a service error."""
    status = e.http_status
    if e.code == errors.RESOURCE_EXHAUSTED:
        code = "model_busy" if e.retry_after is not None else "insufficient_resources"
    else:
        code = _CODES.get(e.code, "internal_error")
    headers = {}
    if e.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(e.retry_after)))
    return status, error_body(status, e.message, e.param, code), headers


def service_error_response(e: ServiceError) -> web.Response:
    status, body, headers = service_error_parts(e)
    return web.json_response(body, status=status, headers=headers, dumps=_dumps)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=_dumps)


BODY_TIMEOUT = web.AppKey("body_timeout", float)  # seconds a body may take to arrive; 0: any


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object. Too large a body is refused (413) before it is read when
    its length is declared, and while reading when it is not. A body that has not arrived
    in full within the app's BODY_TIMEOUT is refused (408) and its connection closed: a
    client that stalls mid-body holds nothing for long."""
    limit = request.app[STATE].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    timeout = request.app.get(BODY_TIMEOUT) or None
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()
    except TimeoutError:
        # The rest of the body is neither waited for (aiohttp would linger reading it) nor
        # taken: the connection ignores further data and closes after the answer.
        request.protocol.close()
        request.content.feed_eof()
        raise web.HTTPRequestTimeout(
            text=f"the request body did not arrive in full within {timeout:g} s") from None
    if not raw.strip():
        raise invalid("the request body is empty; send a JSON object")
    body = errors.parse_json(raw)
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    if isinstance(body.get("model"), str):
        request[MODEL] = body["model"]
    return body


def sse(data: Any) -> bytes:
    """One server-sent event: a single `data:` line, then a blank line."""
    text = data if isinstance(data, str) else _dumps(data)
    return f"data: {text}\n\n".encode()


@dataclass(frozen=True)
class StreamFormat:
    """How a stream of events is written: its content type, one event, an error event (for
    a service error, and for a status and message), and what ends it."""

    content_type: str
    event: Callable[[Any], bytes]
    service_error: Callable[[ServiceError], bytes]
    error: Callable[[int, str, str], bytes]  # status, message, code
    end: bytes = b""


def _sse_service_error(e: ServiceError) -> bytes:
    return sse(service_error_parts(e)[1])


SSE = StreamFormat("text/event-stream; charset=utf-8", sse, _sse_service_error,
                   lambda status, message, code: sse(error_body(status, message, code=code)))
SSE_DONE = dataclasses.replace(SSE, end=sse("[DONE]"))


async def sse_response(request: web.Request, events: AsyncIterator[dict[str, Any]],
                       done: bool) -> web.StreamResponse:
    """Streams `events` as server-sent events, then `data: [DONE]` when `done` (OpenAI's
    end marker; AOG's streams have none)."""
    return await stream_response(request, events, SSE_DONE if done else SSE)


async def stream_response(request: web.Request, events: AsyncIterator[Any], fmt: StreamFormat,
                          refuse: Callable[[Any], web.Response | None] | None = None
                          ) -> web.StreamResponse:
    """Streams `events` in `fmt`.

    Nothing is sent until the first event: a request refused before it produces anything
    (bad input, unknown model, busy) still gets its HTTP status, and so does a first event
    that `refuse` turns into a response. After that, an error is sent as one error event.
    The events are closed on every way out, so a client that goes away (the handler is
    cancelled, or a write fails) aborts the request in the engine. A stream cut by the
    server's shutdown (after its drain) still ends with an error event, then properly."""
    async with aclosing(events) as it:
        try:
            first = await anext(it)
        except StopAsyncIteration:
            first = None
        if refuse is not None and (refused := refuse(first)) is not None:
            return refused
        resp = web.StreamResponse(headers={"Content-Type": fmt.content_type,
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        try:
            await resp.prepare(request)
            if first is not None:
                await resp.write(fmt.event(first))
                async for event in it:
                    await resp.write(fmt.event(event))
        except ConnectionError:  # the client went away while we wrote
            request[CLIENT_GONE] = True
            return resp
        except asyncio.CancelledError:
            reason = request.app[RUNTIME].shutdown_reason()
            task = asyncio.current_task()
            if reason is None or request.get(CLIENT_GONE) or not resp.prepared or \
                    task is None or task.cancelling() > 1:
                raise
            task.uncancel()
            await _write_quietly(request, resp, fmt.error(503, reason, "engine_unavailable"))
        except ServiceError as e:
            log.info("stream ended with an error (HTTP %d): %s", e.http_status, e.message)
            await _write_quietly(request, resp, fmt.service_error(e))
        except Exception as e:
            log.exception("stream failed")
            await _write_quietly(request, resp, fmt.error(
                500, f"internal error: {type(e).__name__}: {e}", "internal_error"))
    if fmt.end:
        await _write_quietly(request, resp, fmt.end)
    if not request.get(CLIENT_GONE):
        try:
            await resp.write_eof()
        except ConnectionError:
            request[CLIENT_GONE] = True
    return resp


async def _write_quietly(request: web.Request, resp: web.StreamResponse, data: bytes) -> None:
    if request.get(CLIENT_GONE):
        return
    try:
        await resp.write(data)
    except ConnectionError:
        request[CLIENT_GONE] = True
