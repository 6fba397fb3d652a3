"""Llama 3.1 / 3.2 JSON format: an optional <|python_tag|>, then one or more objects
{"name": ..., "parameters": {...}} ("arguments" accepted too) separated by ";" (a JSON list
of them is accepted too). Without the tag the whole output must be the calls; content
before the tag is kept."""

from __future__ import annotations

from ._base import (
    Invalid,
    ToolCall,
    ToolParser,
    call_from_obj,
    decode_at,
    make_calls,
    prefix_related,
    too_deep,
)

TAG = "<|python_tag|>"


class Llama3JsonParser(ToolParser):
    name = "llama3_json"

    def detect(self, template: str) -> bool:
        template = template or ""
        return TAG in template or ("<|start_header_id|>" in template and (
            "Environment: ipython" in template or "tools" in template))

    def could_start(self, text: str) -> bool:
        return prefix_related(text, TAG) or text.startswith(("{", "["))

    def start_index(self, text: str) -> int:
        i = text.find(TAG)
        if i >= 0:
            return i
        return super().start_index(text)

    def _parse(self, text: str) -> tuple[str, list[ToolCall]]:
        content = ""
        i = text.find(TAG)
        if i >= 0:
            content, text = text[:i].strip(), text[i + len(TAG):]
        if too_deep(text):
            raise Invalid("nested too deeply")
        found = []
        pos = 0
        while True:
            value, pos = decode_at(text, pos)
            for obj in value if isinstance(value, list) else [value]:
                found.append(call_from_obj(obj, strict=True))
            rest = text[pos:].lstrip()
            if not rest:
                break
            if not rest.startswith(";"):
                raise Invalid("text after the calls")
            pos = len(text) - len(rest) + 1
            if not text[pos:].strip():  # a trailing ";"
                break
        return content, make_calls(found)
