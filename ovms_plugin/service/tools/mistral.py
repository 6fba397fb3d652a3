"""Mistral format: content, then [TOOL_CALLS][{"name": ..., "arguments": {...}, "id"?: ...},
...] (v3 tokenizers), or the v11+ form [TOOL_CALLS]name[ARGS]{...} (optionally
name[CALL_ID]id[ARGS]{...}), repeated for several calls. Ids made here are 9 letters or
digits, the only ones Mistral's chat templates accept back."""

from __future__ import annotations

from ._base import (
    Invalid,
    ToolCall,
    ToolParser,
    call_from_obj,
    decode_at,
    load_whole,
    make_calls,
    new_mistral_id,
    too_deep,
)

MARK = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"


class MistralParser(ToolParser):
    name = "mistral"
    markers = (MARK,)
    start_marker = MARK

    def _parse(self, text: str) -> tuple[str, list[ToolCall]]:
        i = text.find(MARK)
        if i < 0:
            raise Invalid("no [TOOL_CALLS]")
        content, body = text[:i].strip(), text[i + len(MARK):]
        if too_deep(body):
            raise Invalid("nested too deeply")
        if body.lstrip().startswith("["):
            value, end = decode_at(body, 0)
            if not isinstance(value, list) or body[end:].strip():
                raise Invalid("not a list of calls")
            found = [call_from_obj(obj) for obj in value]
        else:
            found = [self._v11(part) for part in body.split(MARK)]
        return content, make_calls(found, new_mistral_id)

    @staticmethod
    def _v11(part: str) -> tuple[str, str, str | None]:
        head, sep, args = part.partition(ARGS)
        if not sep:
            raise Invalid("no [ARGS]")
        name, _, given = head.partition(CALL_ID)
        obj = {"name": name.strip(), "arguments": load_whole(args)}
        name, arguments, _ = call_from_obj(obj)
        return name, arguments, given.strip() or None
