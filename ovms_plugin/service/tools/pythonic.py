"""Pythonic format (Llama 3.2 / Llama 4 pythonic templates): the whole output is a list of
calls [get_weather(city="Paris"), f2(x=1)], optionally inside <|python_start|> ...
<|python_end|> with content before. Read with ast and never evaluated: keyword arguments
only, whose values are literals (strings, numbers, booleans, None, lists, tuples as lists,
dicts with string keys)."""

from __future__ import annotations

import ast
from typing import Any

from ._base import (
    MAX_DEPTH,
    Invalid,
    ToolCall,
    ToolParser,
    dump_arguments,
    make_calls,
    prefix_related,
    too_deep,
)

START = "<|python_start|>"
END = "<|python_end|>"


def _literal(node: ast.expr, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise Invalid("nested too deeply")
    if isinstance(node, ast.Constant):
        if node.value is None or isinstance(node.value, bool | int | float | str):
            return node.value
        raise Invalid("not a JSON literal")
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd)
            and isinstance(node.operand, ast.Constant)
            and isinstance(node.operand.value, int | float)
            and not isinstance(node.operand.value, bool)):
        v = node.operand.value
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.List | ast.Tuple):
        return [_literal(e, depth + 1) for e in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values, strict=True):
            if k is None:  # {**x}
                raise Invalid("not a literal")
            key = _literal(k, depth + 1)
            if not isinstance(key, str):
                raise Invalid("a dict key is not a string")
            out[key] = _literal(v, depth + 1)
        return out
    raise Invalid("not a literal")


class PythonicParser(ToolParser):
    name = "pythonic"
    markers = ("[func_name1(", "func_name1(params_name1")

    def could_start(self, text: str) -> bool:
        return prefix_related(text, START) or text.startswith("[")

    def start_index(self, text: str) -> int:
        i = text.find(START)
        return i if i >= 0 else super().start_index(text)

    def _parse(self, text: str) -> tuple[str, list[ToolCall]]:
        content = ""
        i = text.find(START)
        if i >= 0:
            j = text.find(END, i)
            if j < 0 or text[j + len(END):].strip():
                raise Invalid("unterminated <|python_start|>")
            content, text = text[:i].strip(), text[i + len(START):j]
        text = text.strip()
        if not (text.startswith("[") and text.endswith("]")) or too_deep(text, python=True):
            raise Invalid("not a list of calls")
        tree = ast.parse(text, mode="eval").body
        if not isinstance(tree, ast.List) or not tree.elts:
            raise Invalid("not a list of calls")
        found = []
        for call in tree.elts:
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)) or call.args:
                raise Invalid("not a call by keywords")
            args = {}
            for kw in call.keywords:
                if kw.arg is None:  # **kwargs
                    raise Invalid("not a keyword argument")
                args[kw.arg] = _literal(kw.value)
            found.append((call.func.id, dump_arguments(args), None))
        return content, make_calls(found)
