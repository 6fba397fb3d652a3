"""Tool-call parsers, parser choice, the constrained-output schema, tools validation and
the <think> splitter: pure Python, no model."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from ovms_plugin.service.tools import (
    PARSERS,
    ToolCall,
    check_tools,
    choose,
    constrained_schema,
)
from ovms_plugin.service.tools import check_schema_basics as basics
from ovms_plugin.service.tools.reasoning import ThinkSplitter, opens_in_prompt, uses_reasoning

ID_RE = re.compile(r"call_[0-9a-f]{24}")


def calls(parser: str, text: str, **kw) -> tuple[str, list[tuple[str, dict]]]:
    content, found = PARSERS[parser].parse(text, **kw)
    for c in found:
        assert isinstance(c, ToolCall) and isinstance(c.arguments, str) and c.id
    return content, [(c.name, json.loads(c.arguments)) for c in found]


def unchanged(parser: str, text: str) -> None:
    assert PARSERS[parser].parse(text) == (text, [])


DEEP_JSON = "[" * 100_000
DEEP_ARGS = '{"name": "f", "arguments": ' + '{"a": ' * 70 + "1" + "}" * 70 + "}"
GARBAGE = ["", "   ", "hello", "}{][", '{"name": 1}', "\x00\xff\ud800", "null", "[]", "{}"]


# ----- hermes ---------------------------------------------------------------------------------

def test_hermes_one_call():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, found = PARSERS["hermes"].parse(text)
    assert content == ""
    assert found[0].name == "get_weather" and found[0].arguments == '{"city":"Paris"}'
    assert ID_RE.fullmatch(found[0].id)


def test_hermes_several_calls_content_before_and_unicode():
    text = ('Let me check.\n<tool_call>\n{"name": "a", "arguments": {"q": "été"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>')
    content, found = PARSERS["hermes"].parse(text)
    assert content == "Let me check."
    assert [c.name for c in found] == ["a", "b"]
    assert found[0].arguments == '{"q":"été"}'  # compact, not ASCII-escaped
    assert found[0].id != found[1].id


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "a", "arguments": {}}',  # unterminated
    '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b"',
    '<tool_call>{"name": "a", "arguments": [1]}</tool_call>',  # arguments not an object
    '<tool_call>{"name": 3, "arguments": {}}</tool_call>',  # name not a string
    '<tool_call>{"name": "a", "arguments": {}} extra</tool_call>',
    '<tool_call>{"name": "a", "arguments": {"x": NaN}}</tool_call>',
    '<tool_call></tool_call>',
    "<tool_call>" + DEEP_JSON + "</tool_call>",
    "<tool_call>" + DEEP_ARGS + "</tool_call>",
    *GARBAGE,
])
def test_hermes_malformed(text):
    unchanged("hermes", text)


def test_hermes_arguments_as_json_string():
    assert calls("hermes", '<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call>') \
        == ("", [("a", {"x": 1})])


# ----- llama3_json ----------------------------------------------------------------------------

def test_llama3_one_call_with_and_without_tag():
    for text in ['<|python_tag|>{"name": "f", "parameters": {"a": 1}}',
                 '{"name": "f", "parameters": {"a": 1}}',
                 '  {"name": "f", "arguments": {"a": 1}}  ']:
        assert calls("llama3_json", text) == ("", [("f", {"a": 1})])


def test_llama3_several_calls_and_content_before_tag():
    text = ('I will call.<|python_tag|>{"name": "f", "parameters": {"s": "a;b"}}; '
            '{"name": "g", "parameters": {}};')
    assert calls("llama3_json", text) == ("I will call.", [("f", {"s": "a;b"}), ("g", {})])


@pytest.mark.parametrize("text", [
    '{"name": "f", "parameters": {"a": 1}',
    '{"name": "f", "parameters": {"a": 1}} and more',
    '{"name": "f", "parameters": {"a": 1}}; nope',
    '{"name": "Bob", "age": 3}',  # a plain JSON answer is not a call
    '{"name": "f", "parameters": {}, "extra": 1}',
    'Sure: {"name": "f", "parameters": {}}',
    DEEP_JSON, "<|python_tag|>" + DEEP_JSON, DEEP_ARGS,
    *GARBAGE,
])
def test_llama3_malformed(text):
    unchanged("llama3_json", text)


# ----- mistral --------------------------------------------------------------------------------

def test_mistral_list_format():
    text = 'Hi [TOOL_CALLS][{"name": "f", "arguments": {"a": 1}, "id": "abcDEF123"}, ' \
           '{"name": "g", "arguments": {}}]'
    content, found = PARSERS["mistral"].parse(text)
    assert content == "Hi"
    assert [(c.name, c.arguments) for c in found] == [("f", '{"a":1}'), ("g", "{}")]
    assert found[0].id == "abcDEF123"
    assert re.fullmatch(r"[A-Za-z0-9]{9}", found[1].id)  # what Mistral templates accept


def test_mistral_v11_format():
    text = '[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[CALL_ID]xyz987abc[ARGS]{}'
    content, found = PARSERS["mistral"].parse(text)
    assert content == ""
    assert [(c.name, c.arguments) for c in found] == [("f", '{"a":1}'), ("g", "{}")]
    assert found[1].id == "xyz987abc"


@pytest.mark.parametrize("text", [
    "[TOOL_CALLS]", '[TOOL_CALLS][{"name": "f", "arguments": {}}', '[TOOL_CALLS]f{"a": 1}',
    '[TOOL_CALLS][{"name": "f", "arguments": "no"}]', '[TOOL_CALLS][]',
    "[TOOL_CALLS]" + DEEP_JSON, "[TOOL_CALLS][" + DEEP_ARGS + "]", *GARBAGE,
])
def test_mistral_malformed(text):
    unchanged("mistral", text)


# ----- pythonic -------------------------------------------------------------------------------

def test_pythonic_calls():
    text = '[get_weather(city="Paris"), f2(x=1, y=-2.5, z=[True, None, {"k": (1, 2)}])]'
    assert calls("pythonic", text) == ("", [
        ("get_weather", {"city": "Paris"}), ("f2", {"x": 1, "y": -2.5, "z": [True, None,
                                                                            {"k": [1, 2]}]})])
    assert calls("pythonic", "[now()]") == ("", [("now", {})])


def test_pythonic_llama4_wrapper_with_content_before():
    text = 'Checking.<|python_start|>[f(a="b")]<|python_end|>'
    assert calls("pythonic", text) == ("Checking.", [("f", {"a": "b"})])


@pytest.mark.parametrize("text", [
    '[f(x=os.system("ls"))]', "[f(x=__import__('os'))]", "[f(1)]", "[f(**d)]", "[f(x=1+1)]",
    "[f(x=y)]", "[a.b(x=1)]", "[f(x={1: 2})]", "[f(x=1e999)]", "[f(x={**d})]", "[]",
    "[f(x=1)", "f(x=1)", "[f(x=1), 3]", "[lambda: 0]", "[f(x=b'1')]", "<|python_start|>[f()]",
    "[" * 500 + "]" * 500, DEEP_JSON, "[f(x=" + "[" * 70 + "]" * 70 + ")]", *GARBAGE,
])
def test_pythonic_refuses(text):
    unchanged("pythonic", text)


# ----- phi4 -----------------------------------------------------------------------------------

def test_phi4():
    text = 'functools[{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]'
    assert calls("phi4", text) == ("", [("f", {"a": 1}), ("g", {})])
    assert calls("phi4", 'Ok. functools[{"name": "f", "arguments": {}}]') == ("Ok.", [("f", {})])


@pytest.mark.parametrize("text", [
    "functools", "functools[", 'functools[{"name": "f", "arguments": {}}',
    'functools{"name": "f", "arguments": {}}', "functools" + DEEP_JSON,
    "functools[" + DEEP_ARGS + "]", *GARBAGE,
])
def test_phi4_malformed(text):
    unchanged("phi4", text)


# ----- json (generic, constrained output) -----------------------------------------------------

def test_json_smollm2_shape_keeps_valid_id():
    text = ('{"tool_calls": [{"name": "tool_name", "arguments": {"arg1": "some_value"}, '
            '"id": "call_1___"}]}')
    content, found = PARSERS["json"].parse(text)
    assert content == "" and found == [ToolCall("tool_name", '{"arg1":"some_value"}',
                                                "call_1___")]


def test_json_ids_invalid_or_repeated_are_replaced():
    text = json.dumps({"tool_calls": [
        {"name": "a", "arguments": {}, "id": "bad id!"},
        {"name": "b", "arguments": {}, "id": "x"},
        {"name": "c", "arguments": {}, "id": "x"},
        {"name": "d", "arguments": {}, "id": ""}]})
    ids = [c.id for c in PARSERS["json"].parse(text)[1]]
    assert ID_RE.fullmatch(ids[0]) and ids[1] == "x" and ID_RE.fullmatch(ids[2])
    assert ID_RE.fullmatch(ids[3]) and len(set(ids)) == 4


def test_json_forms():
    assert calls("json", '```json\n{"name": "f", "parameters": {"a": 1}}\n```') \
        == ("", [("f", {"a": 1})])
    assert calls("json", '{"tool_calls": [{"name": "f", "arguments": "{\\"a\\": 2}"}, '
                         '{"name": "g", "arguments": {}}]}') == ("", [("f", {"a": 2}), ("g", {})])
    assert calls("json", '[{"name": "f", "arguments": {}}]') == ("", [("f", {})])
    openai_shape = {"tool_calls": [{"id": "c1", "type": "function",
                                    "function": {"name": "f", "arguments": "{}"}}]}
    assert calls("json", json.dumps(openai_shape)) == ("", [("f", {})])


@pytest.mark.parametrize("text", [
    '{"tool_calls": []}', '{"tool_calls": {"name": "f", "arguments": {}}}',
    '{"tool_calls": [{"name": "f", "arguments": {}}], "x": 1}',
    '{"name": "Bob", "age": 3}', '{"name": "f"}', '{"name": "f", "arguments": "nope"}',
    '{"name": "f", "arguments": "[1]"}', '{"name": "f b", "arguments": {}}',
    '```json\n{"name": "f", "arguments": {}}', 'x {"name": "f", "arguments": {}}',
    '{"name": "f", "arguments": {"a": Infinity}}', '{"name": "f", "arguments": {"a": 1' + "0" * 5000
    + "}}", DEEP_JSON, DEEP_ARGS, "x" * (2 << 20), *GARBAGE,
])
def test_json_malformed(text):
    unchanged("json", text)


def test_known_names_all_or_nothing():
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call>' \
           '<tool_call>{"name": "b", "arguments": {}}</tool_call>'
    assert len(PARSERS["hermes"].parse(text, known={"a", "b"})[1]) == 2
    assert PARSERS["hermes"].parse(text, known={"a"}) == (text, [])


def test_hostile_never_raises():
    samples = [DEEP_JSON, "{" * 100_000, "(" * 100_000, '"' * 1000, "\\" * 1000,
               '{"a": "' + "\\u" * 1000, "<tool_call>" * 10_000, "[TOOL_CALLS]" * 10_000,
               "functools[" * 10_000, "<|python_tag|>" * 10_000, "[f(x=" * 10_000]
    for parser in PARSERS.values():
        for text in samples:
            assert parser.parse(text) == (text, [])


# ----- could_start / start_index --------------------------------------------------------------

@pytest.mark.parametrize(("parser", "call"), [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'),
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {}}'),
    ("llama3_json", '{"name": "f", "parameters": {}}'),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {}}]'),
    ("pythonic", '[f(a=1)]'),
    ("pythonic", '<|python_start|>[f(a=1)]<|python_end|>'),
    ("phi4", 'functools[{"name": "f", "arguments": {}}]'),
    ("json", '{"tool_calls": [{"name": "f", "arguments": {}}]}'),
    ("json", '```json\n{"name": "f", "arguments": {}}\n```'),
])
def test_could_start_on_every_prefix(parser, call):
    p = PARSERS[parser]
    for i in range(len(call) + 1):
        assert p.could_start(call[:i]), call[:i]
    assert p.parse(call)[1]


@pytest.mark.parametrize("parser", list(PARSERS))
def test_could_start_false_for_prose(parser):
    assert not PARSERS[parser].could_start("Hello there")
    assert not PARSERS[parser].could_start("The answer is 42.")


def test_start_index():
    h = PARSERS["hermes"]
    assert h.start_index("Let me check.\n<tool_") == len("Let me check.\n")
    assert h.start_index("Let me check.\n<tool_call>{") == len("Let me check.\n")
    assert h.start_index("a < b") == len("a < b")
    assert h.start_index("a <") == 2
    j = PARSERS["json"]
    assert j.start_index('  {"to') == 0 and j.start_index("Hello") == 5


# ----- choose ---------------------------------------------------------------------------------

QWEN = ("{%- if tools %}...<tools>{{ tool | tojson }}</tools>... <tool_call>\\n{\"name\": "
        "<function-name>, \"arguments\": <args-json-object>}\\n</tool_call>")
LLAMA31 = "<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython\\n<|python_tag|>"
LLAMA32 = "{%- if tools is not none %}<|start_header_id|>user<|end_header_id|>Given tools"
MISTRAL = "{%- if message.tool_calls %}[TOOL_CALLS][{{ tool_calls | tojson }}]"
PHI4 = "<|tool|>{{ message['tools'] }}<|/tool|> ... functools"
PYTHONIC = "[func_name1(params_name1=params_value1, params_name2=params_value2...)]"
LLAMA32_PYTHONIC = "<|start_header_id|>system<|end_header_id|> tools " + PYTHONIC
SMOLLM2 = "{% for message in messages %}<|im_start|>{{ message['role'] }}{% endfor %}"


@pytest.mark.parametrize(("template", "name"), [
    (QWEN, "hermes"), (LLAMA31, "llama3_json"), (LLAMA32, "llama3_json"), (MISTRAL, "mistral"),
    (PHI4, "phi4"), (PYTHONIC, "pythonic"), (LLAMA32_PYTHONIC, "pythonic"), (SMOLLM2, "json"),
    ("", "json"),
])
def test_choose_by_template(template, name):
    assert choose(template).name == name


def test_choose_by_setting():
    assert choose(QWEN, "pythonic").name == "pythonic"
    for name in PARSERS:
        assert choose("", name) is PARSERS[name]
    with pytest.raises(ValueError, match="known: hermes, json, llama3_json, mistral, phi4"):
        choose(QWEN, "qwen")


# ----- constrained_schema ---------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def _valid(instance: Any, schema: Any) -> bool:
    """jsonschema when it is installed, else a small validator for the keywords
    constrained_schema uses."""
    try:
        import jsonschema
    except ImportError:
        return _mini_valid(instance, schema, schema)
    return jsonschema.Draft202012Validator(schema).is_valid(instance)


def _mini_valid(v: Any, s: Any, root: Any) -> bool:
    if "$ref" in s:  # local JSON pointers only
        target = root
        for part in s["$ref"].split("/")[1:]:
            target = target[part]
        return _mini_valid(v, target, root)
    kinds = {"object": dict, "array": list, "string": str, "integer": int}
    if "type" in s and not isinstance(v, kinds[s["type"]]):
        return False
    if "const" in s and v != s["const"]:
        return False
    if "anyOf" in s and not any(_mini_valid(v, sub, root) for sub in s["anyOf"]):
        return False
    if isinstance(v, dict):
        props = s.get("properties", {})
        if any(k not in v for k in s.get("required", [])):
            return False
        if s.get("additionalProperties") is False and set(v) - set(props):
            return False
        if not all(_mini_valid(v[k], props[k], root) for k in props if k in v):
            return False
    if isinstance(v, list):
        if len(v) < s.get("minItems", 0) or len(v) > s.get("maxItems", len(v)):
            return False
        if "items" in s and not all(_mini_valid(x, s["items"], root) for x in v):
            return False
    return True


def test_constrained_schema_required_and_forced():
    tools = check_tools([WEATHER, TIME])
    good = {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    two = {"tool_calls": [good["tool_calls"][0], {"name": "get_time", "arguments": {}}]}
    required = constrained_schema(tools, None, parallel=False)
    assert _valid(good, required) and not _valid(two, required)
    assert not _valid({"tool_calls": []}, required)
    assert not _valid({"tool_calls": [{"name": "nope", "arguments": {}}]}, required)
    assert not _valid({"tool_calls": [{"name": "get_weather", "arguments": {}}]}, required)
    assert _valid(two, constrained_schema(tools, None, parallel=True))
    forced = constrained_schema(tools, "get_time", parallel=False)
    assert _valid({"tool_calls": [{"name": "get_time", "arguments": {}}]}, forced)
    assert not _valid(good, forced)
    # what the schema admits, the json parser reads
    content, found = PARSERS["json"].parse(json.dumps(two))
    assert content == "" and [c.name for c in found] == ["get_weather", "get_time"]
    with pytest.raises(ValueError, match="not in tools"):
        constrained_schema(tools, "missing", parallel=False)
    with pytest.raises(ValueError):
        constrained_schema([], None, parallel=False)


def test_constrained_schema_moves_parameters_with_refs():
    tool = {"type": "function", "function": {"name": "book", "parameters": {
        "type": "object", "$defs": {"Date": {"type": "string"}},
        "properties": {"when": {"$ref": "#/$defs/Date"}, "next": {"$ref": "#"}}}}}
    schema = constrained_schema(check_tools([tool, TIME]), None, parallel=False)
    assert schema["$defs"]["book"]["properties"]["when"] == {"$ref": "#/$defs/book/$defs/Date"}
    assert schema["$defs"]["book"]["properties"]["next"] == {"$ref": "#/$defs/book"}
    assert tool["function"]["parameters"]["properties"]["when"] == {"$ref": "#/$defs/Date"}
    assert _valid({"tool_calls": [{"name": "book", "arguments": {"when": "today"}}]}, schema)
    assert not _valid({"tool_calls": [{"name": "book", "arguments": {"when": 3}}]}, schema)
    assert _valid({"tool_calls": [{"name": "get_time", "arguments": {}}]}, schema)


def test_constrained_schema_arguments_always_objects():
    schema = constrained_schema(check_tools([_fn(parameters={}), _fn(name="g", parameters={
        "properties": {"a": {"type": "string"}}})]), None, parallel=False)
    for option in schema["properties"]["tool_calls"]["items"]["anyOf"]:
        assert option["properties"]["arguments"]["type"] == "object"
    assert not _valid({"tool_calls": [{"name": "f", "arguments": 3}]}, schema)


# ----- check_tools ----------------------------------------------------------------------------

def test_check_tools_normalises():
    out = check_tools([WEATHER, TIME, {"type": "function", "function": {
        "name": "x-y_1", "description": "d", "strict": True, "parameters": None}}])
    assert out[0] == WEATHER
    assert out[1]["function"]["parameters"] == {"type": "object", "properties": {}}
    assert out[2]["function"] == {"name": "x-y_1", "description": "d", "strict": True,
                                  "parameters": {"type": "object", "properties": {}}}
    assert check_tools([]) == []


def _fn(**fn) -> dict:
    return {"type": "function", "function": {"name": "f", **fn}}


@pytest.mark.parametrize(("tools", "message"), [
    ("x", "tools must be a list"),
    ([3], r"tools\[0\] must be an object"),
    ([{"type": "code", "function": {"name": "f"}}], r'tools\[0\].type must be "function"'),
    ([{"type": "function"}], r"tools\[0\].function must be an object"),
    ([TIME, _fn(name="bad name")], r"tools\[1\].function.name must be"),
    ([_fn(name="a" * 65)], "function.name must be"),
    ([_fn(name=7)], "function.name must be"),
    ([TIME, TIME], r"tools\[1\].function.name 'get_time' repeats tools\[0\]"),
    ([_fn(description=1)], "description must be a string"),
    ([_fn(parameters=[])], "parameters must be an object"),
    ([_fn(parameters={"type": "string"})], 'parameters.type must be "object"'),
    ([_fn(parameters={"type": "object", "properties": {"a": {"type": "strin"}}})],
     r"tools\[0\].function.parameters"),
    ([_fn(parameters={"type": "object", "required": "a"})], r"tools\[0\].function.parameters"),
    ([_fn(parameters={"type": "object", "properties": []})], r"tools\[0\].function.parameters"),
    ([_fn(parameters={"type": "object", "properties": {"a": {"minLength": -1}}})],
     r"tools\[0\].function.parameters"),
    ([_fn(parameters=json.loads('{"type": "object", "properties": {"a": ' * 40 + "{}"
                                + "}}" * 40))], "nested"),
    ([_fn(strict="yes")], "strict must be true or false"),
])
def test_check_tools_refuses(tools, message):
    with pytest.raises(ValueError, match=message):
        check_tools(tools)


@pytest.mark.parametrize("schema", [
    {"type": ["string", "string"]}, {"type": []}, {"enum": "a"}, {"anyOf": []},
    {"items": 3}, {"pattern": "("}, {"patternProperties": {"(": {}}}, {"maximum": "1"},
    {"multipleOf": 0}, {"maxItems": True}, {"description": 1}, {"uniqueItems": 1},
    {"properties": {"a": {"properties": {"b": {"type": "nope"}}}}}, 5,
])
def test_schema_basics_refuse(schema):
    with pytest.raises(ValueError):
        basics(schema)


def test_schema_basics_accept():
    basics({"type": "object", "properties": {
        "a": {"type": ["string", "null"], "enum": ["x", None], "maxLength": 3},
        "b": {"type": "array", "items": {"anyOf": [{"type": "integer", "minimum": 0},
                                                   {"$ref": "#/$defs/c"}]}},
        "c": True}, "$defs": {"c": {"type": "boolean"}}, "required": ["a"],
        "additionalProperties": False})


# ----- reasoning ------------------------------------------------------------------------------

def _whole(text: str, **kw) -> tuple[str, str]:
    s = ThinkSplitter(**kw)
    r1, c1 = s.feed(text)
    r2, c2 = s.flush()
    return r1 + r2, c1 + c2


def _by_char(text: str, **kw) -> tuple[str, str]:
    s = ThinkSplitter(**kw)
    parts = [s.feed(ch) for ch in text] + [s.flush()]
    return "".join(r for r, _ in parts), "".join(c for _, c in parts)


CASES = [
    ("<think>\nLet me think.\n</think>\n\nThe answer.", {}, ("Let me think.", "The answer.")),
    ("  <think>a < b </th is not </think>x</think>", {}, ("a < b </th is not", "x</think>")),
    ("<think></think>Hi", {}, ("", "Hi")),
    ("No reasoning here <think>x</think>", {}, ("", "No reasoning here <think>x</think>")),
    ("<thin", {}, ("", "<thin")),
    ("<think>unfinished </thi", {}, ("unfinished </thi", "")),
    ("Plan.\n</think>\n\nAnswer", {"in_reasoning": True}, ("Plan.", "Answer")),
    ("<think>Plan.</think>Answer", {"in_reasoning": True}, ("Plan.", "Answer")),
    ("only reasoning, no end", {"in_reasoning": True}, ("only reasoning, no end", "")),
    ("\n\n", {"in_reasoning": True}, ("", "")),
    ("", {}, ("", "")),
    ("[R]a[/R]b", {"start": "[R]", "end": "[/R]"}, ("a", "b")),
]


@pytest.mark.parametrize(("text", "kw", "expected"), CASES)
def test_think_splitter(text, kw, expected):
    assert _whole(text, **kw) == expected
    assert _by_char(text, **kw) == expected


def test_think_splitter_chunks_split_tags_and_never_emit_tag_parts():
    text = "<think>ab  </think>  cd"
    for cut in range(len(text) + 1):
        s = ThinkSplitter()
        r1, c1 = s.feed(text[:cut])
        r2, c2 = s.feed(text[cut:])
        r3, c3 = s.flush()
        assert (r1 + r2 + r3, c1 + c2 + c3) == ("ab", "cd")
        for piece in (r1, c1, r2, c2):
            assert "<" not in piece and ">" not in piece
    s = ThinkSplitter()
    assert s.feed("<think>abc</th") == ("abc", "")
    assert s.feed("ink>d") == ("", "d")


def test_reasoning_helpers():
    assert uses_reasoning("... <think>\\n ...") and uses_reasoning("{% if enable_thinking %}")
    assert not uses_reasoning(SMOLLM2)
    assert opens_in_prompt("<|im_start|>assistant\n<think>\n")
    assert not opens_in_prompt("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not opens_in_prompt("<|im_start|>assistant\n")
