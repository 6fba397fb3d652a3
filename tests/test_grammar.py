"""The structured-output guard (ovms_plugin/service/grammar.py): what it lets through comes
back canonical, what XGrammar cannot compile (or would ignore, or compiles too slowly) is
refused with the place in the schema named; and, on the real engine, everything the guard
accepts compiles and runs through a ContinuousBatchingPipeline."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ovms_plugin import devmodels
from ovms_plugin.service.grammar import (
    JSON_OBJECT_SCHEMA,
    MAX_DEPTH,
    GrammarError,
    check_json_schema,
    check_regex,
)

S = {"type": "string"}
I = {"type": "integer"}  # noqa: E741

GOOD_SCHEMAS: list[Any] = [
    True,
    {},
    {"type": "object"},
    {"type": ["string", "null"]},
    {"type": "object", "title": "Person", "description": "d", "$schema":
     "https://json-schema.org/draft/2020-12/schema", "x-order": 1,
     "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 64},
                    "age": {"type": "integer", "minimum": 0, "maximum": 150},
                    "tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3,
                             "uniqueItems": True},
                    "unit": {"enum": ["c", "f"]}, "id": {"type": "string", "format": "uuid"},
                    "code": {"type": "string", "pattern": "^[A-Z]{3}-\\d{2}$"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"$defs": {"node": {"type": "object", "properties": {
        "v": I, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["v"]}}, "$ref": "#/$defs/node"},
    {"definitions": {"x": I}, "type": "object", "properties": {"a": {"$ref": "#/definitions/x"}}},
    {"anyOf": [S, I]},
    {"oneOf": [{"const": "a"}, {"type": "null"}]},
    {"allOf": [{"type": "object", "properties": {"a": S}}]},
    {"type": "array", "prefixItems": [S, I], "items": False},
    {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 15},
    {"type": "object", "patternProperties": {"^x_[a-z]+$": I}, "propertyNames":
     {"pattern": "^x_"}, "minProperties": 1, "maxProperties": 2},
    {"type": "object", "properties": {"a": True}, "unevaluatedProperties": False},
    {"const": {"k": [1, None, "é\"\\"]}},
]

# (schema, a piece of the message: the path and/or the keyword)
BAD_SCHEMAS: list[tuple[Any, str]] = [
    ("not json", "not valid JSON"),
    ('{"type":"object"} x', "not valid JSON"),
    ('{"type":"number","minimum":NaN}', "NaN"),
    ('{"type":"number","minimum":1e999}', "minimum: numbers in a schema must be finite"),
    ('{"type":"string","type":"integer"}', "twice"),
    ([], "must be a JSON object"),
    (False, "accepts no value"),
    ({"type": "objectx"}, "type: unknown type 'objectx'"),
    ({"type": []}, "type: type must name"),
    ({"properties": {"a": {"type": ["string", 3]}}}, "properties.a.type: unknown type 3"),
    ({"type": "object", "properties": {"age": {"type": "integer", "minimum": 1.5}}},
     "properties.age.minimum: minimum of an integer must be a whole number"),
    ({"type": "integer", "maximum": -(10**30)}, "maximum: maximum of an integer"),
    ({"type": "integer", "minimum": "3"}, "minimum: minimum must be a number"),
    ({"type": "number", "minimum": 0, "exclusiveMinimum": True}, "exclusiveMinimum: "),
    ({"type": "integer", "minimum": 7, "maximum": 1}, "minimum: minimum (7) is greater"),
    ({"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 1}, "leave no value"),
    ({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1.5},
     'exclusiveMinimum: exclusiveMinimum on a "number" is not enforced'),
    ({"type": "object", "properties": {"p": {"type": ["number", "null"], "maximum": 1}}},
     "properties.p.maximum: maximum on a"),
    ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems: minItems (3)"),
    ({"type": "array", "minItems": 1.5}, "minItems: minItems must be a non-negative"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength: minLength (5)"),
    ({"type": "string", "maxLength": 300}, "maxLength: maxLength above 64"),
    ({"type": "object", "properties": [1]}, "properties: properties must be an object"),
    ({"type": "object", "required": "a"}, "required: required must be a list"),
    ({"type": "object", "properties": {"a": False}}, "properties.a: the schema false"),
    ({"type": "object", "properties": {'a"b': S}}, 'properties."a\\"b": property names'),
    ({"type": "array", "items": [S, I]}, "items: items as a list"),
    ({"enum": []}, "enum: enum must be a non-empty list"),
    ({"enum": list(range(1001))}, "enum: enum has 1001 values"),
    ({"anyOf": []}, "anyOf: anyOf must be a non-empty"),
    ({"oneOf": []}, "oneOf: oneOf must be a non-empty"),
    ({"allOf": [S, I]}, "allOf: allOf is supported with exactly one"),
    ({"type": "object", "properties": {"a": {"not": S}}}, "properties.a.not: the keyword 'not'"),
    ({"if": S, "then": S, "else": I}, "if: the keyword 'if'"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired: the keyword"),
    ({"type": "array", "contains": I, "minContains": 2}, "contains: the keyword 'contains'"),
    ({"type": "string", "nullable": True}, "nullable: the keyword 'nullable'"),
    ({"type": "string", "strict": True}, "strict: unknown keyword 'strict'"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}},
     "properties.a.$ref: $ref '#/$defs/nope' does not resolve"),
    ({"type": "object", "properties": {"a": {"$ref": "http://example.com/s.json"}}},
     "properties.a.$ref: $ref 'http://example.com/s.json' is not supported"),
    ({"type": "object", "properties": {"a": {"$ref": "other.json#/x"}}}, "is not supported"),
    ({"$defs": {"a/b": I}, "properties": {"x": {"$ref": "#/$defs/a~1b"}}}, "pointer escapes"),
    ({"type": "array", "prefixItems": [I, {"$ref": "#/prefixItems/0"}]},
     "prefixItems[1].$ref: $ref '#/prefixItems/0': #/prefixItems is not an object"),
    ({"properties": {"a": {"$ref": 3}}}, "properties.a.$ref: $ref must be a string"),
    ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "loops through $refs"),
    ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
     "loops through $refs"),
    ({"$defs": {"bad": {"type": "objectx"}}, "type": "string"}, "$defs.bad.type"),
    ({"type": "string", "pattern": "^(?=a)a+$"}, "pattern: lookahead"),
    ({"type": "string", "pattern": "^(a)\\1$"}, "pattern: \\1"),
    ({"type": "string", "pattern": "((("}, "pattern: invalid regex"),
    ({"type": "string", "pattern": '^a"b$'}, "pattern: a pattern that matches '\"'"),
    ({"type": "object", "patternProperties": {"(?i)x": I}}, "patternProperties"),
]


def _nested(depth: int) -> dict[str, Any]:
    s: dict[str, Any] = I
    for _ in range(depth):
        s = {"type": "array", "items": s}
    return s


@pytest.mark.parametrize("schema", GOOD_SCHEMAS, ids=range(len(GOOD_SCHEMAS)))
def test_good_schema_comes_back_canonical(schema: Any) -> None:
    text = check_json_schema(schema)
    assert text == json.dumps({} if schema is True else schema, ensure_ascii=False,
                              separators=(",", ":"))
    assert check_json_schema(text) == text  # the text form too, and a fixed point


def test_json_object_schema() -> None:
    assert check_json_schema(JSON_OBJECT_SCHEMA) == JSON_OBJECT_SCHEMA
    assert json.loads(JSON_OBJECT_SCHEMA) == {"type": "object"}


@pytest.mark.parametrize(("schema", "where"), BAD_SCHEMAS, ids=range(len(BAD_SCHEMAS)))
def test_bad_schema_is_refused_with_its_path(schema: Any, where: str) -> None:
    with pytest.raises(GrammarError) as e:
        check_json_schema(schema)
    assert isinstance(e.value, ValueError)
    assert where in str(e.value)


def test_depth_and_size_caps() -> None:
    check_json_schema(_nested(MAX_DEPTH))
    with pytest.raises(GrammarError, match="nested too deeply"):
        check_json_schema(_nested(MAX_DEPTH + 1))
    # deeper than Python's own recursion limit: refused, not a RecursionError
    deep = '{"items":' * 3000 + "{}" + "}" * 3000
    with pytest.raises(GrammarError, match="nested too deeply"):
        check_json_schema(deep)
    deep_value: Any = {}
    for _ in range(5000):
        deep_value = {"a": deep_value}
    with pytest.raises(GrammarError, match="nested too deeply"):
        check_json_schema({"type": "object", "default": deep_value})
    with pytest.raises(GrammarError, match="characters long"):
        check_json_schema({"const": "x" * 70000})
    with pytest.raises(GrammarError, match="at most 200"):
        check_json_schema({"type": "object", "properties": {f"p{i}": I for i in range(201)}})


def test_lone_surrogate_refused() -> None:
    with pytest.raises(GrammarError, match="surrogate"):
        check_json_schema('{"enum": ["\\ud800"]}')


GOOD_REGEXES = ["abc", "[a-z]+", "\\d{4}-\\d{2}-\\d{2}", "(cat|dog)s?", "^abc$", "(?:ab){2,5}",
                "a+?b", "\\u00e9+", "\\x41", "é日本", "[\\]\\-\\\\]+", ".{0,8}", "a{256}"]
BAD_REGEXES = [
    ("", "empty"), ("(((", "invalid regex"), ("[", "invalid regex"), (3, "must be a string"),
    ("(?=a)a", "lookahead"), ("(?!a)b", "negative lookahead"), ("(?<=a)b", "lookbehind"),
    ("(a)\\1", "backreference"), ("(?P<n>a)", "named group"), ("(?P<n>a)(?P=n)", "named"),
    ("(?i)abc", "inline flag"), ("(?>a)", "atomic"), ("a(?#c)b", "comment"),
    ("\\bab", "\\b"), ("a\\Bb", "\\B"), ("\\Aabc\\Z", "\\A"), ("a^b", "'^' not at the start"),
    ("a$b", "'$' not at the end"), ("a*+", "possessive"), ("a{,5}", "'{'"), ("a{", "'{'"),
    ("a{x}", "'{'"), ("a|", "empty alternative"), ("|", "empty alternative"),
    ("(a|)", "empty alternative"), ("()", "empty group"), ("[]a]", "']' first"),
    ("\\101", "octal"), ("a{1000}", "repetition count above 256"), ("x" * 5000, "characters"),
]


@pytest.mark.parametrize("pattern", GOOD_REGEXES)
def test_good_regex(pattern: str) -> None:
    assert check_regex(pattern) == pattern


@pytest.mark.parametrize(("pattern", "what"), BAD_REGEXES, ids=range(len(BAD_REGEXES)))
def test_bad_regex_refused(pattern: Any, what: str) -> None:
    with pytest.raises(GrammarError) as e:
        check_regex(pattern)
    assert what in str(e.value)


def test_grammar_module_needs_no_openvino() -> None:
    code = ("import sys; sys.modules['openvino'] = None; sys.modules['openvino_genai'] = None; "
            "import ovms_plugin.service.grammar as g; print(g.check_json_schema(True))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "{}"


# --- on the real engine -------------------------------------------------------------------

# Everything the guard accepts, of these, must compile and run; a failure would break the
# pipeline for the cases after it, so they all share one pipeline and each is checked.
_ENGINE_SCRIPT = r"""
import json, sys
import openvino_genai as g
model, cases = sys.argv[1], json.load(sys.stdin)
sc = g.SchedulerConfig(); sc.cache_size = 1
pipe = g.ContinuousBatchingPipeline(model, sc, "CPU", {})
tok = pipe.get_tokenizer()
ids = tok.encode("Reply in JSON:", add_special_tokens=False).input_ids
for n, (kind, spec) in enumerate(cases):
    gc = g.GenerationConfig(max_new_tokens=8)
    so = g.StructuredOutputConfig(); setattr(so, kind, spec); gc.structured_output_config = so
    h0 = pipe.add_request(2 * n, ids, g.GenerationConfig(max_new_tokens=2))
    h = pipe.add_request(2 * n + 1, ids, gc)
    while pipe.has_non_finished_requests():
        pipe.step()
    out = h.read_all(); h0.read_all()
    print(json.dumps([kind, spec, str(h.get_status()), tok.decode(out[0].generated_ids)]),
          flush=True)
"""


@pytest.mark.slow
def test_everything_the_guard_accepts_runs_on_the_engine(
        test_models: dict[str, Path]) -> None:
    candidates: list[tuple[str, Any]] = [("json_schema", s) for s in GOOD_SCHEMAS]
    candidates += [("json_schema", s) for s, _ in BAD_SCHEMAS]
    candidates += [("json_schema", {"type": "string", "pattern": p}) for p in GOOD_REGEXES]
    candidates += [("regex", p) for p in GOOD_REGEXES]
    candidates += [("regex", p) for p, _ in BAD_REGEXES]
    accepted: list[tuple[str, str]] = []
    for kind, spec in candidates:
        with contextlib.suppress(GrammarError):
            accepted.append((kind, check_json_schema(spec) if kind == "json_schema"
                             else check_regex(spec)))
    assert len(accepted) >= len(GOOD_SCHEMAS) + 2 * len(GOOD_REGEXES) - 1
    model = test_models[devmodels.SMOLLM2]
    proc = subprocess.run([sys.executable, "-c", _ENGINE_SCRIPT, str(model)],
                          input=json.dumps(accepted), capture_output=True, text=True,
                          timeout=240)
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("[")]
    done = len(lines)
    failing = accepted[done] if done < len(accepted) else None
    assert proc.returncode == 0 and done == len(accepted), (
        f"{done} of {len(accepted)} ran; the next one, {failing}, failed: "
        f"{proc.stderr[-1500:]}")
    for kind, spec, status, _text in lines:
        assert status == "GenerationStatus.FINISHED", (kind, spec, status)
