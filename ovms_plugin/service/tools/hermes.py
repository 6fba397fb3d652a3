"""Hermes format (Qwen2.5, Qwen3, Hermes and many others): content, then one or more
<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call> blocks."""

from __future__ import annotations

from ._base import Invalid, ToolCall, ToolParser, call_from_obj, load_whole, make_calls

START = "<tool_call>"
END = "</tool_call>"


class HermesParser(ToolParser):
    name = "hermes"
    markers = (START,)
    start_marker = START

    def _parse(self, text: str) -> tuple[str, list[ToolCall]]:
        pieces: list[str] = []
        found = []
        pos = 0
        while (i := text.find(START, pos)) >= 0:
            pieces.append(text[pos:i])
            j = text.find(END, i + len(START))
            if j < 0:
                raise Invalid("unterminated <tool_call>")
            found.append(call_from_obj(load_whole(text[i + len(START):j])))
            pos = j + len(END)
        pieces.append(text[pos:])
        return "".join(pieces).strip(), make_calls(found)
