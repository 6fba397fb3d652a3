"""OpenAI-compatible routes. Each parses the body, calls the same service functions the AOG
gRPC servicer calls (service.invoke.SERVICES over the shared Runtime), and returns their
OpenAI-shaped objects as JSON or as server-sent events ending with `data: [DONE]`.

- POST /v1/chat/completions, /v1/completions: chat.completion / text_completion; with
  "stream": true, their chunks; `stream_options.include_usage` adds a last chunk with
  empty `choices` and the usage. Extra fields: `ignore_eos`, `seed`.
- POST /v1/embeddings: float or base64 (little-endian float32), `dimensions`.
- POST /v1/images/generations: `{"data": [{"b64_json"}]}` (PNG); `size` WxH, plus
  `num_inference_steps`, `seed`, `negative_prompt`, `guidance_scale`.
- POST /v1/rerank: Cohere/Jina shape, `{"id", "model", "results": [{"index",
  "relevance_score", "document": {"text"}}], "usage"}`, best first.
- GET /v1/models, /v1/models/{id}: the installed models; the list marks loaded ones
  (`"loaded": true`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import datetime
from typing import Any

from aiohttp import web

from ovms_plugin.http.common import MODEL, RUNTIME, json_response, read_json, sse_response
from ovms_plugin.service import invoke
from ovms_plugin.service.errors import bool_field, invalid
from ovms_plugin.store.store import ModelEntry

OWNER = "ovms-plugin"


async def chunk_data(chunks: AsyncIterator[invoke.StreamChunk]) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a service's stream; closing this closes the service's stream."""
    async with aclosing(chunks) as it:
        async for c in it:
            yield c.data


async def _unary(request: web.Request, service: str, body: dict[str, Any]) -> web.Response:
    return json_response(await invoke.lookup(service).unary(request.app[RUNTIME], service, body))


async def _text(request: web.Request, service: str) -> web.StreamResponse:
    body = await read_json(request)
    if bool_field(body, "stream"):
        svc = invoke.lookup(service, streaming=True)
        return await sse_response(request, chunk_data(svc.stream(request.app[RUNTIME], service,
                                                                 body)), done=True)
    return await _unary(request, service, body)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _text(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _text(request, "generate")


async def embeddings(request: web.Request) -> web.Response:
    return await _unary(request, "embed", await read_json(request))


async def rerank(request: web.Request) -> web.Response:
    return await _unary(request, "rerank", await read_json(request))


async def images_generations(request: web.Request) -> web.Response:
    body = await read_json(request)
    if bool_field(body, "stream"):
        raise invalid("streamed image generation is not offered on this route; call it "
                      "without \"stream\" (AOG clients: /aog/v0.2/services/text-to-image)",
                      "stream")
    return await _unary(request, "text-to-image", body)


def model_object(entry: ModelEntry) -> dict[str, Any]:
    """An OpenAI model object; `created` is the install time."""
    try:
        created = int(datetime.fromisoformat(entry.manifest["installed_at"]).timestamp())
    except (KeyError, TypeError, ValueError):
        created = int(entry.path.stat().st_mtime)
    return {"id": entry.name, "object": "model", "created": created, "owned_by": OWNER}


async def list_models(request: web.Request) -> web.Response:
    """The installed models; `loaded` marks those in memory now (an extra field: the
    others load on first use)."""
    rt = request.app[RUNTIME]
    entries = await asyncio.to_thread(rt.store.list)
    return json_response({"object": "list", "data": [
        {**model_object(e), "loaded": e.name in rt.models} for e in entries]})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    request[MODEL] = name
    entry = await asyncio.to_thread(request.app[RUNTIME].entry, name)
    return json_response(model_object(entry))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/images/generations", images_generations)
    app.router.add_post("/v1/rerank", rerank)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
