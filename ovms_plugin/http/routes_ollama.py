"""Ollama-compatible routes, as Ollama's official clients call them: an application written
for Ollama (or its `ollama` Python client, `ollama.Client(host="http://127.0.0.1:8000")`)
can point here instead. Each route translates to the same internal requests as the OpenAI
and AOG routes (service.text.parse -> TextRequest, service.embed.parse_embed, the shared
Runtime) and answers in Ollama's shapes.

- POST /api/chat, /api/generate: NDJSON (`application/x-ndjson`) by default, one JSON object
  per line, `{"model", "created_at" (RFC 3339), "message": {"role": "assistant", "content"}
  | "response", "done": false}`, then a last line with `"done": true`, `done_reason` ("stop"
  or "length"), and total_duration, load_duration, prompt_eval_count,
  prompt_eval_duration, eval_count, eval_duration (nanoseconds). `"stream": false`: one
  object with the whole text and those fields. /api/generate renders the prompt (and
  `system`) with the model's chat template, as Ollama does; `"raw": true` sends the prompt
  as it is. No prompt (or no messages) loads the model and answers `done_reason: "load"`;
  with `"keep_alive": 0` it unloads it instead (`"unload"`), as `ollama stop` asks.
- POST /api/embed: `{"model", "embeddings": [[...]], "total_duration", "load_duration",
  "prompt_eval_count"}`, L2-normalised like Ollama's; `truncate` defaults to true as there.
  POST /api/embeddings (the older route): `{"embedding": [...]}`, as the model makes it.
- GET /api/tags: the store's models (`name:latest`, model, modified_at, size, digest,
  details); GET /api/ps: the loaded ones, with expires_at and size_vram 0; POST /api/show:
  parameters (the model's generation defaults), template (its chat template), details,
  model_info, capabilities; DELETE /api/delete; GET /api/version (this plugin's version).
- POST /api/pull: the puller's progress as NDJSON (`{"status", "digest", "total",
  "completed"}`, then `{"status": "success"}`); `"stream": false` answers once. The model is
  what `python -m ovms_plugin pull` takes (Hub repo, `hf.co/org/repo:QUANT`, catalog name,
  local folder or GGUF path); a client that goes away cancels the pull.

Names: `name:latest` is `name`; `name:tag` is the store's `name-tag` (as given, then
upper-case: the puller installs `org/repo:Q4_K_M` as `org/repo-Q4_K_M`), else `name` when
its quantization is that tag; `hf.co/org/repo:Q4_K_M` is `org/repo-Q4_K_M`. Anything else is
404 `{"error": "model 'x' not found"}`. Responses name the model as the request did.

Nothing is ignored: each field is honoured, or refused 400 with a message naming it (see
OPTION_FIELDS, NOT_YET and the table in the module's tests). `keep_alive` (seconds, or a Go
duration such as "5m") sets how long the model stays loaded after its last request: 0
unloads it when the request ends; shorter than the server's --idle-unload is honoured here;
longer, or negative (for good), only where the server keeps the model anyway (a --model
preloaded one, or --idle-unload 0), else it is refused. A request without keep_alive goes
back to the server's default. Errors are `{"error": "..."}` with the status of the OpenAI
routes (400, 404, 409, 413, 429 with Retry-After, 500, 503).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import math
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from aiohttp import web

from ovms_plugin import __version__
from ovms_plugin.http.common import (
    BODY_TIMEOUT,
    MODEL,
    RUNTIME,
    STATE,
    StreamFormat,
    json_response,
    read_json,
    stream_response,
)
from ovms_plugin.kinds import embed as embed_kind
from ovms_plugin.service import embed, errors, generation, jsonenc, text
from ovms_plugin.service.errors import ServiceError, bool_field, invalid
from ovms_plugin.service.runtime import Runtime
from ovms_plugin.store import catalog
from ovms_plugin.store import pull as pull_mod
from ovms_plugin.store.store import ModelEntry
from ovms_plugin.store.store import read_json as read_json_file

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Ollama's `options` honoured, and the TextRequest (OpenAI) field each becomes.
OPTION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "num_predict": "max_tokens",
                 "stop": "stop", "seed": "seed", "presence_penalty": "presence_penalty",
                 "frequency_penalty": "frequency_penalty", "top_k": "top_k", "min_p": "min_p",
                 "repeat_penalty": "repetition_penalty"}
# Ollama's other sampling options: refused, the engine has no equivalent.
SAMPLING_NOT_YET = ("typical_p", "tfs_z", "repeat_last_n", "mirostat", "mirostat_tau",
                    "mirostat_eta", "penalize_newline", "num_keep")
# Ollama's load-time options: the engine's are set per model in settings.yaml.
LOAD_OPTIONS = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv",
                "logits_all", "vocab_only", "use_mmap", "use_mlock", "embedding_only", "numa",
                "num_thread")


def _none(v: Any) -> bool:
    return v is None


def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, str | list | dict) and not v)


def _off(v: Any) -> bool:
    return v is None or v is False


def _zero(v: Any) -> bool:
    return v is None or (type(v) is int and v == 0)


# Fields refused until they are supported: (what counts as leaving it out, what the field
# is, what to do instead).
_IMAGE_GENERATION = (_none, "image generation through /api/generate",
                     "use /v1/images/generations")
NOT_YET: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "suffix": (_empty, "fill-in-the-middle", "leave it out"),
    "template": (_empty, "a prompt template of the request's own",
                 "the model's chat template is used, or send \"raw\": true with a prompt "
                 "already formatted"),
    "context": (_empty, "the token context of an earlier /api/generate",
                "responses carry none; send the conversation to /api/chat instead"),
    "logprobs": (_off, "log probabilities", "leave it out"),
    "top_logprobs": (_zero, "log probabilities", "leave it out"),
    "width": _IMAGE_GENERATION,
    "height": _IMAGE_GENERATION,
    "steps": _IMAGE_GENERATION,
    "verbose": (_off, "the tokenizer's vocabulary in model_info", "leave it out"),
    "insecure": (_off, "insecure registries", "pulls use the Hugging Face Hub client, whose "
                 "endpoint (HF_ENDPOINT) sets the transport; leave it out"),
}
MESSAGE_NOT_YET: dict[str, tuple[Callable[[Any], bool], str, str]] = {}


def not_yet(name: str, what: str, hint: str) -> ServiceError:
    return invalid(f"'{name}' ({what}) is not supported yet; {hint}", name)


# The fields of each route's body (the others are refused as unknown).
CHAT_FIELDS = {"model", "messages", "stream", "options", "keep_alive", "format", "tools",
               "think", "logprobs", "top_logprobs"}
GENERATE_FIELDS = {"model", "prompt", "system", "raw", "stream", "options", "keep_alive",
                   "format", "images", "suffix", "template", "context", "think", "logprobs",
                   "top_logprobs", "width", "height", "steps"}
EMBED_FIELDS = {"model", "input", "truncate", "dimensions", "options", "keep_alive"}
EMBEDDINGS_FIELDS = {"model", "prompt", "options", "keep_alive"}
SHOW_FIELDS = {"model", "name", "verbose"}
PULL_FIELDS = {"model", "name", "stream", "insecure"}
DELETE_FIELDS = {"model", "name"}

# Internal (OpenAI) parameter names in messages, as the Ollama request names them.
_PARAMS = {"max_tokens": "options.num_predict", "temperature": "options.temperature",
           "top_p": "options.top_p", "stop": "options.stop", "seed": "options.seed",
           "presence_penalty": "options.presence_penalty",
           "frequency_penalty": "options.frequency_penalty", "top_k": "options.top_k",
           "min_p": "options.min_p", "repetition_penalty": "options.repeat_penalty",
           "response_format": "format"}

_HF_PREFIXES = ("https://huggingface.co/", "https://hf.co/", "huggingface.co/", "hf.co/")
FOREVER = "9999-12-31T23:59:59Z"  # expires_at of a model the server keeps loaded
KEEPER_EVERY = 0.5  # seconds between checks for models past their keep_alive
KEEPER_MIN_IDLE = 1.0  # seconds idle before the checker unloads (a request between its
# load and its first step shows no activity for a moment)


# --- errors -------------------------------------------------------------------------------

def error_response(status: int, message: str, headers: dict[str, str] | None = None
                   ) -> web.Response:
    return json_response_with({"error": errors.public(message)}, status, headers)


def json_response_with(data: Any, status: int = 200, headers: dict[str, str] | None = None
                       ) -> web.Response:
    resp = json_response(data, status)
    if headers:
        resp.headers.update(headers)
    return resp


def message_of(e: ServiceError) -> str:
    """A service error's message, with the internal (OpenAI) parameter names the request
    did not use replaced by its own (max_tokens -> options.num_predict)."""
    message = e.message
    if e.param in _PARAMS:
        message = re.sub(rf"(?<![\w.]){re.escape(e.param)}\b", _PARAMS[e.param], message)
    return message


def ollama_errors(handler: Handler) -> Handler:
    """Errors as Ollama sends them: `{"error": "..."}` with the HTTP status."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ServiceError as e:
            headers = {}
            if e.retry_after is not None:
                headers["Retry-After"] = str(max(1, math.ceil(e.retry_after)))
            return error_response(e.http_status, message_of(e), headers)
        except web.HTTPRequestEntityTooLarge:
            limit = request.app[STATE].max_body_bytes
            return error_response(413, f"the request body is larger than this server accepts "
                                       f"({limit} bytes; see --max-body-mb)")
        except web.HTTPRequestTimeout:
            seconds = request.app.get(BODY_TIMEOUT) or 0
            resp = error_response(408, f"the request body did not arrive in full within "
                                       f"{seconds:g} s (see --body-timeout)")
            resp.force_close()
            return resp
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return error_response(e.status, e.reason)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as e:
            log.exception("internal error serving %s %s", request.method, request.path)
            return error_response(500, f"internal error: {type(e).__name__}: {e}")

    return wrapped


def not_found(name: str) -> ServiceError:
    return ServiceError(f"model '{name}' not found", errors.MODEL_NOT_FOUND, "model")


# --- request fields -----------------------------------------------------------------------

def check_fields(body: dict[str, Any], known: set[str], route: str) -> None:
    """Refuses fields the route does not know, and known ones not supported yet."""
    for key, value in body.items():
        if key not in known:
            raise invalid(f"unknown field '{key}' for {route}; its fields are "
                          f"{', '.join(sorted(known))}", key)
        if key in NOT_YET:
            absent, what, hint = NOT_YET[key]
            if not absent(value):
                raise not_yet(key, what, hint)


def model_field(body: dict[str, Any], alias: bool = False) -> str:
    """The model the body names (`name` is Ollama's older spelling for some routes)."""
    value = body.get("model")
    if alias and value in (None, ""):
        value = body.get("name")
    if not isinstance(value, str) or not value.strip():
        raise invalid("'model' is required: the name of a model (see /api/tags)", "model")
    return value.strip()


def sampling(options: Any) -> dict[str, Any]:
    """Ollama's `options` as TextRequest (OpenAI) fields; refuses what is not supported."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise invalid(f"'options' must be an object like {{\"temperature\": 0}}, got "
                      f"{type(options).__name__}", "options")
    out: dict[str, Any] = {}
    for key, value in options.items():
        name = f"options.{key}"
        if value is None:
            continue
        if key in OPTION_FIELDS:
            # -1 (no limit) and -2 (fill the context) both mean: until the context is full,
            # which is what no limit means here.
            if key == "num_predict" and type(value) is int and value in (-1, -2):
                continue
            out[OPTION_FIELDS[key]] = value
        elif key in SAMPLING_NOT_YET:
            raise not_yet(name, "a sampling option the engine does not take yet",
                          f"the options honoured are {', '.join(OPTION_FIELDS)}")
        elif key in LOAD_OPTIONS:
            raise not_yet(name, "a load-time option", "the context, device and threads of "
                          "a model come from the server's settings.yaml")
        else:
            raise invalid(f"unknown option '{name}'; the options honoured are "
                          f"{', '.join(OPTION_FIELDS)}", name)
    return out


def no_options(options: Any) -> None:
    """Embeddings take no options: any given is refused by name."""
    if options is None:
        return
    if not isinstance(options, dict):
        raise invalid("'options' must be an object", "options")
    for key, value in options.items():
        if value is not None:
            raise invalid(f"'options.{key}' is not supported for embeddings: they take no "
                          "options here", f"options.{key}")


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
          "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_keep_alive(value: Any) -> float | None:
    """keep_alive as seconds: None when not given, math.inf for "keep loaded" (negative).
    Numbers are seconds; strings are Go durations ("5m", "1h30m", "0") or seconds."""
    if value is None:
        return None
    seconds: float
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        s = value.strip()
        try:
            seconds = float(s)
        except ValueError:
            sign = -1.0 if s.startswith("-") else 1.0
            body = s.lstrip("+-")
            parts = _DURATION.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise invalid(f"'keep_alive' must be a number of seconds or a duration like "
                              f"\"5m\", \"1h\", \"30s\", \"0\" or \"-1m\", got {value!r}",
                              "keep_alive") from None
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise invalid(f"'keep_alive' must be a number of seconds or a duration like \"5m\", "
                      f"got {value!r}", "keep_alive")
    if math.isnan(seconds):
        raise invalid("'keep_alive' must be a number", "keep_alive")
    return math.inf if seconds < 0 else seconds


# --- names ------------------------------------------------------------------------------

def split_name(name: str) -> tuple[str, str | None]:
    """Ollama's `[hf.co/]name[:tag]` as (name, tag); `latest` and no tag are None."""
    n = name.strip()
    for prefix in _HF_PREFIXES:
        if n.lower().startswith(prefix):
            n = n[len(prefix):]
            break
    base, sep, tag = n.rpartition(":")
    if not sep:
        return n, None
    if not tag or tag.lower() == "latest":
        return base, None
    return base, tag


def _quant_of(entry: ModelEntry) -> set[str]:
    m = entry.manifest
    gguf = m.get("gguf") if isinstance(m.get("gguf"), dict) else {}
    return {str(q).upper() for q in (m.get("quantization_level"), gguf.get("file_type")) if q}


def resolve(rt: Runtime, name: str) -> ModelEntry:
    """The store's model for an Ollama name (see the module's doc); 404 when none."""
    base, tag = split_name(name)
    if tag is None:
        entry = rt.store.find(base)
    else:
        entry = None
        for candidate in dict.fromkeys((f"{base}-{tag}", f"{base}-{tag.upper()}")):
            if (entry := rt.store.find(candidate)) is not None:
                break
        if entry is None:
            entry = rt.store.find(base)
            if entry is not None and tag.upper() not in _quant_of(entry):
                entry = None
    if entry is None:
        raise not_found(name)
    return entry


def tag_name(name: str) -> str:
    return f"{name}:latest"


def pull_spec(name: str) -> str:
    """What the puller is given for an Ollama pull name: paths, Hub ids and `hf.co/` names
    as they are (the puller reads `:QUANT` and `:latest`); a catalog name's `:latest` is
    dropped, and `name:tag` is the catalog's `name-tag` when it has one."""
    n = name.strip()
    if n.startswith(("/", "./", "../", "~")) or "/" in n:
        return n
    base, sep, tag = n.rpartition(":")
    if not sep:
        return n
    if not tag or tag.lower() == "latest":
        return base
    return f"{base}-{tag}" if catalog.lookup(f"{base}-{tag}") is not None else n


# --- keep_alive ---------------------------------------------------------------------------

@dataclass
class KeepAlive:
    """Per-model keep_alive set by Ollama requests, and the checker that honours it."""

    idle_unload: float  # the server's --idle-unload, seconds (0: never)
    expiry: dict[str, float] = field(default_factory=dict)  # model: seconds idle, then unload
    active: dict[str, int] = field(default_factory=dict)  # Ollama requests running per model

    def policy(self, name: str, value: Any, pinned: tuple[str, ...]) -> float | None:
        """The request's keep_alive for model `name` in seconds (None: the server's
        default); refuses what the server cannot honour."""
        seconds = parse_keep_alive(value)
        if seconds is None or seconds == 0:
            return seconds
        kept = self.idle_unload <= 0 or name in pinned  # never unloaded for being idle
        if math.isinf(seconds):
            if kept:
                return None  # what the server does anyway
            limit = self.idle_unload
            raise invalid(f"keep_alive {value!r} (keep the model loaded for good) is not "
                          f"supported for model '{name}' yet: this server unloads it after "
                          f"{limit:g} s without requests (--idle-unload); send a keep_alive "
                          f"of at most {limit:g}s, or start the server with --idle-unload 0 "
                          "or --model NAME", "keep_alive")
        if not kept and seconds > self.idle_unload:
            limit = self.idle_unload
            raise invalid(f"keep_alive {value!r} is longer than this server keeps idle models "
                          f"({limit:g} s, --idle-unload), which is not supported yet; send at "
                          f"most {limit:g}s, or start the server with a larger --idle-unload",
                          "keep_alive")
        return seconds

    def begin(self, name: str, seconds: float | None) -> None:
        if seconds is None:
            self.expiry.pop(name, None)
        else:
            self.expiry[name] = seconds
        self.active[name] = self.active.get(name, 0) + 1

    async def end(self, rt: Runtime, name: str) -> None:
        n = self.active.get(name, 1) - 1
        if n > 0:
            self.active[name] = n
        else:
            self.active.pop(name, None)
        if self.expiry.get(name) == 0:
            await self.release(rt, name)

    async def release(self, rt: Runtime, name: str) -> None:
        """Unloads a model kept for 0 s now, unless requests still run on it (then the
        checker unloads it once they are done)."""
        self.expiry[name] = 0.0
        if self.active.get(name):
            return
        lm = rt.models.get(name)
        if lm is None:
            self.expiry.pop(name, None)
        elif not lm.client.in_flight:
            self.expiry.pop(name, None)
            log.info("unloading %s: keep_alive 0", name)
            await rt.unload(name)

    async def sweep(self, rt: Runtime) -> None:
        now = time.monotonic()
        for name, seconds in list(self.expiry.items()):
            if self.active.get(name):
                continue
            lm = rt.models.get(name)
            if lm is None:
                self.expiry.pop(name, None)  # unloaded meanwhile: the next load starts anew
                continue
            if lm.client.in_flight or now - lm.last_used < max(seconds, KEEPER_MIN_IDLE):
                continue
            self.expiry.pop(name, None)
            log.info("unloading %s: idle for %.0f s (keep_alive %g s)", name,
                     now - lm.last_used, seconds)
            await rt.unload(name)

    def expires_at(self, name: str, last_used: float, busy: bool, pinned: tuple[str, ...]
                   ) -> str:
        seconds = self.expiry.get(name)
        if seconds is None:
            if self.idle_unload <= 0 or name in pinned:
                return FOREVER
            seconds = self.idle_unload
        left = seconds if busy else seconds - (time.monotonic() - last_used)
        return timestamp(time.time() + max(0.0, left))


KEEP = web.AppKey("ollama_keep_alive", KeepAlive)


async def _keeper(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: checks for models past their keep_alive while the app runs."""
    keep, rt = app[KEEP], app[RUNTIME]

    async def loop() -> None:
        while True:
            await asyncio.sleep(KEEPER_EVERY)
            try:
                await keep.sweep(rt)
            except Exception:
                log.exception("unloading models past their keep_alive failed")

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task


# --- shapes -----------------------------------------------------------------------------

def timestamp(ts: float | None = None) -> str:
    """RFC 3339 in UTC, to the microsecond, as Ollama's created_at."""
    dt = datetime.now(UTC) if ts is None else datetime.fromtimestamp(ts, UTC)
    return dt.isoformat(timespec="microseconds").replace("+00:00", "Z")


def details(entry: ModelEntry) -> dict[str, Any]:
    d = entry.to_aog()["details"]
    return {"parent_model": "", "format": d["format"], "family": d["family"],
            "families": d["families"] or None, "parameter_size": d["parameter_size"],
            "quantization_level": d["quantization_level"]}


def digest(entry: ModelEntry) -> str:
    return str(entry.manifest.get("digest", "")).removeprefix("sha256:")


def tag_entry(entry: ModelEntry) -> dict[str, Any]:
    aog = entry.to_aog()
    return {"name": tag_name(entry.name), "model": tag_name(entry.name),
            "modified_at": aog["modified_at"], "size": aog["size"], "digest": digest(entry),
            "details": details(entry)}


def _piece(kind: str, model: str, content: str, done: bool, thinking: str = "",
           calls: list[Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model, "created_at": timestamp()}
    if kind == "chat":
        out["message"] = {"role": "assistant", "content": content}
        if thinking:
            out["message"]["thinking"] = thinking
        if calls:
            out["message"]["tool_calls"] = [
                {"function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                for c in calls]
    else:
        out["response"] = content
        if thinking:
            out["thinking"] = thinking
    out["done"] = done
    return out


# --- chat and generate --------------------------------------------------------------------

def _ollama_calls(value: Any, i: int) -> list[dict[str, Any]]:
    """An assistant message's tool calls, from Ollama's shape (arguments as an object)."""
    if not isinstance(value, list):
        raise invalid(f"messages[{i}].tool_calls must be a list", "messages")
    calls = []
    for j, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise invalid(f"messages[{i}].tool_calls[{j}] must be {{\"function\": {{\"name\": "
                          "..., \"arguments\": {...}}}", "messages")
        calls.append({"type": "function", "function": {"name": fn.get("name"),
                                                       "arguments": fn.get("arguments", {})}})
    return calls


def _messages(value: Any) -> list[dict[str, Any]]:
    """Ollama's messages in the OpenAI shape service.text validates: tool calls, a tool
    result's tool_name and an earlier answer's thinking go to the chat template."""
    if not isinstance(value, list):
        raise invalid("'messages' must be a list of {\"role\", \"content\"} objects", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}] must be an object with 'role' and 'content'",
                          "messages")
        for key, item in m.items():
            if key in ("role", "content", "tool_calls", "tool_name", "thinking", "images"):
                continue
            if key not in MESSAGE_NOT_YET:
                raise invalid(f"messages[{i}] has an unknown field '{key}'; a message has "
                              "role, content, tool_calls, tool_name, thinking, images",
                              "messages")
            absent, what, hint = MESSAGE_NOT_YET[key]
            if not absent(item):
                raise not_yet(f"messages[{i}].{key}", what, hint)
        msg: dict[str, Any] = {"role": m.get("role"),
                               "content": _with_images(m.get("content"), m.get("images"),
                                                       f"messages[{i}].images")}
        if m.get("tool_calls"):
            msg["tool_calls"] = _ollama_calls(m["tool_calls"], i)
            msg["content"] = msg["content"] or ""
        if m.get("tool_name") is not None:
            msg["name"] = m["tool_name"]
        if m.get("thinking"):
            msg["reasoning_content"] = m["thinking"]
        out.append(msg)
    return out


def _with_images(content: Any, images: Any, where: str) -> Any:
    """A message's content with Ollama's `images` (base64, no data: prefix) before its
    text, as OpenAI image parts."""
    if images in (None, []):
        return content
    if not isinstance(images, list) or not all(isinstance(x, str) and x for x in images):
        raise invalid(f"'{where}' must be a list of base64-encoded images", "images")
    if content is not None and not isinstance(content, str):
        raise invalid(f"the content beside '{where}' must be a string", "messages")
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": x if x.startswith("data:")
                                             else f"data:image/*;base64,{x}"}}
        for x in images]
    return [*parts, {"type": "text", "text": content or ""}]


def _format(value: Any) -> dict[str, Any] | None:
    """Ollama's `format` as an OpenAI response_format."""
    if value in (None, ""):
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": value}}
    raise invalid(f"'format' must be \"json\" or a JSON schema object, got {value!r}",
                  "format")


async def _served(request: web.Request, requested: str, service: str) -> ModelEntry:
    entry = await asyncio.to_thread(resolve, request.app[RUNTIME], requested)
    request[MODEL] = entry.name
    if service not in entry.services:
        what = {"chat": "chat", "generate": "generate", "embed": "embeddings"}[service]
        raise invalid(f"model '{requested}' does not support {what}: it is a {entry.task} "
                      f"model (it serves {', '.join(entry.services) or 'nothing yet'})",
                      "model")
    return entry


async def _text_events(rt: Runtime, req: text.TextRequest, kind: str, requested: str,
                       started: int, load_ns: int) -> AsyncIterator[dict[str, Any]]:
    """A chat or generate request's Ollama objects: pieces of text, then the last one."""
    after_load = time.monotonic_ns()
    first: int | None = None
    async with aclosing(generation.generate(rt, req)) as deltas:
        async for d in deltas:
            if first is None:
                first = time.monotonic_ns()
            if d.text or d.reasoning or d.tool_calls:
                yield _piece(kind, requested, d.text, False, d.reasoning, d.tool_calls)
            if d.finish_reason is not None:
                end = time.monotonic_ns()
                last = _piece(kind, requested, "", True)
                reason = "stop" if d.finish_reason == "tool_calls" else d.finish_reason
                last.update(done_reason=reason, total_duration=end - started,
                            load_duration=load_ns, prompt_eval_count=d.prompt_tokens,
                            prompt_eval_duration=first - after_load,
                            eval_count=d.completion_tokens, eval_duration=end - first)
                yield last
                return


async def _collect(events: AsyncIterator[dict[str, Any]], kind: str) -> dict[str, Any]:
    parts: list[str] = []
    thinking: list[str] = []
    calls: list[Any] = []
    last: dict[str, Any] = {}
    async with aclosing(events) as it:
        async for ev in it:
            where = ev["message"] if kind == "chat" else ev
            parts.append(where["content"] if kind == "chat" else where["response"])
            thinking.append(where.get("thinking", ""))
            calls += where.get("tool_calls", [])
            last = ev
    where = last["message"] if kind == "chat" else last
    where["content" if kind == "chat" else "response"] = "".join(parts)
    if any(thinking):
        where["thinking"] = "".join(thinking)
    if calls:
        where["tool_calls"] = calls
    return last


async def _text(request: web.Request, kind: str) -> web.StreamResponse:
    started = time.monotonic_ns()
    body = await read_json(request)
    check_fields(body, CHAT_FIELDS if kind == "chat" else GENERATE_FIELDS, f"/api/{kind}")
    requested = model_field(body)
    stream = bool_field(body, "stream", True)
    options = sampling(body.get("options"))
    internal: dict[str, Any] = {"model": requested, **options}
    response_format = _format(body.get("format"))
    if response_format is not None:
        internal["response_format"] = response_format
    if body.get("tools"):
        if kind != "chat":
            raise invalid("'tools' are for /api/chat", "tools")
        internal["tools"] = body["tools"]
    think = body.get("think")
    if think is not None:
        if not isinstance(think, bool):
            raise invalid(f"'think' must be true or false, got {think!r} (thinking levels are "
                          "not supported)", "think")
        internal["think"] = think
    service = "chat"
    if kind == "chat":
        given = body.get("messages")
        messages = [] if given is None else _messages(given)
        empty = not messages
        internal["messages"] = messages
    else:
        prompt, system = body.get("prompt"), body.get("system")
        for key, value in (("prompt", prompt), ("system", system)):
            if value is not None and not isinstance(value, str):
                raise invalid(f"'{key}' must be a string, got {type(value).__name__}", key)
        raw = bool_field(body, "raw")
        empty = not prompt
        images = body.get("images")
        if raw and images:
            raise invalid("'images' need the model's chat template, which \"raw\": true "
                          "leaves out; leave raw out", "images")
        if raw:
            if system:
                raise invalid("'system' cannot be used with \"raw\": true (a raw prompt is "
                              "sent as it is, without the template that places a system "
                              "prompt); put it in the prompt, or leave raw out", "system")
            service = "generate"
            internal["prompt"] = prompt
        else:
            internal["messages"] = ([{"role": "system", "content": system}] if system else []) \
                + [{"role": "user", "content": _with_images(prompt, images, "images")}]
    rt, keep, state = request.app[RUNTIME], request.app[KEEP], request.app[STATE]
    entry = await _served(request, requested, service)
    seconds = keep.policy(entry.name, body.get("keep_alive"), state.pinned)
    if empty:  # Ollama's way to load (or, with keep_alive 0, unload) a model
        return json_response(await _load_or_unload(request, entry, requested, seconds, kind))
    internal["model"] = entry.name
    req = text.parse(service, internal)
    generation.check_sees(entry, req)
    keep.begin(entry.name, seconds)
    try:
        t0 = time.monotonic_ns()
        await rt.load(entry.name)
        events = _text_events(rt, req, kind, requested, started, time.monotonic_ns() - t0)
        if stream:
            return await ndjson(request, events)
        return json_response(await _collect(events, kind))
    finally:
        await asyncio.shield(keep.end(rt, entry.name))


async def _load_or_unload(request: web.Request, entry: ModelEntry, requested: str,
                          seconds: float | None, kind: str) -> dict[str, Any]:
    rt, keep = request.app[RUNTIME], request.app[KEEP]
    if seconds == 0:
        await keep.release(rt, entry.name)
        reason = "unload"
    else:
        keep.begin(entry.name, seconds)
        try:
            await rt.load(entry.name)
        finally:
            await keep.end(rt, entry.name)
        reason = "load"
    out = _piece(kind, requested, "", True)
    out["done_reason"] = reason
    return out


@ollama_errors
async def chat(request: web.Request) -> web.StreamResponse:
    return await _text(request, "chat")


@ollama_errors
async def generate(request: web.Request) -> web.StreamResponse:
    return await _text(request, "generate")


def _line(data: Any) -> bytes:
    return (jsonenc.dumps(data, compact=True) + "\n").encode()


def _ndjson_refusal(first: Any) -> web.Response | None:
    """Ollama answers a pull that fails before any progress with an HTTP error."""
    if isinstance(first, dict) and set(first) == {"error"}:
        return error_response(500, first["error"])
    return None


NDJSON = StreamFormat("application/x-ndjson", _line, lambda e: _line({"error": message_of(e)}),
                      lambda status, message, code: _line({"error": errors.public(message)}))


async def ndjson(request: web.Request, events: AsyncIterator[dict[str, Any]]
                 ) -> web.StreamResponse:
    """Streams `events` as NDJSON (see common.stream_response); an error is one
    `{"error": ...}` line."""
    return await stream_response(request, events, NDJSON, _ndjson_refusal)


# --- embeddings ---------------------------------------------------------------------------

async def _embed(request: web.Request, body: dict[str, Any], texts: Any, truncate: bool | None,
                 dimensions: Any) -> tuple[ModelEntry, list[np.ndarray], int, int]:
    """Embeds `texts` (None: only loads the model); (entry, vectors, tokens, load ns)."""
    requested = model_field(body)
    no_options(body.get("options"))
    rt, keep, state = request.app[RUNTIME], request.app[KEEP], request.app[STATE]
    entry = await _served(request, requested, "embed")
    seconds = keep.policy(entry.name, body.get("keep_alive"), state.pinned)
    req = None
    errors.int_field(body, "dimensions")
    if texts is not None:
        req = embed.parse_embed({"model": entry.name, "input": texts, "truncate": truncate,
                                 "dimensions": dimensions, "encoding_format": "base64"})
    keep.begin(entry.name, seconds)
    try:
        t0 = time.monotonic_ns()
        await rt.load(entry.name)
        load_ns = time.monotonic_ns() - t0
        if req is None:
            return entry, [], 0, load_ns
        result = await embed_kind.run(rt, req)
    finally:
        await asyncio.shield(keep.end(rt, entry.name))
    vectors = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
               for d in result["data"]]
    return entry, vectors, int(result["usage"]["prompt_tokens"]), load_ns


@ollama_errors
async def api_embed(request: web.Request) -> web.Response:
    started = time.monotonic_ns()
    body = await read_json(request)
    check_fields(body, EMBED_FIELDS, "/api/embed")
    texts = body.get("input")
    if texts == "" or texts == []:
        texts = None  # Ollama: no input loads the model
    truncate = bool_field(body, "truncate", True)
    _, vectors, tokens, load_ns = await _embed(request, body, texts, truncate,
                                               body.get("dimensions"))
    out = []
    for v in vectors:  # Ollama's /api/embed answers unit vectors
        norm = float(np.linalg.norm(v))
        out.append(jsonenc.floats(v / norm if norm > 0 else v))
    return json_response({"model": model_field(body), "embeddings": out,
                          "total_duration": time.monotonic_ns() - started,
                          "load_duration": load_ns, "prompt_eval_count": tokens})


@ollama_errors
async def api_embeddings(request: web.Request) -> web.Response:
    body = await read_json(request)
    check_fields(body, EMBEDDINGS_FIELDS, "/api/embeddings")
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise invalid(f"'prompt' must be a string, got {type(prompt).__name__}", "prompt")
    _, vectors, _, _ = await _embed(request, body, prompt or None, None, None)
    return json_response({"embedding": jsonenc.floats(vectors[0]) if vectors else []})


# --- models -------------------------------------------------------------------------------

@ollama_errors
async def api_tags(request: web.Request) -> web.Response:
    store = request.app[RUNTIME].store
    models = await asyncio.to_thread(lambda: [tag_entry(e) for e in store.list()])
    return json_response({"models": models})


@ollama_errors
async def api_ps(request: web.Request) -> web.Response:
    rt, keep, state = request.app[RUNTIME], request.app[KEEP], request.app[STATE]
    loaded = sorted(rt.models.items())
    expires = [keep.expires_at(name, lm.last_used,
                               bool(lm.client.in_flight or keep.active.get(name)), state.pinned)
               for name, lm in loaded]

    def entries() -> list[dict[str, Any]]:  # reads the models' config files
        return [{"name": tag_name(name), "model": tag_name(name),
                 "size": lm.memory_bytes or lm.entry.size, "digest": digest(lm.entry),
                 "details": details(lm.entry), "expires_at": expires_at, "size_vram": 0,
                 "context_length": lm.context or 0}
                for (name, lm), expires_at in zip(loaded, expires, strict=True)]

    return json_response({"models": await asyncio.to_thread(entries)})


_GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                        "min_p": "min_p", "repetition_penalty": "repeat_penalty"}
_CAPABILITIES = {"text-generation": ["completion"], "feature-extraction": ["embedding"]}


def chat_template(entry: ModelEntry) -> str:
    """The chat template the model's tokenizer carries (its IR's rt_info), else the one
    beside it (chat_template.jinja, tokenizer_config.json); "" when it has none."""
    xml = entry.path / "openvino_tokenizer.xml"
    with suppress(OSError, ET.ParseError):
        node = ET.parse(xml).getroot().find("rt_info/chat_template")
        if node is not None and node.get("value"):
            return node.get("value") or ""
    with suppress(OSError, UnicodeDecodeError):
        return (entry.path / "chat_template.jinja").read_text()
    template = read_json_file(entry.path / "tokenizer_config.json").get("chat_template")
    return template if isinstance(template, str) else ""


def show(entry: ModelEntry, template: str | None) -> dict[str, Any]:
    """/api/show's answer (reads files: call it in a thread)."""
    config = entry.config
    arch = entry.manifest.get("family") or config.get("model_type") or entry.task
    info: dict[str, Any] = {"general.architecture": arch}
    gguf = entry.manifest.get("gguf")
    if isinstance(gguf, dict) and isinstance(gguf.get("parameter_count"), int):
        info["general.parameter_count"] = gguf["parameter_count"]
    if (ctx := entry.context_length()) is not None:
        info[f"{arch}.context_length"] = ctx
    for key, name in (("hidden_size", "embedding_length"), ("num_hidden_layers", "block_count"),
                      ("num_attention_heads", "attention.head_count"),
                      ("num_key_value_heads", "attention.head_count_kv"),
                      ("vocab_size", "vocab_size")):
        if isinstance(config.get(key), int):
            info[f"{arch}.{name}"] = config[key]
    generation = read_json_file(entry.path / "generation_config.json")
    parameters = "\n".join(f"{ollama:<30} {generation[key]}"
                           for key, ollama in _GENERATION_DEFAULTS.items()
                           if isinstance(generation.get(key), int | float))
    if template is None:
        template = chat_template(entry) if entry.task == "text-generation" else ""
    return {"modelfile": "", "parameters": parameters, "template": template,
            "details": details(entry), "model_info": info,
            "capabilities": _CAPABILITIES.get(entry.task, []),
            "modified_at": entry.to_aog()["modified_at"]}


async def _installed(request: web.Request, fields: Any, route: str) -> ModelEntry:
    """The installed model a body of `route` names (`model` or `name`), fields checked."""
    body = await read_json(request)
    check_fields(body, fields, route)
    entry = await asyncio.to_thread(resolve, request.app[RUNTIME],
                                    model_field(body, alias=True))
    request[MODEL] = entry.name
    return entry


@ollama_errors
async def api_show(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    entry = await _installed(request, SHOW_FIELDS, "/api/show")
    template = None
    lm = rt.models.get(entry.name)
    if lm is not None and lm.tokenizer is not None:
        with suppress(Exception):
            template = lm.tokenizer.chat_template or None
    return json_response(await asyncio.to_thread(show, entry, template))


@ollama_errors
async def api_delete(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    entry = await _installed(request, DELETE_FIELDS, "/api/delete")
    await rt.delete(entry.name)
    request.app[KEEP].expiry.pop(entry.name, None)
    return web.Response(status=200)


async def pull_events(rt: Runtime, spec: str) -> AsyncIterator[dict[str, Any]]:
    """The pull's progress (see Runtime.pull)."""
    async with aclosing(rt.pull(pull_mod.PullRequest(model=spec))) as messages:
        async for msg in messages:
            yield msg


@ollama_errors
async def api_pull(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    check_fields(body, PULL_FIELDS, "/api/pull")
    spec = pull_spec(model_field(body, alias=True))
    events = pull_events(request.app[RUNTIME], spec)
    if bool_field(body, "stream", True):
        return await ndjson(request, events)
    last: dict[str, Any] = {}
    async with aclosing(events) as it:
        async for msg in it:
            last = msg
    if "error" in last:
        return error_response(500, last["error"])
    return json_response(last)


@ollama_errors
async def api_version(request: web.Request) -> web.Response:
    return json_response({"version": __version__})


def add_routes(app: web.Application, idle_unload: float = 600.0) -> None:
    """The routes, and the keep_alive checker; `idle_unload` is the server's --idle-unload
    (0: models are never unloaded for being idle)."""
    app[KEEP] = KeepAlive(idle_unload=float(idle_unload))
    app.cleanup_ctx.append(_keeper)
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/generate", generate)
    app.router.add_post("/api/embed", api_embed)
    app.router.add_post("/api/embeddings", api_embeddings)
    app.router.add_get("/api/tags", api_tags)
    app.router.add_get("/api/ps", api_ps)
    app.router.add_post("/api/show", api_show)
    app.router.add_delete("/api/delete", api_delete)
    app.router.add_post("/api/pull", api_pull)
    app.router.add_get("/api/version", api_version)
