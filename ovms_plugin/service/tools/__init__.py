"""Tool calls in generated text, the OpenAI way: one parser per output format (each in its
own module), the choice of a parser for a chat template, the JSON Schema that constrains
output when a tool call is required, and validation of a request's `tools`.

Pure Python: no model, no I/O. Parsers never raise; text that holds no valid call comes
back unchanged as content. openvino_genai's own parsers are not used (see _base)."""

from __future__ import annotations

import re
from typing import Any

from ._base import MAX_DEPTH, NAME_RE, ToolCall, ToolParser
from .generic_json import JsonParser
from .hermes import HermesParser
from .llama3_json import Llama3JsonParser
from .mistral import MistralParser
from .phi4 import Phi4Parser
from .pythonic import PythonicParser

__all__ = ["PARSERS", "ToolCall", "ToolParser", "check_tools", "choose", "constrained_schema"]

PARSERS: dict[str, ToolParser] = {p.name: p for p in (
    HermesParser(), Llama3JsonParser(), MistralParser(), PythonicParser(), Phi4Parser(),
    JsonParser())}

# detect() is tried in this order: the distinctive markers first, Llama 3's loose test last.
_DETECT_ORDER = ("hermes", "mistral", "phi4", "pythonic", "llama3_json")


def choose(template: str, setting: str | None = None) -> ToolParser:
    """The parser for a model: its setting (a parser's name) wins; else the first whose
    detect() matches the chat template; else the generic "json" parser."""
    if setting is not None:
        try:
            return PARSERS[setting]
        except (KeyError, TypeError):
            raise ValueError(f"unknown tool parser {setting!r}; known: "
                             f"{', '.join(sorted(PARSERS))}") from None
    for name in _DETECT_ORDER:
        if PARSERS[name].detect(template or ""):
            return PARSERS[name]
    return PARSERS["json"]


def _function(tool: dict) -> dict:
    return tool.get("function", tool) if isinstance(tool, dict) else {}


def _object_schema(params: Any) -> dict:
    """A tool's parameters as a schema that only admits objects."""
    if not isinstance(params, dict) or not params:
        return {"type": "object", "properties": {}}
    return params if "type" in params else {"type": "object", **params}


def _has_ref(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if isinstance(v.get("$ref"), str):
                return True
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _rebase_refs(value: Any, base: str) -> Any:
    """A copy of a schema whose local refs ("#", "#/...") point below base instead of the
    root, for a schema moved to base inside a larger one."""
    if isinstance(value, list):
        return [_rebase_refs(v, base) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: _rebase_refs(v, base) for k, v in value.items()}
    ref = value.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        out["$ref"] = base + ref[1:]
    return out


def constrained_schema(tools: list[dict], forced: str | None, parallel: bool) -> dict:
    """JSON Schema for output when tool_choice is "required" (forced None) or names a function
    (forced): {"tool_calls": [{"name": <const>, "arguments": <its parameters>}, ...]}, at
    least one call, at most one unless parallel. tools: OpenAI tools (as check_tools returns
    them). A tool's parameters that use local $refs move to the root's $defs under the tool's
    name (refs rebased) and are referenced from there. Raises ValueError when forced names
    no tool, or there are no tools."""
    options = []
    defs: dict[str, Any] = {}
    for tool in tools:
        fn = _function(tool)
        name = fn.get("name")
        if forced is not None and name != forced:
            continue
        params = _object_schema(fn.get("parameters"))
        if _has_ref(params):
            defs[name] = _rebase_refs(params, f"#/$defs/{name}")
            params = {"$ref": f"#/$defs/{name}"}
        options.append({
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": params},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    if not options:
        raise ValueError(f"tool_choice names the function {forced!r}, which is not in tools"
                         if forced is not None else "tool_choice requires a tool: tools is empty")
    calls: dict[str, Any] = {"type": "array", "items": {"anyOf": options}, "minItems": 1}
    if not parallel:
        calls["maxItems"] = 1
    schema: dict[str, Any] = {"type": "object", "properties": {"tool_calls": calls},
                              "required": ["tool_calls"], "additionalProperties": False}
    if defs:
        schema["$defs"] = defs
    return schema


# ----- check_tools --------------------------------------------------------------------------

_TYPES = {"null", "boolean", "object", "array", "number", "string", "integer"}
_SUB = ("items", "additionalProperties", "not", "contains", "propertyNames", "if", "then",
        "else", "unevaluatedProperties", "unevaluatedItems", "additionalItems")
_SUB_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUB_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_NUMBERS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
           "minContains", "maxContains")
_STRINGS = ("title", "description", "$ref", "$id", "$schema", "$anchor", "$comment", "format",
            "$dynamicRef", "$dynamicAnchor")
_BOOLS = ("uniqueItems", "readOnly", "writeOnly", "deprecated")


def _depth(value: Any) -> int:
    """Nesting depth of JSON-like data, without recursion (capped just past MAX_DEPTH)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                break
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def check_schema_basics(schema: Any, where: str = "parameters") -> None:
    """The checks made by hand when the jsonschema package is not installed: every keyword
    that is common in tool parameters has a value of the right kind, recursively. Raises
    ValueError naming where."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(f"{where} is not a JSON Schema (an object or a boolean)")
    if "type" in schema:
        t = schema["type"]
        ts = t if isinstance(t, list) else [t]
        if (not ts or not all(isinstance(x, str) and x in _TYPES for x in ts)
                or len(set(ts)) != len(ts)):
            raise ValueError(f"{where}.type must be one of {sorted(_TYPES)} or a list of them")
    for key in _SUB:
        if key in schema:
            check_schema_basics(schema[key], f"{where}.{key}")
    for key in _SUB_MAPS:
        if key in schema:
            if not isinstance(schema[key], dict):
                raise ValueError(f"{where}.{key} must be an object")
            for name, sub in schema[key].items():
                if key == "patternProperties":
                    try:
                        re.compile(name)
                    except re.error:
                        raise ValueError(f"{where}.{key}: {name!r} is not a regular "
                                         "expression") from None
                check_schema_basics(sub, f"{where}.{key}.{name}")
    for key in _SUB_LISTS:
        if key in schema:
            if not isinstance(schema[key], list) or not schema[key]:
                raise ValueError(f"{where}.{key} must be a non-empty list")
            for i, sub in enumerate(schema[key]):
                check_schema_basics(sub, f"{where}.{key}[{i}]")
    if "required" in schema:
        r = schema["required"]
        if (not isinstance(r, list) or not all(isinstance(x, str) for x in r)
                or len(set(r)) != len(r)):
            raise ValueError(f"{where}.required must be a list of distinct strings")
    if "enum" in schema and not isinstance(schema["enum"], list):
        raise ValueError(f"{where}.enum must be a list")
    for key in _NUMBERS:
        if key in schema and not _is_number(schema[key]):
            raise ValueError(f"{where}.{key} must be a number")
    if "multipleOf" in schema and schema["multipleOf"] <= 0:
        raise ValueError(f"{where}.multipleOf must be greater than 0")
    for key in _COUNTS:
        v = schema.get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{where}.{key} must be a non-negative integer")
    for key in _STRINGS:
        if key in schema and not isinstance(schema[key], str):
            raise ValueError(f"{where}.{key} must be a string")
    for key in _BOOLS:
        if key in schema and not isinstance(schema[key], bool):
            raise ValueError(f"{where}.{key} must be true or false")
    if "pattern" in schema:
        try:
            re.compile(schema["pattern"])
        except (re.error, TypeError):
            raise ValueError(f"{where}.pattern is not a regular expression") from None


def _check_schema(schema: Any, where: str) -> None:
    try:
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError
    except ImportError:
        check_schema_basics(schema, where)
        return
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.path)
        raise ValueError(f"{where}{path} is not a valid JSON Schema: {e.message}") from None


def check_tools(tools: Any) -> list[dict]:
    """Validates an OpenAI `tools` list and returns it normalised: each
    {"type": "function", "function": {"name", "description"?, "parameters", "strict"?}},
    parameters defaulting to an empty object schema. Raises ValueError naming tools[i]."""
    if not isinstance(tools, list):
        raise ValueError("tools must be a list")
    out: list[dict] = []
    seen: dict[str, int] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise ValueError(f"{where} must be an object")
        if tool.get("type") != "function":
            raise ValueError(f'{where}.type must be "function"')
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ValueError(f"{where}.function must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ValueError(f"{where}.function.name must be 1 to 64 letters, digits, "
                             f"'_' or '-' (got {name!r:.80})")
        if name in seen:
            raise ValueError(f"{where}.function.name {name!r} repeats tools[{seen[name]}]")
        seen[name] = i
        norm: dict[str, Any] = {"name": name}
        if fn.get("description") is not None:
            if not isinstance(fn["description"], str):
                raise ValueError(f"{where}.function.description must be a string")
            norm["description"] = fn["description"]
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        pwhere = f"{where}.function.parameters"
        if not isinstance(params, dict):
            raise ValueError(f"{pwhere} must be an object (a JSON Schema)")
        if params.get("type", "object") != "object":
            raise ValueError(f'{pwhere}.type must be "object": arguments are an object')
        if _depth(params) > MAX_DEPTH:
            raise ValueError(f"{pwhere} is nested more than {MAX_DEPTH} deep")
        _check_schema(params, pwhere)
        norm["parameters"] = _object_schema(params)
        if fn.get("strict") is not None:
            if not isinstance(fn["strict"], bool):
                raise ValueError(f"{where}.function.strict must be true or false")
            norm["strict"] = fn["strict"]
        out.append({"type": "function", "function": norm})
    return out
