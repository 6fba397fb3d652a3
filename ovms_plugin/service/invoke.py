"""Service dispatch shared by every protocol adapter: a service name and a JSON body in,
a response object (unary) or a stream of response chunks out. Adding a service means
one entry in SERVICES."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from ovms_plugin.service import embed, errors, image, text
from ovms_plugin.service.errors import ServiceError
from ovms_plugin.service.runtime import Runtime


@dataclass
class StreamChunk:
    """One streamed event's JSON object; `final` marks the last."""

    data: dict[str, Any]
    final: bool = False


async def _text_unary(rt: Runtime, service: str, body: Any) -> dict[str, Any]:
    req = text.parse(service, body)
    rid = text.new_id(service)
    d = await text.collect(rt.text(req))
    return text.completion(req, rid, d.text, d.finish_reason, d.prompt_tokens,
                           d.completion_tokens)


async def _text_stream(rt: Runtime, service: str, body: Any) -> AsyncIterator[StreamChunk]:
    req = text.parse(service, body)
    rid, created = text.new_id(service), int(time.time())
    first = True
    async with aclosing(rt.text(req)) as deltas:
        async for d in deltas:
            if d.finish_reason is None:
                yield StreamChunk(text.chunk(req, rid, created, d.text, None, first))
            else:
                if first or d.text:
                    yield StreamChunk(text.chunk(req, rid, created, d.text, None, first))
                usage = text.usage(d.prompt_tokens, d.completion_tokens)
                if req.include_usage:  # OpenAI: usage in a chunk of its own, after the finish
                    yield StreamChunk(text.chunk(req, rid, created, None, d.finish_reason))
                    yield StreamChunk(text.usage_chunk(req, rid, created, usage), final=True)
                else:
                    yield StreamChunk(text.chunk(req, rid, created, None, d.finish_reason,
                                                 usage_=usage), final=True)
            first = False


async def _embed_unary(rt: Runtime, service: str, body: Any) -> dict[str, Any]:
    return await rt.embed(embed.parse_embed(body))


async def _rerank_unary(rt: Runtime, service: str, body: Any) -> dict[str, Any]:
    return await rt.rerank(embed.parse_rerank(body))


async def _image_unary(rt: Runtime, service: str, body: Any) -> dict[str, Any]:
    async with aclosing(rt.image(image.parse(body))) as events:
        async for kind, data in events:
            if kind == "images":
                return image.response(data)
    raise ServiceError("the image engine returned no image", errors.INTERNAL)


async def _image_stream(rt: Runtime, service: str, body: Any) -> AsyncIterator[StreamChunk]:
    async with aclosing(rt.image(image.parse(body))) as events:
        async for kind, data in events:
            if kind == "progress":
                yield StreamChunk(image.progress_event(data["step"], data["steps"]))
            else:
                yield StreamChunk(image.response(data), final=True)


@dataclass
class Service:
    unary: Callable[[Runtime, str, Any], Awaitable[dict[str, Any]]]
    stream: Callable[[Runtime, str, Any], AsyncIterator[StreamChunk]] | None


SERVICES: dict[str, Service] = {
    "chat": Service(_text_unary, _text_stream),
    "generate": Service(_text_unary, _text_stream),
    "embed": Service(_embed_unary, None),
    "rerank": Service(_rerank_unary, None),
    "text-to-image": Service(_image_unary, _image_stream),
}


def lookup(name: str, streaming: bool = False) -> Service:
    svc = SERVICES.get(name)
    if svc is None:
        raise ServiceError(f"unknown service {name!r}; this plugin serves "
                           f"{', '.join(sorted(SERVICES))}", errors.SERVICE_NOT_FOUND)
    if streaming and svc.stream is None:
        raise ServiceError(f"service {name!r} does not stream; call it without streaming",
                           errors.INVALID_REQUEST)
    return svc
