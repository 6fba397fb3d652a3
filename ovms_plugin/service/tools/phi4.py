"""Phi-4-mini format: content, then functools[{"name": ..., "arguments": {...}}, ...]."""

from __future__ import annotations

from ._base import Invalid, ToolCall, ToolParser, call_from_obj, load_whole, make_calls

MARK = "functools"


class Phi4Parser(ToolParser):
    name = "phi4"
    markers = (MARK,)
    start_marker = MARK + "["

    def _parse(self, text: str) -> tuple[str, list[ToolCall]]:
        i = text.find(self.start_marker)
        if i < 0:
            raise Invalid("no functools[")
        value = load_whole(text[i + len(MARK):])
        if not isinstance(value, list):
            raise Invalid("not a list of calls")
        return text[:i].strip(), make_calls(call_from_obj(obj) for obj in value)
