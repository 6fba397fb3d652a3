"""Chat and generate: request parsing and validation, prompt rendering, streaming
detokenization with stop strings, and the OpenAI response shapes."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ovms_plugin.service.errors import bool_field, int_field, invalid, require_model

_ROLES = {"system", "user", "assistant", "tool", "developer"}


@dataclass
class TextRequest:
    """The one internal request type for text generation, whatever protocol it came by."""

    service: str  # "chat" | "generate"
    model: str
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    ignore_eos: bool = False
    include_usage: bool = False  # OpenAI stream_options: usage in a last chunk of its own


@dataclass
class TextDelta:
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _number(body: dict, key: str, lo: float, hi: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"'{key}' must be a number between {lo} and {hi}, got {value!r}", key)
    if not lo <= value <= hi:
        raise invalid(f"'{key}' must be between {lo} and {hi}, got {value}", key)
    return float(value)


def _content(message: Any, i: int) -> dict[str, str]:
    if not isinstance(message, dict):
        raise invalid(f"messages[{i}] must be an object with 'role' and 'content'", "messages")
    role = message.get("role")
    if role not in _ROLES:
        raise invalid(f"messages[{i}].role must be one of {sorted(_ROLES)}, got {role!r}",
                      "messages")
    content = message.get("content")
    if content is None and not message.get("tool_calls"):
        raise invalid(f"messages[{i}].content is missing or null; give a string or a list of "
                      "text parts", "messages")
    if content is None:
        content = ""
    if isinstance(content, list):  # OpenAI content parts: only text is supported
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise invalid(f"messages[{i}].content: only text parts are supported",
                              "messages")
            if not isinstance(part.get("text"), str):
                raise invalid(f"messages[{i}].content[{j}].text must be a string, got "
                              f"{part.get('text')!r}", "messages")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise invalid(f"messages[{i}].content must be a string", "messages")
    return {"role": role, "content": content}


def parse(service: str, body: Any) -> TextRequest:
    """Validates a chat or generate body (OpenAI fields; AOG sends a subset)."""
    model = require_model(body)
    req = TextRequest(service=service, model=model, stream=bool_field(body, "stream"))
    if service == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise invalid("'messages' must be a non-empty list of {role, content} objects",
                          "messages")
        req.messages = [_content(m, i) for i, m in enumerate(messages)]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise invalid("'prompt' must be a non-empty string", "prompt")
        req.prompt = prompt
    # OpenAI's newer name wins over the older one.
    req.max_tokens = int_field(
        {"max_tokens": body.get("max_completion_tokens", body.get("max_tokens"))}, "max_tokens")
    req.temperature = _number(body, "temperature", 0, 2)
    req.top_p = _number(body, "top_p", 0, 1)
    if req.top_p == 0:
        raise invalid("'top_p' must be greater than 0", "top_p")
    req.presence_penalty = _number(body, "presence_penalty", -2, 2)
    req.frequency_penalty = _number(body, "frequency_penalty", -2, 2)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) \
                or len(stop) > 16:
            raise invalid("'stop' must be a non-empty string or a list of up to 16 of them",
                          "stop")
        req.stop = stop
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise invalid(f"'seed' must be an integer, got {seed!r}", "seed")
        req.seed = seed
    req.ignore_eos = bool_field(body, "ignore_eos")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise invalid(f"'n' must be 1 (one choice per request), got {n!r}; send several "
                      "requests for several answers", "n")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise invalid("'stream_options' must be an object like {\"include_usage\": true}",
                          "stream_options")
        if not req.stream:
            raise invalid("'stream_options' is only allowed with \"stream\": true",
                          "stream_options")
        req.include_usage = bool(options.get("include_usage", False))
    return req


class Detokenizer:
    """Turns token ids into text as they arrive. A character split across tokens (UTF-8
    bytes of one character in several byte-level tokens) is held back until complete."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # decoding restarts here: earlier tokens are settled text
        self.read = 0  # text of ids[prefix:read] has been emitted

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        done = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") or len(text) <= len(done):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """The rest, complete or not (the generation is over)."""
        done = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]


class StopMatcher:
    """Finds stop strings in the streamed text; holds back a tail that could still become
    one, so no part of a stop string is ever sent."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# --- OpenAI response shapes -------------------------------------------------------------

def new_id(service: str) -> str:
    return ("chatcmpl-" if service == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(req: TextRequest, rid: str, text: str, finish: str | None,
               prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A whole chat.completion or text_completion."""
    if req.service == "chat":
        choice: dict[str, Any] = {"index": 0,
                                  "message": {"role": "assistant", "content": text},
                                  "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": req.model,
            "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}


def chunk(req: TextRequest, rid: str, created: int, text: str | None, finish: str | None,
          first: bool = False, usage_: dict | None = None) -> dict[str, Any]:
    """One chat.completion.chunk or streamed text_completion."""
    if req.service == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    out: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": req.model,
                           "choices": [choice]}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def usage_chunk(req: TextRequest, rid: str, created: int, usage_: dict[str, int]
                ) -> dict[str, Any]:
    """The extra last chunk of a stream with stream_options.include_usage: no choices, only
    the usage of the whole request (as OpenAI sends it)."""
    obj = "chat.completion.chunk" if req.service == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [],
            "usage": usage_}


async def collect(deltas: AsyncIterator[TextDelta]) -> TextDelta:
    """Joins a stream of deltas into one (for unary calls)."""
    parts, last = [], TextDelta("")
    async for d in deltas:
        parts.append(d.text)
        last = d
    return TextDelta("".join(parts), last.finish_reason, last.prompt_tokens,
                     last.completion_tokens)
