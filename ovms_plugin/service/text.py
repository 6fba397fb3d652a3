"""Chat and generate: request parsing and validation (every field honoured or refused by
name), streaming detokenization with stop strings, and the OpenAI response shapes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ovms_plugin.service import grammar, tools
from ovms_plugin.service.errors import bool_field, check_fields, int_field, invalid, require_model

_ROLES = {"system", "user", "assistant", "tool", "developer"}
MAX_CHOICES = 8  # `n`: sequences sampled from one prompt, per request
MAX_STOPS = 16

# Request fields, by what is done with them. Honoured by both routes:
_COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "n",
           "stop", "presence_penalty", "frequency_penalty", "seed", "logprobs", "user",
           "response_format",
           # extensions of vLLM, OpenVINO Model Server and llama.cpp clients:
           "top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens",
           # speculative decoding (prompt lookup, a draft model), on models set up for it
           # (OpenVINO Model Server's):
           "num_assistant_tokens", "max_ngram_size", "assistant_confidence_threshold"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools",
                         "tool_choice", "parallel_tool_calls", "chat_template_kwargs",
                         "think", "safety_identifier", "prompt_cache_key"}
GENERATE_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
# Fields OpenAI defines that cannot be honoured here: refused with the reason when given a
# value other than their default (the value that asks for nothing).
_REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "logit_bias": ((None, {}), "the engine has no per-token logit bias"),
    "functions": ((None, []), "the deprecated functions API is not supported; send tools"),
    "function_call": ((None, "none", "auto"), "the deprecated functions API is not "
                      "supported; send tool_choice"),
    "audio": ((None,), "audio output is not supported"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "store": ((None, False), "completions are not stored by this server"),
    "metadata": ((None, {}), "completions are not stored by this server, so they take no "
                 "metadata"),
    "service_tier": ((None, "auto", "default"), "there is one service tier"),
    "web_search_options": ((None,), "web search is not available"),
    "reasoning_effort": ((None,), "reasoning effort cannot be set; use "
                         "chat_template_kwargs {\"enable_thinking\": false} or think: false "
                         "to turn a reasoning model's thinking off"),
    "verbosity": ((None,), "verbosity cannot be set"),
    "suffix": ((None, ""), "insertion (fill in the middle) is not supported"),
}


@dataclass
class TextRequest:
    """The one internal request type for text generation, whatever protocol it came by."""

    service: str  # "chat" | "generate"
    model: str
    messages: list[dict[str, Any]] | None = None
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
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    num_assistant_tokens: int | None = None  # speculative: tokens proposed per step
    max_ngram_size: int | None = None  # prompt lookup: longest n-gram matched
    # draft model: propose while the draft is this sure of each token
    assistant_confidence_threshold: float | None = None
    n: int = 1
    logprobs: bool = False
    echo: bool = False  # completions: the prompt comes back before the answer
    # Constrained decoding: ("json_schema", schema text) or ("regex", pattern).
    structured: tuple[str, str] | None = None
    tools: list[dict[str, Any]] | None = None  # checked OpenAI tools, when tool_choice allows
    tool_choice: str = "auto"  # "auto" | "required" | "function" (forced, named)
    forced_tool: str | None = None
    parallel_tool_calls: bool = True
    template_kwargs: dict[str, Any] | None = None  # extra variables for the chat template
    # Images of the messages, in the order of their IMAGE_TAG marks: (URL as sent, whether
    # OpenAI's detail "low" asks for a small one).
    images: list[tuple[str, bool]] = field(default_factory=list)


@dataclass
class TextDelta:
    """A piece of one choice's answer. The last delta of a choice carries its
    finish_reason, and its tool calls if any."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    index: int = 0
    reasoning: str = ""  # a reasoning model's thinking (reasoning_content)
    tool_calls: list[tools.ToolCall] | None = None
    logprobs: list[tuple[str, float]] | None = None  # (token text, log-probability)


def _number(body: dict, key: str, lo: float, hi: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"'{key}' must be a number between {lo} and {hi}, got {value!r}", key)
    if not lo <= value <= hi:
        raise invalid(f"'{key}' must be between {lo} and {hi}, got {value}", key)
    return float(value)


IMAGE_TAG = "<ov_genai_image_{}>"  # where an image goes in the rendered prompt (GenAI's)
_TAG_PREFIX = "<ov_genai_image_"
MAX_IMAGES = 64  # per request, before the model's own limit (llm.max_images)


_DETAILS = ("auto", "high", "low")


def _image_ref(part: dict, where: str) -> tuple[str, bool]:
    """The image a content part names: its URL (a data: URL, or a path or http(s) URL,
    which the model's settings may allow), and whether its detail is "low"."""
    ref, detail = part.get("image_url"), part.get("detail")
    if isinstance(ref, dict):
        ref, detail = ref.get("url"), ref.get("detail")
    if not isinstance(ref, str) or not ref.strip():
        raise invalid(f"{where} is an image part without a URL: send {{\"type\": "
                      "\"image_url\", \"image_url\": {\"url\": \"data:image/png;base64,...\"}}",
                      "messages")
    if detail is not None and detail not in _DETAILS:
        raise invalid(f"{where}: detail must be auto, high or low, got {detail!r}", "messages")
    return ref.strip(), detail == "low"


def add_image(images: list[tuple[str, bool]], ref: tuple[str, bool]) -> str:
    """Records an image of the request; returns the tag that marks its place."""
    if len(images) >= MAX_IMAGES:
        raise invalid(f"the request has more than {MAX_IMAGES} images", "messages")
    images.append(ref)
    return IMAGE_TAG.format(len(images) - 1)


def check_no_tags(text: str, where: str) -> None:
    if _TAG_PREFIX in text:
        raise invalid(f"{where} contains '{_TAG_PREFIX}...>', which marks images in prompts "
                      "here; send images as image parts instead", "messages")


def _text_parts(content: list, i: int, images: list[tuple[str, bool]]) -> str:
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        where = f"messages[{i}].content[{j}]"
        if kind in ("image_url", "input_image"):
            parts.append(add_image(images, _image_ref(part, where)))
            continue
        if kind == "image":
            raise invalid(f"{where} has type 'image'; send images as {{\"type\": "
                          "\"image_url\", \"image_url\": {\"url\": ...}}", "messages")
        if kind == "input_audio":
            raise invalid(f"{where} is audio: audio input is not supported", "messages")
        if kind != "text":
            raise invalid(f"{where} must be a text or image_url part", "messages")
        if not isinstance(part.get("text"), str):
            raise invalid(f"{where}.text must be a string, got {part.get('text')!r}",
                          "messages")
        check_no_tags(part["text"], where)
        parts.append(part["text"])
    return "".join(parts)


def _tool_calls(value: Any, i: int) -> list[dict[str, Any]]:
    """An assistant message's tool calls, with arguments as objects (templates render
    them as JSON; OpenAI sends them as JSON text)."""
    if not isinstance(value, list):
        raise invalid(f"messages[{i}].tool_calls must be a list", "messages")
    out = []
    for j, call in enumerate(value):
        where = f"messages[{i}].tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(f"{where} must be {{\"type\": \"function\", \"id\": ..., "
                          "\"function\": {\"name\": ..., \"arguments\": ...}}", "messages")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args or "{}")
            except ValueError:
                raise invalid(f"{where}.function.arguments is not valid JSON", "messages") \
                    from None
        if not isinstance(args, dict):
            raise invalid(f"{where}.function.arguments must be a JSON object", "messages")
        item: dict[str, Any] = {"type": "function",
                                "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            item["id"] = call["id"]
        out.append(item)
    return out


def _message(message: Any, i: int, images: list[tuple[str, bool]]) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise invalid(f"messages[{i}] must be an object with 'role' and 'content'", "messages")
    role = message.get("role")
    if role not in _ROLES:
        raise invalid(f"messages[{i}].role must be one of {sorted(_ROLES)}, got {role!r}",
                      "messages")
    known = {"role", "content", "name"} | {"assistant": {"tool_calls", "refusal",
                                                         "reasoning_content"},
                                           "tool": {"tool_call_id"}}.get(role, set())
    for key in message:
        if key not in known:
            raise invalid(f"messages[{i}] has field '{key}', which a {role} message does "
                          f"not take; its fields are {', '.join(sorted(known))}", "messages")
    content = message.get("content")
    calls = message.get("tool_calls")
    if content is None and not calls:
        raise invalid(f"messages[{i}].content is missing or null; give a string or a list of "
                      "text parts", "messages")
    if content is None:
        content = ""
    if isinstance(content, list):
        content = _text_parts(content, i, images)
    elif isinstance(content, str):
        check_no_tags(content, f"messages[{i}].content")
    if not isinstance(content, str):
        raise invalid(f"messages[{i}].content must be a string", "messages")
    out: dict[str, Any] = {"role": role, "content": content}
    if calls:
        out["tool_calls"] = _tool_calls(calls, i)
    for key in ("tool_call_id", "name"):
        value = message.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise invalid(f"messages[{i}].{key} must be a string", "messages")
            out[key] = value
    return out


def _check_fields(service: str, body: dict) -> None:
    known = CHAT_FIELDS if service == "chat" else GENERATE_FIELDS
    route = "chat completions" if service == "chat" else "completions"
    rest = {}
    for key, value in body.items():
        if key in _REFUSED and not (key == "suffix" and service == "chat"):
            allowed, why = _REFUSED[key]
            if value not in allowed:
                raise invalid(f"'{key}' is not supported: {why}", key)
        else:
            rest[key] = value
    check_fields(rest, known, route, "; see the README's parameter table")


def _response_format(value: Any) -> tuple[str, str] | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ("json_schema", grammar.JSON_OBJECT_SCHEMA)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise invalid("response_format json_schema needs \"json_schema\": {\"name\": ..., "
                          "\"schema\": {...}}", "response_format")
        try:
            return ("json_schema", grammar.check_json_schema(spec["schema"]))
        except grammar.GrammarError as e:
            raise invalid(f"response_format.json_schema.schema: {e}", "response_format") \
                from None
    if kind == "regex":  # an extension (vLLM's guided_regex, as a response format)
        try:
            return ("regex", grammar.check_regex(value.get("regex")))
        except grammar.GrammarError as e:
            raise invalid(f"response_format.regex: {e}", "response_format") from None
    raise invalid("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"}, "
                  "{\"type\": \"json_schema\", \"json_schema\": {...}} or {\"type\": \"regex\", "
                  "\"regex\": ...}", "response_format")


def _tools(req: TextRequest, body: dict) -> None:
    """tools, tool_choice and parallel_tool_calls; a forced call is constrained by the
    tools' schemas, so its arguments always parse and validate."""
    given = body.get("tools")
    choice = body.get("tool_choice")
    req.parallel_tool_calls = bool_field(body, "parallel_tool_calls", True)
    if not given:
        if choice not in (None, "none", "auto"):
            raise invalid("'tool_choice' needs 'tools' to choose from", "tool_choice")
        return
    try:
        checked = tools.check_tools(given)
    except ValueError as e:
        raise invalid(str(e), "tools") from None
    names = [t["function"]["name"] for t in checked]
    if choice is None or choice == "auto":
        req.tool_choice = "auto"
    elif choice == "none":
        return  # the model answers in text: the tools are not shown to it
    elif choice == "required":
        req.tool_choice = "required"
    elif isinstance(choice, dict) and choice.get("type") == "function" \
            and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise invalid(f"tool_choice names function {name!r}, which is not among the "
                          f"tools ({', '.join(names)})", "tool_choice")
        req.tool_choice, req.forced_tool = "function", name
    else:
        raise invalid("'tool_choice' must be \"none\", \"auto\", \"required\" or "
                      "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    req.tools = checked
    if req.tool_choice != "auto":
        # A named function is called once; "required" may call several tools in parallel.
        schema = tools.constrained_schema(checked, req.forced_tool,
                                          req.parallel_tool_calls and not req.forced_tool)
        try:
            req.structured = ("json_schema", grammar.check_json_schema(schema))
        except grammar.GrammarError as e:
            raise invalid(f"the tools' parameters cannot constrain a forced call: {e}",
                          "tools") from None


def _template_kwargs(req: TextRequest, body: dict) -> None:
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise invalid("'chat_template_kwargs' must be an object, like "
                      "{\"enable_thinking\": false}", "chat_template_kwargs")
    extra = dict(kwargs or {})
    for key in ("messages", "tools", "add_generation_prompt"):
        if key in extra:
            raise invalid(f"chat_template_kwargs cannot set '{key}': it is the request's "
                          "own", "chat_template_kwargs")
    think = body.get("think")
    if think is not None:  # AOG's and Ollama's switch for reasoning models
        if not isinstance(think, bool):
            raise invalid(f"'think' must be true or false, got {think!r}", "think")
        extra["enable_thinking"] = think
    req.template_kwargs = extra or None


def _sampling(req: TextRequest, body: dict) -> None:
    # OpenAI's newer name wins over the older one.
    req.max_tokens = int_field(
        {"max_tokens": body.get("max_completion_tokens", body.get("max_tokens"))}, "max_tokens")
    req.temperature = _number(body, "temperature", 0, 2)
    req.top_p = _number(body, "top_p", 0, 1)
    if req.top_p == 0:
        raise invalid("'top_p' must be greater than 0", "top_p")
    req.presence_penalty = _number(body, "presence_penalty", -2, 2)
    req.frequency_penalty = _number(body, "frequency_penalty", -2, 2)
    top_k = body.get("top_k")
    if top_k is not None and top_k != -1:  # vLLM's -1 and 0: no top-k cut
        req.top_k = int_field(body, "top_k", 0, 1_000_000) or None
    req.min_p = _number(body, "min_p", 0, 1)
    rp = _number(body, "repetition_penalty", 0, 10)
    if rp == 0:
        raise invalid("'repetition_penalty' must be greater than 0 (1 is no penalty)",
                      "repetition_penalty")
    req.repetition_penalty = rp
    req.min_tokens = int_field(body, "min_tokens", 0, 1_000_000) or None
    req.num_assistant_tokens = int_field(body, "num_assistant_tokens", 1, 64)
    req.max_ngram_size = int_field(body, "max_ngram_size", 1, 64)
    req.assistant_confidence_threshold = _number(body, "assistant_confidence_threshold", 0, 1)
    if req.assistant_confidence_threshold == 0:
        raise invalid("'assistant_confidence_threshold' must be greater than 0 (the draft "
                      "proposes tokens while it is at least this sure of each), like 0.4",
                      "assistant_confidence_threshold")
    if req.assistant_confidence_threshold is not None and req.num_assistant_tokens:
        raise invalid("'num_assistant_tokens' and 'assistant_confidence_threshold' exclude "
                      "each other: the draft proposes a fixed number of tokens or as many "
                      "as it is sure of; send one of them", "assistant_confidence_threshold")
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise invalid(f"'seed' must be an integer, got {seed!r}", "seed")
        req.seed = seed
    req.ignore_eos = bool_field(body, "ignore_eos")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) \
                or len(stop) > MAX_STOPS:
            raise invalid(f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} "
                          "of them", "stop")
        req.stop = stop


def _choices_and_logprobs(req: TextRequest, body: dict) -> None:
    req.n = int_field(body, "n", 1, MAX_CHOICES) or 1
    best_of = body.get("best_of")
    if best_of is not None and best_of != req.n:
        raise invalid(f"'best_of' must equal n ({req.n}) when given: choices are not ranked "
                      "on the server", "best_of")
    if req.n > 1 and req.temperature == 0:
        raise invalid(f"'n' is {req.n} with temperature 0: greedy decoding gives the same "
                      "answer every time; raise temperature, or send n 1", "n")
    logprobs = body.get("logprobs")
    if req.service == "chat":
        req.logprobs = bool_field(body, "logprobs")
        top = int_field(body, "top_logprobs", 0, 20)
        if top:
            raise invalid("'top_logprobs' above 0 is not supported: the engine gives the "
                          "log-probability of the chosen token only; send 0 or leave it "
                          "out", "top_logprobs")
        if top is not None and not req.logprobs:
            raise invalid("'top_logprobs' needs \"logprobs\": true", "top_logprobs")
    elif logprobs is not None:  # completions: how many alternatives per token
        count = int_field(body, "logprobs", 0, 5)
        if count:
            raise invalid("'logprobs' above 0 is not supported: the engine gives the "
                          "log-probability of the chosen token only; send 0", "logprobs")
        req.logprobs = True
    req.echo = req.service == "generate" and bool_field(body, "echo")
    if req.echo and req.logprobs:
        raise invalid("'echo' with 'logprobs' is not supported: the prompt's tokens have no "
                      "log-probabilities here", "echo")


def parse(service: str, body: Any) -> TextRequest:
    """Validates a chat or generate body (OpenAI fields and the known extensions; AOG sends
    a subset). Every field is honoured or refused by name."""
    model = require_model(body)
    _check_fields(service, body)
    req = TextRequest(service=service, model=model, stream=bool_field(body, "stream"))
    if service == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise invalid("'messages' must be a non-empty list of {role, content} objects",
                          "messages")
        req.messages = [_message(m, i, req.images) for i, m in enumerate(messages)]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise invalid("'prompt' must be a non-empty string", "prompt")
        check_no_tags(prompt, "'prompt'")
        req.prompt = prompt
    _sampling(req, body)
    _choices_and_logprobs(req, body)
    req.structured = _response_format(body.get("response_format"))
    if service == "chat":
        structured = req.structured
        _tools(req, body)
        if structured is not None and req.tools is not None:
            raise invalid("'response_format' cannot be combined with tools (unless "
                          "tool_choice is \"none\"): a constrained answer cannot also be a "
                          "tool call", "response_format")
        _template_kwargs(req, body)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise invalid("'stream_options' must be an object like {\"include_usage\": true}",
                          "stream_options")
        if not req.stream:
            raise invalid("'stream_options' is only allowed with \"stream\": true",
                          "stream_options")
        for key in options:
            if key != "include_usage":
                raise invalid(f"stream_options has unknown field '{key}'; it takes "
                              "include_usage", "stream_options")
        req.include_usage = bool_field(options, "include_usage")
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


def _tool_call_items(calls: list[tools.ToolCall], stream: bool) -> list[dict[str, Any]]:
    out = []
    for k, c in enumerate(calls):
        item: dict[str, Any] = {"id": c.id, "type": "function",
                                "function": {"name": c.name, "arguments": c.arguments}}
        out.append({"index": k, **item} if stream else item)
    return out


def _logprobs(req: TextRequest, lps: list[tuple[str, float]] | None, offset: int = 0
              ) -> dict[str, Any] | None:
    if not req.logprobs:
        return None
    lps = lps or []
    if req.service == "chat":
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                             "top_logprobs": []} for t, lp in lps], "refusal": None}
    offsets, at = [], offset
    for t, _ in lps:
        offsets.append(at)
        at += len(t)
    return {"tokens": [t for t, _ in lps], "token_logprobs": [lp for _, lp in lps],
            "top_logprobs": None, "text_offset": offsets}


def _choice(req: TextRequest, d: TextDelta) -> dict[str, Any]:
    if req.service == "chat":
        message: dict[str, Any] = {"role": "assistant",
                                   "content": d.text if d.text or not d.tool_calls else None}
        if d.reasoning:
            message["reasoning_content"] = d.reasoning
        if d.tool_calls:
            message["tool_calls"] = _tool_call_items(d.tool_calls, stream=False)
        return {"index": d.index, "message": message, "finish_reason": d.finish_reason,
                "logprobs": _logprobs(req, d.logprobs)}
    return {"index": d.index, "text": d.text, "finish_reason": d.finish_reason,
            "logprobs": _logprobs(req, d.logprobs)}


def completion(req: TextRequest, rid: str, choices: list[TextDelta], prompt_tokens: int,
               completion_tokens: int) -> dict[str, Any]:
    """A whole chat.completion or text_completion, one choice per delta (collect())."""
    obj = "chat.completion" if req.service == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": req.model,
            "choices": [_choice(req, d) for d in choices],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(req: TextRequest, rid: str, created: int, d: TextDelta | None,
          finish: str | None = None, first: bool = False, usage_: dict | None = None,
          offset: int = 0) -> dict[str, Any]:
    """One chat.completion.chunk or streamed text_completion with a delta of one choice (or
    an empty one); `offset`: characters of that choice sent before (completions'
    logprobs text_offset)."""
    d = d or TextDelta("")
    if req.service == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if d.reasoning:
            delta["reasoning_content"] = d.reasoning
        if d.text or (first and not d.tool_calls):
            delta["content"] = d.text
        if d.tool_calls:
            delta["tool_calls"] = _tool_call_items(d.tool_calls, stream=True)
        choice: dict[str, Any] = {"index": d.index, "delta": delta, "finish_reason": finish,
                                  "logprobs": _logprobs(req, d.logprobs) if d.logprobs
                                  else None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": d.index, "text": d.text, "finish_reason": finish,
                  "logprobs": _logprobs(req, d.logprobs, offset) if d.logprobs else None}
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


async def collect(deltas: AsyncIterator[TextDelta]) -> tuple[list[TextDelta], int, int]:
    """Joins a stream of deltas into one per choice (for unary calls): the choices in
    index order, and the prompt and completion token counts."""
    merged: dict[int, TextDelta] = {}
    prompt_tokens = completion_tokens = 0
    async for d in deltas:
        m = merged.setdefault(d.index, TextDelta("", index=d.index))
        m.text += d.text
        m.reasoning += d.reasoning
        if d.tool_calls:
            m.tool_calls = (m.tool_calls or []) + d.tool_calls
        if d.logprobs:
            m.logprobs = (m.logprobs or []) + d.logprobs
        if d.finish_reason is not None:
            m.finish_reason = d.finish_reason
        prompt_tokens = max(prompt_tokens, d.prompt_tokens)
        completion_tokens = max(completion_tokens, d.completion_tokens)
    return [merged[i] for i in sorted(merged)], prompt_tokens, completion_tokens
