"""The typed engine protocol: what comes back from an engine for each request, and how it
fails. The requests going in are each kind's own dataclasses (kinds/*.py, e.g. LLMRequest).

An engine's step returns StepOutputs; a failure is an EngineFailure whose `kind` says what
went wrong, never a protocol's code: service/errors.py maps failure kinds to AOG codes and
HTTP statuses, in one place.

On the socket (engine/ipc.py pickles), step outputs travel as plain tuples (`wire()` /
`from_wire()`): one message per engine step carries one per running request, and pickling
tuples costs a tenth of pickling dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class FailureKind(StrEnum):
    BAD_REQUEST = "bad_request"  # the engine refused the request as given
    NO_KV_SPACE = "no_kv_space"  # it did not fit in the LLM's KV cache
    BUSY = "busy"  # too many requests running and waiting: retry shortly
    ENGINE_DIED = "engine_died"  # the worker is gone (the next request restarts it)
    LOAD_FAILED = "load_failed"  # the engine could not load the model
    INTERNAL = "internal"  # anything else the engine raised


@dataclass(frozen=True, slots=True)
class EngineFailure:
    kind: FailureKind
    message: str


@dataclass(slots=True)
class StepOutput:
    """News of one request from one engine step: `result` is the kind's (new token ids,
    vectors, progress, images); `finish` None while it runs, its finish reason when it
    ends; `error` set when it failed (and ended)."""

    req_id: int
    result: Any = None
    finish: str | None = None
    error: EngineFailure | None = None

    def wire(self) -> tuple[int, Any, str | None, tuple[str, str] | None]:
        err = self.error
        return (self.req_id, self.result, self.finish,
                None if err is None else (err.kind.value, err.message))

    @staticmethod
    def from_wire(t: tuple) -> StepOutput:
        req_id, result, finish, err = t
        return StepOutput(req_id, result, finish,
                          None if err is None else EngineFailure(FailureKind(err[0]), err[1]))


def failed(req_id: int, kind: FailureKind, message: str) -> StepOutput:
    return StepOutput(req_id, error=EngineFailure(kind, message))
