"""OpenAI-compatible routes. Each parses the body, calls the same service functions the AOG
gRPC servicer calls (service.invoke.SERVICES over the shared Runtime), and returns their
OpenAI-shaped objects as JSON or as server-sent events ending with `data: [DONE]`.

- POST /v1/chat/completions, /v1/completions: chat.completion / text_completion; with
  "stream": true, their chunks; `stream_options.include_usage` adds a last chunk with
  empty `choices` and the usage. Extra fields: `ignore_eos`, `seed`.
- POST /v1/embeddings: float or base64 (little-endian float32), `dimensions`.
- POST /v1/images/generations: `{"data": [{"b64_json"}]}` (PNG); `size` WxH, plus
  `num_inference_steps`, `seed`, `negative_prompt`, `guidance_scale`.
- POST /v1/images/edits (multipart/form-data: `image` (or one `image[]`), `mask` (white:
  repaint), `prompt`, `model`, `n`, `size`, `response_format` b64_json, plus `strength`,
  `num_inference_steps`, `seed`, `negative_prompt`, `guidance_scale`): the same shape.
- POST /v1/rerank: Cohere/Jina shape, `{"id", "model", "results": [{"index",
  "relevance_score", "document": {"text"}}], "usage"}`, best first.
- POST /v1/audio/transcriptions, /v1/audio/translations (multipart/form-data: `file`,
  `model`, `language`, `prompt`, `response_format` json/text/srt/vtt/verbose_json,
  `temperature`, `timestamp_granularities[]` segment): `{"text"}` and the others.
- POST /v1/audio/speech: `input`, `voice`, `response_format` wav/flac/mp3/pcm (default
  mp3), `speed`; the audio file as the body. With `stream_format` "audio" the audio is
  sent sentence by sentence as it is spoken (wav, pcm, mp3); with "sse", events
  `speech.audio.delta` (base64 audio of a sentence) then `speech.audio.done`.
- GET /v1/models, /v1/models/{id}: the installed models; the list marks loaded ones
  (`"loaded": true`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import datetime
from typing import Any

from aiohttp import BodyPartReader, web

from ovms_plugin.http.common import (
    MODEL,
    RUNTIME,
    STATE,
    StreamFormat,
    json_response,
    read_json,
    sse_response,
    stream_response,
)
from ovms_plugin.kinds import speech as speech_kind
from ovms_plugin.kinds import tts as tts_kind
from ovms_plugin.service import audio, invoke, tts
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


_FORM_LISTS = {"timestamp_granularities[]": "timestamp_granularities",
               "timestamp_granularities": "timestamp_granularities"}


async def read_form(request: web.Request, binary: tuple[str, ...] = ("file",),
                    lists: dict[str, str] = _FORM_LISTS,
                    what: tuple[str, str] = ("the audio file", "file")) -> dict[str, Any]:
    """A multipart/form-data body as a dict: the `binary` fields (`file`) as bytes, other
    fields as text (a few converted to what the JSON bodies carry), repeated `lists`
    fields gathered in lists under their names there, within the server's body limit.
    `what`: what a non-multipart body should have sent, and in which field."""
    limit = request.app[STATE].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    if not request.content_type.startswith("multipart/"):
        raise invalid(f"send multipart/form-data with {what[0]} in the '{what[1]}' field (as "
                      "the OpenAI clients do)", what[1])
    body: dict[str, Any] = {}
    total = 0
    reader = await request.multipart()
    async for part in reader:
        if not isinstance(part, BodyPartReader):
            raise invalid("nested multipart bodies are not accepted", "file")
        name = part.name or ""
        chunks = []
        while data := await part.read_chunk(1 << 16):
            total += len(data)
            if total > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=total)
            chunks.append(data)
        raw = b"".join(chunks)
        value: str | bytes
        if name in binary:
            value = raw
        else:
            try:
                value = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise invalid(f"form field '{name}' is not UTF-8 text", name) from None
        if name in lists:
            body.setdefault(lists[name], []).append(value)
        else:
            body[name] = value
    if isinstance(body.get("model"), str):
        request[MODEL] = body["model"]
    if "temperature" in body:
        try:
            body["temperature"] = float(body["temperature"])
        except ValueError:
            raise invalid(f"'temperature' must be a number, got {body['temperature']!r}",
                          "temperature") from None
    if "stream" in body:
        if body["stream"] not in ("true", "false"):
            raise invalid("'stream' must be true or false", "stream")
        body["stream"] = body["stream"] == "true"
    return body


# /v1/images/edits: the form's files, and its fields that are numbers in the JSON body.
_EDIT_FILES = ("image", "image[]", "mask")
_EDIT_LISTS = {"image": "image", "image[]": "image"}
_EDIT_INTS = ("n", "num_inference_steps", "seed", "rng_seed")
_EDIT_FLOATS = ("strength", "guidance_scale")


def _edit_body(form: dict[str, Any]) -> dict[str, Any]:
    """The image-to-image service's body from the edits form: one image, numbers from
    their text."""
    body = dict(form)
    images = body.pop("image", [])
    if len(images) > 1:
        raise invalid(f"{len(images)} images were sent; this server edits one image per "
                      "request: send a single 'image'", "image")
    if not images or not images[0]:
        raise invalid("'image' is required: the image file to edit (PNG, JPEG, WebP, BMP or "
                      "GIF)", "image")
    body["image"] = images[0]
    if isinstance(body.get("mask"), bytes) and not body["mask"]:
        del body["mask"]
    for key, kind, word in [*((k, int, "an integer") for k in _EDIT_INTS),
                            *((k, float, "a number") for k in _EDIT_FLOATS)]:
        if isinstance(body.get(key), str):
            try:
                body[key] = kind(body[key].strip())
            except ValueError:
                raise invalid(f"'{key}' must be {word}, got {body[key]!r}", key) from None
    return body


async def images_edits(request: web.Request) -> web.Response:
    """OpenAI's image edits: multipart `image` (or `image[]`, one), `mask` (white:
    repaint), `prompt`, `n`, `size`, `response_format` b64_json, plus this server's
    `strength`, `num_inference_steps`, `seed`, `negative_prompt`, `guidance_scale`."""
    form = await read_form(request, binary=_EDIT_FILES, lists=_EDIT_LISTS,
                           what=("the image file", "image"))
    if form.get("stream"):
        raise invalid("streamed image editing is not offered on this route; call it without "
                      "\"stream\" (AOG clients: /aog/v0.2/services/image-to-image)", "stream")
    form.pop("stream", None)
    return await _unary(request, "image-to-image", _edit_body(form))


_TEXT_TYPES = {"text": "text/plain", "srt": "text/plain", "vtt": "text/vtt"}


async def _transcribe(request: web.Request, task: str) -> web.Response:
    body = await read_form(request)
    result = await speech_kind.run_body(request.app[RUNTIME], body, allow_paths=False,
                                        task=task, default_format="json")
    fmt = result.pop("format", None)
    if fmt in _TEXT_TYPES:
        return web.Response(text=result["text"], content_type=_TEXT_TYPES[fmt])
    return json_response(result)


async def audio_transcriptions(request: web.Request) -> web.Response:
    return await _transcribe(request, "transcribe")


async def audio_translations(request: web.Request) -> web.Response:
    return await _transcribe(request, "translate")


def _audio_format(content_type: str) -> StreamFormat:
    """Raw audio bytes as the stream: an error after the first bytes can only end it."""
    return StreamFormat(content_type, lambda b: b, lambda e: b"", lambda *a: b"")


async def _audio_chunks(rt: Any, req: tts.SpeechRequest) -> AsyncIterator[bytes]:
    first = True
    async with aclosing(tts_kind.speak(rt, req)) as chunks:
        async for _text, chunk in chunks:
            if req.response_format == "wav":
                data = audio.pcm16(chunk.samples)
                if first:
                    data = audio.wav_stream_header(chunk.rate) + data
            elif req.response_format == "pcm":
                data = audio.pcm16(chunk.samples)
            else:  # mp3 frames of one sentence after another make one stream
                data = await asyncio.to_thread(audio.encode, chunk.samples, chunk.rate,
                                               req.response_format)
            first = False
            yield data


async def _sse_chunks(rt: Any, req: tts.SpeechRequest) -> AsyncIterator[dict[str, Any]]:
    seconds = 0.0
    async with aclosing(tts_kind.speak(rt, req)) as chunks:
        async for text, chunk in chunks:
            seconds += len(chunk.samples) / chunk.rate
            data = tts.chunk(chunk.samples, chunk.rate, req.response_format, chunk.index, text)
            yield {"type": "speech.audio.delta", "audio": data["audio"],
                   "index": chunk.index, "text": text}
    yield {"type": "speech.audio.done", "duration": round(seconds, 3)}


async def audio_speech(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    req = tts.parse(body, default_format="mp3" if "mp3" in audio.FORMATS else "wav")
    rt = request.app[RUNTIME]
    if req.stream and req.stream_format == "sse":
        return await sse_response(request, _sse_chunks(rt, req), done=False)
    if req.stream:
        if req.response_format == "flac":
            raise invalid("flac cannot be streamed sentence by sentence; ask for wav, pcm or "
                          "mp3, or leave out stream_format", "response_format")
        return await stream_response(request, _audio_chunks(rt, req),
                                     _audio_format(audio.FORMATS[req.response_format]))
    samples, rate = await tts_kind.speak_all(rt, req)
    data = await asyncio.to_thread(audio.encode, samples, rate, req.response_format)
    return web.Response(body=data, content_type=audio.FORMATS[req.response_format])


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
    app.router.add_post("/v1/images/edits", images_edits)
    app.router.add_post("/v1/rerank", rerank)
    app.router.add_post("/v1/audio/transcriptions", audio_transcriptions)
    app.router.add_post("/v1/audio/translations", audio_translations)
    app.router.add_post("/v1/audio/speech", audio_speech)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
