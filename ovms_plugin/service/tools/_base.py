"""What every tool-call parser shares: the call record, the base class with its
never-raise wrapper, and careful JSON decoding of text a model wrote (hostile input).

The parsers are our own rather than openvino_genai's: its Llama3JsonToolParser raises on
";"-separated calls and accepts non-object arguments, and its Llama3PythonicToolParser keeps
only the first call and turns disallowed arguments into an empty object."""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

# Text longer than this is not looked at (returned unchanged as content).
MAX_TEXT_CHARS = 1 << 20
# Deepest nesting of brackets accepted in a call (arguments included).
MAX_DEPTH = 64

NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")

_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)
_PY_TOKENS = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|[\[\]{}()]', re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object as text (OpenAI sends arguments as a string)
    id: str  # "call_" + 24 random hex chars when the model gave none


class Invalid(ValueError):
    """The text holds no valid call (caught by ToolParser.parse)."""


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


_ALNUM = string.ascii_letters + string.digits


def new_mistral_id() -> str:
    """Mistral's chat templates refuse any tool-call id that is not 9 letters or digits."""
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


def too_deep(text: str, python: bool = False, limit: int = MAX_DEPTH) -> bool:
    """Whether brackets outside string literals nest deeper than limit. An unterminated
    quote is skipped (its brackets counted), so the answer errs toward "too deep"."""
    depth = 0
    for m in (_PY_TOKENS if python else _JSON_TOKENS).finditer(text):
        c = m.group()
        if c in "[{(":
            depth += 1
            if depth > limit:
                return True
        elif c in "]})":
            depth -= 1
    return False


def _no_constant(name: str) -> Any:
    raise Invalid(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def decode_at(text: str, pos: int) -> tuple[Any, int]:
    """The JSON value starting at text[pos] (after whitespace) and the index after it.
    Raises Invalid. Callers check too_deep() on the text first."""
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    try:
        return _DECODER.raw_decode(text, pos)
    except (ValueError, RecursionError) as e:
        raise Invalid(str(e)) from None


def load_whole(text: str) -> Any:
    """text is exactly one JSON value (whitespace around allowed). Raises Invalid."""
    if too_deep(text):
        raise Invalid("nested too deeply")
    value, end = decode_at(text, 0)
    if text[end:].strip():
        raise Invalid("text after the JSON value")
    return value


def dump_arguments(args: Any) -> str:
    if not isinstance(args, dict):
        raise Invalid("arguments are not an object")
    try:
        return json.dumps(args, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (ValueError, TypeError, RecursionError) as e:
        raise Invalid(str(e)) from None


_CALL_KEYS = {"name", "arguments", "parameters", "id", "type"}


def call_from_obj(obj: Any, strict: bool = False) -> tuple[str, str, Any]:
    """(name, arguments as JSON text, the id the model gave or None) from one call object:
    {"name": ..., "arguments"|"parameters": {...} or a JSON string of an object}, or the
    OpenAI shape {"type": "function", "function": {...}, "id": ...}. strict: the object has
    no other keys (for formats where the whole output is bare JSON that a plain JSON answer
    could resemble). Raises Invalid."""
    if not isinstance(obj, dict):
        raise Invalid("a call is not an object")
    if "name" not in obj and isinstance(obj.get("function"), dict):
        if strict and not set(obj) <= {"function", "id", "type"}:
            raise Invalid("unexpected keys in a call")
        obj = {**obj["function"], "id": obj.get("id")}
    if strict and not set(obj) <= _CALL_KEYS:
        raise Invalid("unexpected keys in a call")
    name = obj.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise Invalid("a call's name is not a valid function name")
    if "arguments" in obj:
        args = obj["arguments"]
    elif "parameters" in obj:
        args = obj["parameters"]
    else:
        raise Invalid("a call has no arguments")
    if isinstance(args, str):
        args = load_whole(args)
    return name, dump_arguments(args), obj.get("id")


def make_calls(items: Iterable[tuple[str, str, Any]],
               new_id: Callable[[], str] = new_call_id) -> list[ToolCall]:
    """ToolCalls, keeping a model's id when it is valid and not already taken."""
    calls: list[ToolCall] = []
    seen: set[str] = set()
    for name, arguments, given in items:
        cid = given if isinstance(given, str) and ID_RE.fullmatch(given) else None
        while cid is None or cid in seen:
            cid = new_id()
        seen.add(cid)
        calls.append(ToolCall(name=name, arguments=arguments, id=cid))
    return calls


def prefix_related(text: str, marker: str) -> bool:
    """text starts with marker, or is (so far) a beginning of it."""
    return text.startswith(marker) or marker.startswith(text)


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of text that is a proper beginning of marker."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ToolParser:
    """One output format. Subclasses set name and markers and write _parse()."""

    name: str = ""
    # detect(): the chat template contains any of these.
    markers: tuple[str, ...] = ()
    # The string a call starts with, for formats where content may come before the calls.
    start_marker: str | None = None

    def detect(self, template: str) -> bool:
        template = template or ""
        return any(m in template for m in self.markers)

    def could_start(self, text: str) -> bool:
        """text (the output so far, leading whitespace stripped) might still become a
        tool call. True for "" (nothing is known yet)."""
        return self.start_marker is not None and prefix_related(text, self.start_marker)

    def start_index(self, text: str) -> int:
        """Extra to the brief: where in text (the output so far) a tool call may begin,
        len(text) when nowhere. A front end can stream text[:i] as content and hold the rest.
        For formats whose call is the whole output: 0 or len(text)."""
        if self.start_marker is not None:
            i = text.find(self.start_marker)
            if i >= 0:
                return i
            return len(text) - partial_suffix(text, self.start_marker)
        return 0 if self.could_start(text.lstrip()) else len(text)

    def parse(self, text: str, known: set[str] | None = None) -> tuple[str, list[ToolCall]]:
        """(remaining content, calls). All or nothing: text with any malformed call, or (when
        known is given) any call to a name not in known, comes back unchanged with []."""
        if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
            return text, []
        try:
            content, calls = self._parse(text)
        except Exception:  # Invalid, and anything hostile text might provoke
            return text, []
        if not calls or (known is not None and any(c.name not in known for c in calls)):
            return text, []
        return content, calls

    def _parse(self, text: str) -> tuple[str, list[ToolCall]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
