"""Service dispatch shared by every protocol adapter: a service name and a JSON body in,
a response object (unary) or a stream of response chunks out. The services and their
handlers are the registered kinds' (ovms_plugin.kinds): adding one means registering a
kind."""

from __future__ import annotations

from ovms_plugin.kinds import Service, StreamChunk
from ovms_plugin.kinds import registry as kinds
from ovms_plugin.service import errors
from ovms_plugin.service.errors import ServiceError

__all__ = ["Service", "StreamChunk", "lookup"]


def lookup(name: str, streaming: bool = False) -> Service:
    svc = kinds.service(name)
    if svc is None:
        raise ServiceError(f"unknown service {name!r}; this plugin serves "
                           f"{', '.join(sorted(kinds.services()))}", errors.SERVICE_NOT_FOUND)
    if streaming and svc.stream is None:
        raise ServiceError(f"service {name!r} does not stream; call it without streaming",
                           errors.INVALID_REQUEST)
    return svc
