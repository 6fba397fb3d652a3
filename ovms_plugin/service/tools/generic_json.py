"""The generic "json" format, the fallback and what constrained output (tool_choice
"required" or a named function) produces: the whole output, after optional ``` fences, is
{"tool_calls": [{"name": ..., "arguments": {...} or "<JSON text>", "id"?: ...}, ...]}, a
list of such calls, or a single call {"name": ..., "arguments"|"parameters": {...}}. This is
also what SmolLM2's template, as openvino-genai renders it with tools, asks for. A given id
is kept when it matches ^[A-Za-z0-9_-]{1,64}$ (and is not repeated)."""

from __future__ import annotations

import re

from ._base import Invalid, ToolCall, ToolParser, call_from_obj, load_whole, make_calls

_FENCE = re.compile(r"```(?:json)?[ \t]*\n?(.*?)\n?[ \t]*```", re.DOTALL | re.IGNORECASE)


class JsonParser(ToolParser):
    name = "json"

    def detect(self, template: str) -> bool:
        return True  # the fallback: any template

    def could_start(self, text: str) -> bool:
        return text.startswith(("{", "[")) or prefix_related_any(text, ("```json", "```"))

    def _parse(self, text: str) -> tuple[str, list[ToolCall]]:
        body = text.strip()
        if body.startswith("```"):
            m = _FENCE.fullmatch(body)
            if not m:
                raise Invalid("unterminated fence")
            body = m.group(1)
        value = load_whole(body)
        if isinstance(value, dict) and "tool_calls" in value:
            if set(value) != {"tool_calls"}:
                raise Invalid("unexpected keys beside tool_calls")
            value = value["tool_calls"]
            if not isinstance(value, list):
                raise Invalid("tool_calls is not a list")
        items = value if isinstance(value, list) else [value]
        return "", make_calls(call_from_obj(obj, strict=True) for obj in items)


def prefix_related_any(text: str, markers: tuple[str, ...]) -> bool:
    return any(text.startswith(m) or m.startswith(text) for m in markers)
