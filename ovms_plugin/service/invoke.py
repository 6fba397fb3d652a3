"""Service dispatch shared by every protocol adapter: a service name and a JSON body in,
a response object (unary) or a stream of response chunks out. The services and their
handlers are the registered kinds' (ovms_plugin.kinds): adding one means registering a
kind."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from ovms_plugin.kinds import Service, StreamChunk
from ovms_plugin.kinds import registry as kinds
from ovms_plugin.service import errors
from ovms_plugin.service.errors import ServiceError

if TYPE_CHECKING:
    from ovms_plugin.service.runtime import Runtime

__all__ = ["Service", "StreamChunk", "aog_stream", "lookup"]


def lookup(name: str, streaming: bool = False) -> Service:
    svc = kinds.service(name)
    if svc is None:
        raise ServiceError(f"unknown service {name!r}; this plugin serves "
                           f"{', '.join(sorted(kinds.services()))}", errors.SERVICE_NOT_FOUND)
    if streaming and svc.stream is None:
        raise ServiceError(f"service {name!r} does not stream; call it without streaming",
                           errors.INVALID_REQUEST)
    return svc


async def aog_stream(svc: Service, rt: Runtime, service: str, body: Any
                     ) -> AsyncIterator[StreamChunk]:
    """A service's stream as AOG reads it: for services that report usage only when asked
    (OpenAI's stream_options.include_usage, in a last chunk with no choices), it is
    asked for and carried by the finishing chunk instead, which ends AOG's stream."""
    assert svc.stream is not None
    if not svc.stream_usage or not isinstance(body, dict):
        async with aclosing(svc.stream(rt, service, body)) as chunks:
            async for c in chunks:
                yield c
        return
    # A streamed call streams, whether or not the body says so.
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    held: StreamChunk | None = None
    async with aclosing(svc.stream(rt, service, body)) as chunks:
        async for c in chunks:
            if c.final and held is not None and not c.data.get("choices") \
                    and "usage" in c.data:
                held.data["usage"] = c.data["usage"]
                held.final = True
                yield held
                return
            if held is not None:
                yield held
            held = c
    if held is not None:
        yield held
