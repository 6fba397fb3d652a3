"""Model kinds and their registry. A kind (kinds/base.py) declares everything the plugin
needs to know about one kind of model; the store, the puller, device routing, the runtime,
the engine worker, service dispatch, metrics and plugin.yaml ask the registry.

The built-in kinds are registered at the bottom of this module, and only here; a test (or
an extension) registers its own with register().
"""

from __future__ import annotations

from ovms_plugin.kinds.base import BidiMessage, Kind, Service, StreamChunk, ValidationError

__all__ = ["BidiMessage", "Kind", "Service", "StreamChunk", "ValidationError", "all", "for_service",
           "for_task", "get", "is_native", "recognise", "register", "service", "services",
           "unregister"]

# The built-in kinds, registered in one place.
from ovms_plugin.kinds import embed, image, llm, llm_stateful, rerank, speech, tts
from ovms_plugin.kinds.registry import (
    all,
    for_service,
    for_task,
    get,
    is_native,
    recognise,
    register,
    service,
    services,
    unregister,
)

for _module in (llm, llm_stateful, embed, rerank, image, speech, tts):
    register(_module.KIND)
