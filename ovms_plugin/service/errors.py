"""Errors with a result code for AOG and an HTTP status for the standalone server."""

from __future__ import annotations

import difflib
import json
import re
from typing import Any

from ovms_plugin.engine.protocol import EngineFailure, FailureKind

# AOG SDK result codes (contract §3).
OK = 0
INVALID_ARGUMENT = 2
NOT_FOUND = 3
RESOURCE_EXHAUSTED = 6
FAILED_PRECONDITION = 7
INTERNAL = 11
UNAVAILABLE = 14
MODEL_NOT_FOUND = 3000
PULL_FAILED = 3001
LOAD_FAILED = 3003
SERVICE_NOT_FOUND = 4000
TIMEOUT = 4002
INVALID_REQUEST = 4003

_HTTP = {INVALID_ARGUMENT: 400, INVALID_REQUEST: 400, NOT_FOUND: 404, MODEL_NOT_FOUND: 404,
         SERVICE_NOT_FOUND: 404, RESOURCE_EXHAUSTED: 503, FAILED_PRECONDITION: 409,
         TIMEOUT: 504, UNAVAILABLE: 503, LOAD_FAILED: 500, PULL_FAILED: 500, INTERNAL: 500}


# OpenVINO prefixes its errors with the C++ source it threw from ("Exception from
# src/inference/src/cpp/core.cpp:84:"), and asserts with "Check '...' failed at file:line:".
_OV_ORIGIN = re.compile(r"(Exception from|Check '[^'\n]*' failed at) [^\s:]+:\d+:?\s*")
# An absolute path (POSIX, or a Windows drive): kept as its last component only.
_ABS_PATH = re.compile(r"(?<![\w.:/\\])(?:[A-Za-z]:[\\/]|/)(?:[^\s'\"():,;/\\]+[\\/])+"
                       r"([^\s'\"():,;/\\]*)")


def public(text: str) -> str:
    """A message fit for a client: OpenVINO's C++ source locations dropped, and absolute
    host paths cut to their last component (the log keeps the full text)."""
    text = _OV_ORIGIN.sub("", text)
    text = _ABS_PATH.sub(lambda m: m.group(1) or "(a folder)", text)
    return re.sub(r"\s*\n\s*", " ", text).strip()
# Engine failures as (AOG code, seconds after which a retry may succeed); the HTTP status
# follows from the code (a retry-able RESOURCE_EXHAUSTED is 429).
_ENGINE = {FailureKind.BAD_REQUEST: (INVALID_REQUEST, None),
           FailureKind.NO_KV_SPACE: (INTERNAL, None),
           FailureKind.BUSY: (RESOURCE_EXHAUSTED, 1.0),
           FailureKind.ENGINE_DIED: (UNAVAILABLE, None),
           FailureKind.LOAD_FAILED: (LOAD_FAILED, None),
           FailureKind.INTERNAL: (INTERNAL, None)}


class ServiceError(Exception):
    """A request could not be served; the message says what was wrong and what is right."""

    def __init__(self, message: str, code: int = INVALID_REQUEST, param: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.param = param
        # Seconds after which the same request may well succeed: set when a model is busy
        # (its running and waiting requests are at the limit), not when it cannot fit.
        self.retry_after = retry_after

    @property
    def message(self) -> str:
        """What the client is told: no host paths, no C++ source locations."""
        return public(str(self))

    @property
    def http_status(self) -> int:
        if self.code == RESOURCE_EXHAUSTED and self.retry_after is not None:
            return 429  # busy: retry shortly (a model that cannot fit stays 503)
        return _HTTP.get(self.code, 500)


def from_engine(failure: EngineFailure) -> ServiceError:
    """An engine's refusal or failure as a service error; a busy engine says when to retry."""
    code, retry_after = _ENGINE[failure.kind]
    return ServiceError(failure.message, code, retry_after=retry_after)


def invalid(message: str, param: str | None = None) -> ServiceError:
    return ServiceError(message, INVALID_REQUEST, param)


def int_field(body: dict, key: str, lo: int = 1, hi: int | None = None) -> int | None:
    """An optional integer field within [lo, hi] (hi None: any positive integer)."""
    value = body.get(key)
    if value is None:
        return None
    if hi is None:
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise invalid(f"'{key}' must be a positive integer, got {value!r}", key)
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{key}' must be an integer from {lo} to {hi}, got {value!r}", key)
    if not lo <= value <= hi:
        raise invalid(f"'{key}' must be from {lo} to {hi}, got {value}", key)
    return value


def bool_field(body: dict, key: str, default: bool = False) -> bool:
    """An optional boolean: true or false, not the string "false" (which is truthy)."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"'{key}' must be true or false, got {value!r}", key)
    return value


def check_fields(body: dict, known: frozenset[str] | set[str], what: str,
                 otherwise: str | None = None) -> None:
    """Refuses a field `what` (a service or route) does not know, naming the closest
    known one (else `otherwise`, by default the list of known fields): nothing a caller
    sends is silently ignored."""
    for key in body:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else \
                otherwise or f"; known fields: {', '.join(sorted(known))}"
            raise invalid(f"unknown field '{key}' for {what}{hint}", str(key))


def require_model(body: object) -> str:
    """The model a request body names; refuses a body that is not an object or names none."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required: the name of an installed model", "model")
    return model


# JSON bodies from outside: how deep they may nest, and text they may not hold.
MAX_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_json(raw: bytes | str, what: str = "the request body") -> Any:
    """A JSON body from outside, refused (invalid request) when it is not JSON, nests deeper
    than MAX_DEPTH, or holds text that is not valid Unicode: JSON's \\udXXX escapes can
    carry lone surrogates, which no tokenizer or encoder accepts, and which would otherwise
    fail deep inside an engine."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise invalid(f"{what} nests too deeply (at most {MAX_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid(f"{what} is not valid JSON: {e}") from None
    _check_value(body, 0, what)
    return body


def _check_value(value: Any, depth: int, where: str) -> None:
    if isinstance(value, str):
        if not value.isascii() and _SURROGATE.search(value):  # (ASCII: nothing to search)
            raise invalid(f"{where} holds a lone surrogate (a \\ud800-\\udfff escape that is "
                          "not half of a pair), which is not valid Unicode text; send UTF-8 "
                          "text or escape pairs")
    elif isinstance(value, dict | list):
        if depth >= MAX_DEPTH:
            raise invalid(f"the request body nests too deeply (at most {MAX_DEPTH} levels)")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            label = f"{where}.{key}" if isinstance(value, dict) else f"{where}[{key}]"
            if isinstance(key, str) and _SURROGATE.search(key):
                raise invalid(f"a key in {where} holds a lone surrogate, which is not valid "
                              "Unicode text")
            _check_value(item, depth + 1, label)
