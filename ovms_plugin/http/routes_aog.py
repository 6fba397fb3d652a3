"""AOG-compatible routes: POST /aog/v0.2/services/{chat,generate,embed,rerank,text-to-image}
(and GET .../models) with the request and response shapes AOG's clients use, so an
application written for AOG can point at this server instead. The routes call the same
service functions as the OpenAI routes and reshape their OpenAI objects.

Where the shapes come from (intel/aog, read for reference): the service specs
(docs/zh-cn/source/service_specs/chat.rst and image.rst, docs/en/source/aog_spec.rst) and
the "aog" side of the built-in flavor conversions in internal/provider/template/
(ollama.yaml, aliyun.yaml, openvino.yaml), which say what AOG hands its clients; the plugin
guide calls the services under /aog/v0.2/services/.

- chat: request `{"model"?, "stream", "messages", "seed", "temperature", "top_p", "stop",
  "max_tokens", "keep_alive", "top_k", "tools"}` (the last three are accepted and ignored).
  Response `{"id", "model", "created_at" (RFC 3339), "message": {"role": "assistant",
  "content"}, "finished": true, "finish_reason", "usage"}`. Streamed: server-sent events
  of the same object, `message.content` the new text, `finished` false until the last
  event, which has `finish_reason` and `usage`; no `[DONE]` marker (AOG's own streams to
  clients have none).
- generate: the same with `"prompt"` in and `"response"` (text) out instead of messages.
- embed: `{"model"?, "input": str | [str], "dimensions"?, "encoding_format"?}` →
  `{"id", "model", "data": [{"object": "embedding", "index", "embedding"}], "usage"}`.
- rerank: AOG's spec pages have no rerank page (its flavor list names `POST /rerank`);
  it takes the Cohere/Jina shape as /v1/rerank does: `{"model"?, "query", "documents",
  "top_n"?, "return_documents"?}` → `{"id", "model", "results": [{"index",
  "relevance_score", "document"?: {"text"}}], "usage"}`.
- text-to-image: `{"model"?, "prompt", "n"? (1-4), "size"? as "W*H" (or "WxH"), "seed"?,
  plus this server's num_inference_steps, negative_prompt, guidance_scale}` →
  `{"id", "data": {"url": ["<local path of a PNG>", ...]}}`: like AOG's local text-to-image
  providers, the images are written to files on this machine (the server's images folder,
  --images-dir) and their paths returned. `"response_format": "b64_json"` returns
  `{"id", "data": {"b64_json": [...]}}` instead and writes nothing.
- any other service a registered kind serves: POST /aog/v0.2/services/{service} takes and
  returns that service's own objects, as InvokeService does.
- models (GET): `{"models": [{"name", "model", "modified_at", "size", "digest",
  "details"}]}`, the ListModels shape.

`model` is optional as in AOG: without it, a preloaded model that serves the service is
used, else a loaded one, else the first installed one. Errors have the OpenAI routes'
shape and statuses.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from ovms_plugin.http.common import (
    MODEL,
    REQUEST_ID,
    RUNTIME,
    STATE,
    json_response,
    read_json,
    sse_response,
)
from ovms_plugin.kinds import BidiMessage
from ovms_plugin.service import errors, invoke
from ovms_plugin.service.errors import ServiceError, bool_field, invalid
from ovms_plugin.store.store import rfc3339

PREFIX = "/aog/v0.2/services"


async def _with_model(request: web.Request, service: str) -> dict[str, Any]:
    """The body, with AOG's default model filled in when it names none."""
    body = await read_json(request)
    if body.get("model") in (None, ""):
        body["model"] = await _default_model(request, service)
        request[MODEL] = body["model"]
    return body


async def _default_model(request: web.Request, service: str) -> str:
    rt, state = request.app[RUNTIME], request.app[STATE]
    for name in state.pinned:
        lm = rt.models.get(name)
        if lm is not None and service in lm.entry.services:
            return name
    for name, lm in sorted(rt.models.items()):
        if service in lm.entry.services:
            return name
    for entry in await asyncio.to_thread(rt.store.list):
        if service in entry.services:
            return entry.name
    raise ServiceError(f"no installed model serves {service!r}; pull one, or name one in "
                       "'model'", errors.MODEL_NOT_FOUND, "model")


def aog_text(obj: dict[str, Any], service: str, finished: bool) -> dict[str, Any]:
    """An OpenAI chat.completion(.chunk) or text_completion as AOG's chat/generate object."""
    choice = obj["choices"][0]
    out: dict[str, Any] = {"id": obj["id"], "model": obj["model"],
                           "created_at": rfc3339(obj["created"])}
    if service == "chat":
        source = choice.get("message") or choice.get("delta") or {}
        out["message"] = {"role": "assistant", "content": source.get("content") or ""}
    else:
        out["response"] = choice.get("text") or ""
    out["finished"] = finished
    out["finish_reason"] = choice.get("finish_reason")
    if obj.get("usage") is not None:
        out["usage"] = obj["usage"]
    return out


async def _aog_events(chunks: AsyncIterator[invoke.StreamChunk], service: str
                      ) -> AsyncIterator[dict[str, Any]]:
    async with aclosing(chunks) as it:
        async for c in it:
            yield aog_text(c.data, service, finished=c.final)


async def _text(request: web.Request, service: str) -> web.StreamResponse:
    body = await _with_model(request, service)
    body.pop("stream_options", None)  # OpenAI's; AOG's stream always ends with the usage
    rt = request.app[RUNTIME]
    if bool_field(body, "stream"):
        svc = invoke.lookup(service, streaming=True)
        return await sse_response(
            request, _aog_events(invoke.aog_stream(svc, rt, service, body), service),
            done=False)
    result = await invoke.lookup(service).unary(rt, service, body)
    return json_response(aog_text(result, service, finished=True))


async def chat(request: web.Request) -> web.StreamResponse:
    return await _text(request, "chat")


async def generate(request: web.Request) -> web.StreamResponse:
    return await _text(request, "generate")


async def embed(request: web.Request) -> web.Response:
    body = await _with_model(request, "embed")
    result = await invoke.lookup("embed").unary(request.app[RUNTIME], "embed", body)
    return json_response({"id": "embd-" + uuid.uuid4().hex[:24], **result})


async def rerank(request: web.Request) -> web.Response:
    body = await _with_model(request, "rerank")
    return json_response(await invoke.lookup("rerank").unary(request.app[RUNTIME], "rerank",
                                                             body))


def _write_pngs(folder: Path, stem: str, pngs: list[bytes]) -> list[str]:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, png in enumerate(pngs):
            path = folder / f"{stem}-{i}.png"
            path.write_bytes(png)
            paths.append(str(path.resolve()))
        return paths
    except OSError as e:
        raise ServiceError(f"cannot write the images to {folder}: {e}; start the server with "
                           "--images-dir DIR, or ask for \"response_format\": \"b64_json\"",
                           errors.INTERNAL) from None


async def text_to_image(request: web.Request) -> web.Response:
    body = await _with_model(request, "text-to-image")
    fmt = body.pop("response_format", None) or "url"
    if fmt not in ("url", "b64_json"):
        raise invalid(f"'response_format' must be 'url' (local file paths) or 'b64_json', "
                      f"got {fmt!r}", "response_format")
    body.pop("stream", None)  # AOG's text-to-image answers once
    result = await invoke.lookup("text-to-image").unary(
        request.app[RUNTIME], "text-to-image", {**body, "response_format": "b64_json"})
    rid = request[REQUEST_ID]
    b64 = [d["b64_json"] for d in result["data"]]
    if fmt == "b64_json":
        return json_response({"id": rid, "data": {"b64_json": b64}})
    stem = f"{time.strftime('%Y%m%d%H%M%S')}-{rid}"
    paths = await asyncio.to_thread(_write_pngs, request.app[STATE].images_dir, stem,
                                    [base64.b64decode(b) for b in b64])
    return json_response({"id": rid, "data": {"url": paths}})


async def chunk_data(chunks: AsyncIterator[invoke.StreamChunk]) -> AsyncIterator[dict[str, Any]]:
    async with aclosing(chunks) as it:
        async for c in it:
            yield c.data


async def any_service(request: web.Request) -> web.StreamResponse:
    """Any other registered kind's service, with its own request and response objects (the
    ones InvokeService takes and returns): streamed when the body asks and it streams."""
    service = request.match_info["service"]
    svc = invoke.lookup(service)
    body = await _with_model(request, service)
    rt = request.app[RUNTIME]
    if body.get("stream") and svc.stream is not None:
        return await sse_response(request, chunk_data(invoke.aog_stream(svc, rt, service, body)),
                                  done=False)
    return json_response(await svc.unary(rt, service, body))


async def speech_to_text_ws(request: web.Request) -> web.WebSocketResponse:
    """speech-to-text-ws as AOG serves it to its clients: a WebSocket carrying AOG's
    run-task / audio / finish-task protocol (service/stt_stream.py). Query parameters
    (model, language, format, sample_rate, use_vad) act as AOG's session metadata."""
    svc = invoke.lookup("speech-to-text-ws")
    assert svc.bidi is not None
    ws = web.WebSocketResponse(max_msg_size=request.app[STATE].max_body_bytes)
    await ws.prepare(request)
    metadata = {"ws_conn_id": request[REQUEST_ID], **request.query}

    async def messages() -> AsyncIterator[BidiMessage]:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                yield BidiMessage("text", msg.data.encode())
            elif msg.type == WSMsgType.BINARY:
                yield BidiMessage("binary", msg.data)
            else:
                break

    async with aclosing(svc.bidi(request.app[RUNTIME], "speech-to-text-ws", metadata,
                                 messages())) as out:
        async for m in out:
            if ws.closed:
                break
            if m.message_type == "text":
                await ws.send_str(m.data.decode())
            elif m.message_type == "binary":
                await ws.send_bytes(m.data)
    await ws.close()
    return ws


async def models(request: web.Request) -> web.Response:
    entries = await asyncio.to_thread(request.app[RUNTIME].store.list)
    return json_response({"models": [e.to_aog() for e in entries]})


def add_routes(app: web.Application) -> None:
    app.router.add_post(f"{PREFIX}/chat", chat)
    app.router.add_post(f"{PREFIX}/generate", generate)
    app.router.add_post(f"{PREFIX}/embed", embed)
    app.router.add_post(f"{PREFIX}/rerank", rerank)
    app.router.add_post(f"{PREFIX}/text-to-image", text_to_image)
    app.router.add_get(f"{PREFIX}/models", models)
    app.router.add_get(f"{PREFIX}/speech-to-text-ws", speech_to_text_ws)
    app.router.add_post(f"{PREFIX}/{{service}}", any_service)  # after the ones above
