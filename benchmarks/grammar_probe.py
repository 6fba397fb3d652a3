"""Which JSON schemas and regexes can XGrammar (inside openvino_genai's
StructuredOutputConfig) compile? Not a CI test: a measurement, to decide what
ovms_plugin/service/grammar.py lets through.

    python benchmarks/grammar_probe.py [--model DIR] [--jobs 2] [--only SUBSTRING]

A grammar XGrammar cannot compile does not fail at add_request: it raises inside
ContinuousBatchingPipeline.step(), and the pipeline is broken for good afterwards. So every
case runs in a fresh subprocess with a pipeline of its own (SmolLM2-135M-Instruct,
cache_size=1, one inference thread): an unconstrained request and the constrained one are
added together, then step() runs until both are done (greedy, max_new_tokens 8); then one
more unconstrained request checks that the pipeline still works. Outcome per case:

- accepted: both requests finished and the pipeline still works (the output's text kept);
- refused: add_request or step() raised (the first line of the message kept), or the
  pipeline was broken afterwards;
- crashed: the process died (signal, abort) or ran over the per-case timeout (60 s).

The time of the first step() (where the grammar is compiled) is recorded for the accepted
cases, to size the guard's caps. Writes benchmarks/grammar_probe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("grammar_probe.json")
DEFAULT_MODEL = Path.home() / ".cache" / "ovms-plugin" / "test-models" / "smollm2-v1"
TIMEOUT_S = 60


def _nest_objects(depth: int) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        s = {"type": "object", "properties": {"a": s}, "required": ["a"]}
    return s


def _nest_arrays(depth: int) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        s = {"type": "array", "items": s}
    return s


def _obj(**props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props)}


S = {"type": "string"}
I = {"type": "integer"}  # noqa: E741
N = {"type": "number"}

# (name, schema): a schema is a Python value serialised with json.dumps, or raw text (str).
SCHEMAS: list[tuple[str, Any]] = [
    # --- the text itself
    ("text/not json", "not json"),
    ("text/empty", ""),
    ("text/array", "[]"),
    ("text/number", "1"),
    ("text/null", "null"),
    ("text/string", '"x"'),
    ("text/true", "true"),
    ("text/false", "false"),
    ("text/trailing garbage", '{"type":"object"} x'),
    ("text/infinity minimum", '{"type":"number","minimum":1e999}'),
    ("text/NaN", '{"type":"number","minimum":NaN}'),
    ("text/duplicate keys", '{"type":"string","type":"integer"}'),
    # --- type
    ("type/empty schema {}", {}),
    ("type/object", {"type": "object"}),
    ("type/string", S),
    ("type/integer", I),
    ("type/number", N),
    ("type/boolean", {"type": "boolean"}),
    ("type/null", {"type": "null"}),
    ("type/array", {"type": "array"}),
    ("type/list of types", {"type": ["string", "null"]}),
    ("type/list of all types", {"type": ["string", "integer", "number", "boolean", "null",
                                         "object", "array"]}),
    ("type/empty list", {"type": []}),
    ("type/unknown objectx", {"type": "objectx"}),
    ("type/not a string", {"type": 3}),
    ("type/list with unknown", {"type": ["string", "foo"]}),
    ("type/absent, properties only", {"properties": {"a": S}, "required": ["a"]}),
    ("type/absent, items only", {"items": I}),
    ("type/absent, minimum only", {"minimum": 3}),
    # --- object
    ("object/properties+required", _obj(a=S, b=I)),
    ("object/required missing from properties", {"type": "object", "properties": {"a": S},
                                                 "required": ["b"]}),
    ("object/required missing, additionalProperties false",
     {"type": "object", "properties": {"a": S}, "required": ["b"],
      "additionalProperties": False}),
    ("object/additionalProperties false", {**_obj(a=S), "additionalProperties": False}),
    ("object/additionalProperties true", {**_obj(a=S), "additionalProperties": True}),
    ("object/additionalProperties schema", {"type": "object", "additionalProperties": I}),
    ("object/unevaluatedProperties false", {**_obj(a=S), "unevaluatedProperties": False}),
    ("object/minProperties maxProperties", {"type": "object", "additionalProperties": I,
                                            "minProperties": 1, "maxProperties": 2}),
    ("object/patternProperties", {"type": "object", "patternProperties": {"^x_": I}}),
    ("object/propertyNames", {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}}),
    ("object/dependentRequired", {"type": "object", "properties": {"a": S, "b": S},
                                  "dependentRequired": {"a": ["b"]}}),
    ("object/dependentSchemas", {"type": "object", "properties": {"a": S},
                                 "dependentSchemas": {"a": {"required": ["a"]}}}),
    ("object/properties not an object", {"type": "object", "properties": [1]}),
    ("object/required not a list", {"type": "object", "properties": {"a": S},
                                    "required": "a"}),
    ("object/property name with quotes", _obj(**{'a"b\\c': S})),
    ("object/property name unicode", _obj(**{"héllo 日本": S})),
    ("object/property name empty", _obj(**{"": S})),
    ("object/200 properties", _obj(**{f"p{i}": I for i in range(200)})),
    ("object/property schema true", {"type": "object", "properties": {"a": True},
                                     "required": ["a"]}),
    ("object/property schema false", {"type": "object", "properties": {"a": False}}),
    ("object/property schema false required", {"type": "object", "properties": {"a": False},
                                               "required": ["a"]}),
    # --- array
    ("array/items", {"type": "array", "items": S}),
    ("array/items list (draft 4)", {"type": "array", "items": [S, I]}),
    ("array/prefixItems", {"type": "array", "prefixItems": [S, I]}),
    ("array/prefixItems items false", {"type": "array", "prefixItems": [S, I],
                                       "items": False}),
    ("array/items false", {"type": "array", "items": False}),
    ("array/minItems maxItems", {"type": "array", "items": I, "minItems": 1, "maxItems": 3}),
    ("array/minItems > maxItems", {"type": "array", "items": I, "minItems": 3,
                                   "maxItems": 1}),
    ("array/minItems 1000", {"type": "array", "items": I, "minItems": 1000}),
    ("array/maxItems 1000", {"type": "array", "items": I, "maxItems": 1000}),
    ("array/maxItems 1e9", {"type": "array", "items": I, "maxItems": 1000000000}),
    ("array/minItems negative", {"type": "array", "items": I, "minItems": -1}),
    ("array/minItems float", {"type": "array", "items": I, "minItems": 1.5}),
    ("array/uniqueItems", {"type": "array", "items": I, "uniqueItems": True}),
    ("array/contains", {"type": "array", "contains": I}),
    ("array/minContains", {"type": "array", "contains": I, "minContains": 2}),
    ("array/unevaluatedItems", {"type": "array", "prefixItems": [S],
                                "unevaluatedItems": False}),
    # --- string
    ("string/minLength maxLength", {"type": "string", "minLength": 2, "maxLength": 5}),
    ("string/minLength > maxLength", {"type": "string", "minLength": 5, "maxLength": 2}),
    ("string/maxLength 10000", {"type": "string", "maxLength": 10000}),
    ("string/minLength 10000", {"type": "string", "minLength": 10000}),
    ("string/maxLength 1e9", {"type": "string", "maxLength": 1000000000}),
    ("string/pattern", {"type": "string", "pattern": "^[a-z]{2,4}$"}),
    ("string/pattern unanchored", {"type": "string", "pattern": "[0-9]+"}),
    ("string/pattern lookahead", {"type": "string", "pattern": "^(?=a)a+$"}),
    ("string/pattern backref", {"type": "string", "pattern": "^(a)\\1$"}),
    ("string/pattern broken", {"type": "string", "pattern": "((("}),
    ("string/pattern with quote", {"type": "string", "pattern": '^a"b$'}),
    ("string/pattern + minLength", {"type": "string", "pattern": "^[a-z]+$",
                                    "minLength": 3}),
    ("string/pattern dot", {"type": "string", "pattern": "^.{3,8}$"}),
    ("string/pattern negated class", {"type": "string", "pattern": "^[^a]{3,8}$"}),
    ("string/pattern backslash", {"type": "string", "pattern": "^a\\\\b$"}),
    ("string/pattern unicode escape", {"type": "string", "pattern": "^\\u00e9+$"}),
    ("string/maxLength 64", {"type": "string", "maxLength": 64}),
    ("string/maxLength 128", {"type": "string", "maxLength": 128}),
    ("string/maxLength 300", {"type": "string", "maxLength": 300}),
    ("string/maxLength 1000", {"type": "string", "maxLength": 1000}),
    ("string/maxLength 3000", {"type": "string", "maxLength": 3000}),
    ("string/minLength 1000", {"type": "string", "minLength": 1000}),
    ("string/pattern {1000}", {"type": "string", "pattern": "^a{1000}$"}),
    ("string/contentMediaType", {"type": "string", "contentMediaType": "application/json"}),
    ("string/contentEncoding", {"type": "string", "contentEncoding": "base64"}),
]
for fmt in ["date", "time", "date-time", "duration", "email", "idn-email", "hostname",
            "idn-hostname", "ipv4", "ipv6", "uuid", "uri", "uri-reference", "iri",
            "iri-reference", "uri-template", "json-pointer", "relative-json-pointer", "regex",
            "foo"]:
    SCHEMAS.append((f"format/{fmt}", {"type": "string", "format": fmt}))
SCHEMAS += [
    ("format/on integer", {"type": "integer", "format": "int32"}),
    ("format/pattern + format", {"type": "string", "format": "email", "pattern": "^a"}),
    # --- numbers
    ("number/integer min max", {"type": "integer", "minimum": 1, "maximum": 7}),
    ("number/integer min > max", {"type": "integer", "minimum": 7, "maximum": 1}),
    ("number/integer exclusive", {"type": "integer", "exclusiveMinimum": 0,
                                  "exclusiveMaximum": 10}),
    ("number/integer exclusive empty", {"type": "integer", "exclusiveMinimum": 0,
                                        "exclusiveMaximum": 1}),
    ("number/integer fractional bounds", {"type": "integer", "minimum": 1.5,
                                          "maximum": 3.5}),
    ("number/integer min 1e30", {"type": "integer", "minimum": 10**30}),
    ("number/integer max -1e30", {"type": "integer", "maximum": -(10**30)}),
    ("number/integer int64 edge", {"type": "integer", "minimum": -(2**63),
                                   "maximum": 2**63 - 1}),
    ("number/integer wide range", {"type": "integer", "minimum": -123456789,
                                   "maximum": 987654321}),
    ("number/number min max", {"type": "number", "minimum": -1.5, "maximum": 2.25}),
    ("number/number exclusive", {"type": "number", "exclusiveMinimum": 0,
                                 "exclusiveMaximum": 1}),
    ("number/number min 1e300", {"type": "number", "minimum": 1e300}),
    ("number/exclusiveMinimum bool (draft 4)", {"type": "number", "minimum": 0,
                                                "exclusiveMinimum": True}),
    ("number/multipleOf", {"type": "integer", "multipleOf": 5}),
    ("number/multipleOf float", {"type": "number", "multipleOf": 0.5}),
    ("number/minimum as string", {"type": "integer", "minimum": "3"}),
    # --- enum / const
    ("enum/strings", {"enum": ["red", "green", "blue"]}),
    ("enum/mixed", {"enum": ["a", 1, 2.5, True, None, {"k": [1]}, [1, 2]]}),
    ("enum/with type", {"type": "string", "enum": ["a", "b"]}),
    ("enum/type mismatch", {"type": "integer", "enum": ["a", "b"]}),
    ("enum/empty", {"enum": []}),
    ("enum/not a list", {"enum": "abc"}),
    ("enum/1000 strings", {"enum": [f"value-{i}" for i in range(1000)]}),
    ("enum/10000 strings", {"enum": [f"value-{i}" for i in range(10000)]}),
    ("enum/unicode and escapes", {"enum": ["é", "日本", "a\"b", "\\", "\n", "\u0000"]}),
    ("const/string", {"const": "hello"}),
    ("const/object", {"const": {"a": [1, None, "x"]}}),
    ("const/null", {"const": None}),
    ("const/10k string", {"const": "x" * 10000}),
    ("const/with other type", {"type": "integer", "const": "a"}),
    # --- composition
    ("anyOf/two", {"anyOf": [S, I]}),
    ("anyOf/one", {"anyOf": [S]}),
    ("anyOf/empty", {"anyOf": []}),
    ("anyOf/with sibling type", {"type": "object", "anyOf": [_obj(a=S), _obj(b=I)]}),
    ("anyOf/with sibling properties", {"type": "object", "properties": {"c": S},
                                       "anyOf": [_obj(a=S), _obj(b=I)]}),
    ("oneOf/two", {"oneOf": [S, I]}),
    ("oneOf/empty", {"oneOf": []}),
    ("allOf/one", {"allOf": [_obj(a=S)]}),
    ("allOf/two objects", {"allOf": [_obj(a=S), _obj(b=I)]}),
    ("allOf/two conflicting", {"allOf": [S, I]}),
    ("allOf/empty", {"allOf": []}),
    ("allOf/with sibling", {"type": "object", "properties": {"c": S}, "allOf": [_obj(a=S)]}),
    ("not", {"not": S}),
    ("not/inside property", {"type": "object", "properties": {"a": {"not": S}}}),
    ("if/then/else", {"if": S, "then": {"minLength": 1}, "else": I}),
    ("if only", {"type": "string", "if": {"minLength": 2}}),
    # --- $ref
    ("ref/$defs", {"$defs": {"x": _obj(a=S)}, "$ref": "#/$defs/x"}),
    ("ref/definitions", {"definitions": {"x": _obj(a=S)}, "$ref": "#/definitions/x"}),
    ("ref/$defs in property", {"type": "object", "properties": {"p": {"$ref": "#/$defs/x"}},
                               "required": ["p"], "$defs": {"x": I}}),
    ("ref/recursive (tree)", {"$defs": {"node": {
        "type": "object", "properties": {"v": I, "kids": {"type": "array",
                                                          "items": {"$ref": "#/$defs/node"}}},
        "required": ["v"]}}, "$ref": "#/$defs/node"}),
    ("ref/root #", {"type": "object", "properties": {"next": {"$ref": "#"}}}),
    ("ref/root # required (infinite)", {"type": "object", "properties": {"next": {"$ref": "#"}},
                                        "required": ["next"]}),
    ("ref/self loop", {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}),
    ("ref/two-step loop", {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
                           "$ref": "#/$defs/a"}),
    ("ref/unused $defs entry broken", {"$defs": {"bad": {"type": "objectx"}}, "type": "string"}),
    ("ref/self loop, required property", {"$defs": {"a": {"$ref": "#/$defs/a"}},
                                          "type": "object", "properties": {
                                              "x": {"$ref": "#/$defs/a"}}, "required": ["x"]}),
    ("ref/missing", {"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}),
    ("ref/missing #/nope", {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}),
    ("ref/remote http", {"type": "object", "properties": {
        "a": {"$ref": "http://example.com/schema.json"}}}),
    ("ref/relative file", {"type": "object", "properties": {"a": {"$ref": "other.json#/x"}}}),
    ("ref/to properties", {"type": "object", "properties": {"a": I, "b": {
        "$ref": "#/properties/a"}}, "required": ["a", "b"]}),
    ("ref/pointer escapes", {"$defs": {"a/b": I, "c~d": S},
                             "type": "object", "properties": {
                                 "x": {"$ref": "#/$defs/a~1b"}, "y": {"$ref": "#/$defs/c~0d"}},
                             "required": ["x", "y"]}),
    ("ref/percent-encoded", {"$defs": {"a b": I}, "type": "object",
                             "properties": {"x": {"$ref": "#/$defs/a%20b"}}, "required": ["x"]}),
    ("ref/anchor", {"$defs": {"a": {"$anchor": "foo", "type": "integer"}},
                    "type": "object", "properties": {"x": {"$ref": "#foo"}}}),
    ("ref/into items index", {"type": "array", "prefixItems": [I, {"$ref": "#/prefixItems/0"}]}),
    ("ref/with siblings", {"$defs": {"x": _obj(a=S)}, "$ref": "#/$defs/x",
                           "description": "d"}),
    ("ref/not a string", {"type": "object", "properties": {"a": {"$ref": 3}}}),
    ("ref/$dynamicRef", {"$dynamicAnchor": "n", "type": "object",
                         "properties": {"a": {"$dynamicRef": "#n"}}}),
    # --- booleans, annotations, unknown keywords
    ("bool/true", True),
    ("bool/false", False),
    ("annot/title description default examples",
     {"type": "object", "title": "T", "description": "D", "default": {}, "examples": [{}],
      "properties": {"a": {"type": "string", "title": "A", "default": "x",
                           "examples": ["y"], "deprecated": True, "readOnly": True}}}),
    ("annot/$schema $id $comment", {"$schema": "https://json-schema.org/draft/2020-12/schema",
                                    "$id": "https://example.com/x", "$comment": "c",
                                    "type": "string"}),
    ("annot/$schema draft-07", {"$schema": "http://json-schema.org/draft-07/schema#",
                                "type": "string"}),
    ("unknown/x-foo", {"type": "string", "x-foo": {"bar": 1}}),
    ("unknown/nullable (OpenAPI)", {"type": "string", "nullable": True}),
    ("unknown/strict", {"type": "object", "strict": True, "properties": {"a": S}}),
    # --- size and depth
    ("depth/objects 32", _nest_objects(32)),
    ("depth/objects 50", _nest_objects(50)),
    ("depth/objects 200", _nest_objects(200)),
    ("depth/arrays 50", _nest_arrays(50)),
    ("depth/arrays 100", _nest_arrays(100)),
    ("depth/arrays 200", _nest_arrays(200)),
    ("depth/arrays 1000", '{"type":"array","items":' * 1000 + '{"type":"integer"}' + "}" * 1000),
    ("size/500 properties", {"type": "object", "properties": {f"p{i}": I
                                                              for i in range(500)}}),
    ("size/2000 properties", {"type": "object", "properties": {f"p{i}": I
                                                               for i in range(2000)}}),
    ("size/enum 3000 strings", {"enum": [f"value-{i}" for i in range(3000)]}),
    ("size/anyOf 500 objects", {"anyOf": [_obj(**{f"k{i}": I}) for i in range(500)]}),
    # --- what the plugin hands over today
    ("plugin/json_object", {"type": "object"}),
    ("plugin/openai strict-style", {
        "type": "object", "properties": {"name": S, "age": {"type": ["integer", "null"]},
                                         "tags": {"type": "array", "items": S}},
        "required": ["name", "age", "tags"], "additionalProperties": False}),
]

REGEXES: list[tuple[str, str]] = [
    ("plain", "abc"),
    ("empty", ""),
    ("dot", "."),
    ("dot star", ".*"),
    ("class", "[a-z]+"),
    ("negated class", "[^a-z]+"),
    ("class with escapes", "[\\]\\-\\\\]+"),
    ("empty class", "[]"),
    ("unclosed class", "["),
    ("shorthands", "\\d\\w\\s\\D\\W\\S"),
    ("quantifier {m,n}", "a{2,5}"),
    ("quantifier {m,}", "a{2,}"),
    ("quantifier {,n}", "a{,5}"),
    ("quantifier {m}", "a{3}"),
    ("quantifier {n,m} reversed", "a{5,2}"),
    ("quantifier {1000}", "a{1000}"),
    ("quantifier {100000}", "a{100000}"),
    ("quantifier {300}", "a{300}"),
    ("quantifier nested", "(a{2}){3}"),
    ("double quantifier a**", "a**"),
    ("possessive a*+", "a*+"),
    ("lazy +?", "a+?b"),
    ("lazy *?", "a*?b"),
    ("lazy ??", "a??b"),
    ("alternation", "cat|dog"),
    ("alternation empty branch", "a|"),
    ("alternation only bar", "|"),
    ("group", "(ab)+"),
    ("empty group", "()"),
    ("non-capturing group", "(?:ab)+"),
    ("named group (?P<n>)", "(?P<n>ab)"),
    ("named group (?<n>)", "(?<n>ab)"),
    ("named backref (?P=n)", "(?P<n>a)(?P=n)"),
    ("backref \\1", "(a)\\1"),
    ("lookahead (?=)", "(?=a)a"),
    ("negative lookahead (?!)", "(?!b)a"),
    ("lookbehind (?<=)", "(?<=a)b"),
    ("negative lookbehind (?<!)", "(?<!a)b"),
    ("inline flag (?i)", "(?i)abc"),
    ("scoped flag (?i:)", "(?i:abc)"),
    ("comment (?#)", "a(?#c)b"),
    ("atomic group (?>)", "(?>a)"),
    ("anchors ^$", "^abc$"),
    ("anchor ^ only", "^abc"),
    ("anchor $ only", "abc$"),
    ("anchor in the middle", "a^b"),
    ("anchor $ in the middle", "a$b"),
    ("\\A \\Z", "\\Aabc\\Z"),
    ("\\b", "\\bab\\b"),
    ("\\B", "a\\Bb"),
    ("unicode escape \\u", "\\u00e9+"),
    ("unicode escape \\U", "\\U0001F600"),
    ("hex escape \\x", "\\x41+"),
    ("hex escape \\x{}", "\\x{41}"),
    ("octal escape", "\\101"),
    ("literal unicode", "é+日本"),
    ("unicode property \\p{L}", "\\p{L}+"),
    ("control escapes", "a\\n\\t\\r\\f\\v"),
    ("escaped metachars", "\\.\\*\\+\\?\\(\\)\\[\\]\\{\\}\\|\\^\\$"),
    ("trailing backslash", "a\\"),
    ("unknown escape \\q", "\\q"),
    ("(((", "((("),
    (")))", ")))"),
    ("unmatched )", "a)"),
    ("quantifier at start", "*a"),
    ("brace literal", "a{"),
    ("brace literal 2", "a{x}"),
    ("iso date", "\\d{4}-\\d{2}-\\d{2}"),
    ("email-ish", "[a-z0-9._%+-]+@[a-z0-9.-]+\\.[a-z]{2,}"),
    ("long alternation 1000", "|".join(f"w{i}" for i in range(1000))),
    ("nested groups 200", "(" * 200 + "a" + ")" * 200),
    ("nested groups 1000", "(" * 1000 + "a" + ")" * 1000),
]


def _cases() -> list[tuple[str, str, str]]:
    out = [(f"schema:{name}", "json_schema",
            spec if isinstance(spec, str) else json.dumps(spec)) for name, spec in SCHEMAS]
    out += [(f"regex:{name}", "regex", spec) for name, spec in REGEXES]
    return out


def _message(e: Exception) -> str:
    """The engine's message without its "[time] /build/path/file.cc:line:" prefix."""
    text = " ".join(str(e).split())
    return re.sub(r"\[[\d:]+\] \S+?:\d+:\s*", "", text)[:400]


def _one_case(g: Any, pipe: Any, ids: list[int], n: int, kind: str,
              spec: str) -> dict[str, Any]:
    plain = g.GenerationConfig(max_new_tokens=4)
    gc = g.GenerationConfig(max_new_tokens=8)
    so = g.StructuredOutputConfig()
    setattr(so, kind, spec)
    gc.structured_output_config = so
    tok = pipe.get_tokenizer()
    stage = "add_request"
    try:
        h0 = pipe.add_request(3 * n, ids, plain)
        h = pipe.add_request(3 * n + 1, ids, gc)
        stage = "step"
        t0 = time.perf_counter()
        pipe.step()
        first_step = time.perf_counter() - t0
        while pipe.has_non_finished_requests():
            pipe.step()
        out = h.read_all()
        text = tok.decode(out[0].generated_ids) if out else ""
        status = str(h.get_status())
        h0.read_all()
    except Exception as e:
        return {"outcome": "refused", "stage": stage,
                "error": _message(e)}
    try:
        h2 = pipe.add_request(3 * n + 2, ids, plain)
        while pipe.has_non_finished_requests():
            pipe.step()
        h2.read_all()
    except Exception as e:
        return {"outcome": "refused", "stage": "after (pipeline broken)",
                "error": _message(e), "text": text}
    return {"outcome": "accepted", "first_step_s": round(first_step, 3), "status": status,
            "text": text}


def _worker(model: str, cases_file: str, fresh: bool) -> None:
    """Runs cases in order on one pipeline until one is refused (the pipeline is then
    broken: the process ends and the parent starts another for the next case). Prints
    "START <i>" before case i and its outcome as one JSON line after it."""
    import openvino_genai as g

    sc = g.SchedulerConfig()
    sc.cache_size = 1
    pipe = g.ContinuousBatchingPipeline(model, sc, "CPU", {"INFERENCE_NUM_THREADS": 1})
    ids = pipe.get_tokenizer().encode("Reply with a value:", add_special_tokens=False).input_ids
    # XGrammar's per-tokenizer set-up happens at the first constrained request: do it
    # outside the cases' clocks.
    warm = _one_case(g, pipe, ids, 0, "regex", "a")
    assert warm["outcome"] == "accepted", warm
    for n, (i, kind, spec) in enumerate(json.loads(Path(cases_file).read_text()), start=1):
        print(f"START {i}", flush=True)
        res = _one_case(g, pipe, ids, n, kind, spec)
        print(json.dumps(res), flush=True)
        if res["outcome"] != "accepted" or fresh:
            return


def _run_shard(model: str, shard: list[tuple[int, tuple[str, str, str]]], fresh: bool,
               report: Any) -> list[dict[str, Any]]:
    """Runs the shard's cases through as many worker processes as it takes."""
    results: list[dict[str, Any]] = []
    todo = list(shard)
    while todo:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump([[i, kind, spec] for i, (_, kind, spec) in todo], f)
        try:
            proc = subprocess.Popen([sys.executable, __file__, "--worker", f.name, "--model",
                                     model] + (["--fresh"] if fresh else []),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            lines: queue.Queue[str | None] = queue.Queue()

            def pump(p: subprocess.Popen[str] = proc, q: queue.Queue[str | None] = lines) -> None:
                assert p.stdout is not None
                for ln in p.stdout:
                    q.put(ln)
                q.put(None)

            threading.Thread(target=pump, daemon=True).start()
            current: int | None = None
            started = 0.0
            done_any = False
            while True:
                timeout = None if current is None else TIMEOUT_S - (time.perf_counter() - started)
                try:
                    ln = lines.get(timeout=max(timeout, 0.01) if timeout is not None else 600)
                except queue.Empty:
                    proc.kill()
                    res: dict[str, Any] = {"outcome": "crashed",
                                           "error": f"timeout after {TIMEOUT_S} s"}
                    break
                if ln is None:
                    proc.wait()
                    if current is None:
                        if not done_any and todo:  # died before any case: give up
                            raise RuntimeError(f"worker failed: {proc.stderr.read()[-2000:]}")
                        break
                    tail = (proc.stderr.read().strip().splitlines() or [""])[-1][:400]
                    res = {"outcome": "crashed", "returncode": proc.returncode, "error": tail}
                    break
                if ln.startswith("START "):
                    current = int(ln.split()[1])
                    started = time.perf_counter()
                elif ln.startswith("{") and current is not None:
                    res = json.loads(ln)
                    res["case_s"] = round(time.perf_counter() - started, 2)
                    name, kind, spec = todo[0][1]
                    assert todo[0][0] == current
                    rec = {"case": name, "kind": kind, "spec_chars": len(spec), **res}
                    results.append(rec)
                    report(rec)
                    todo.pop(0)
                    current = None
                    done_any = True
            if current is not None:  # the case that crashed the worker
                name, kind, spec = todo[0][1]
                res["case_s"] = round(time.perf_counter() - started, 2)
                rec = {"case": name, "kind": kind, "spec_chars": len(spec), **res}
                results.append(rec)
                report(rec)
                todo.pop(0)
            proc.wait()
        finally:
            os.unlink(f.name)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    ap.add_argument("--names", help="run the cases named in this file (one a line)")
    ap.add_argument("--out", help="write the results here (default: grammar_probe.json, "
                                  "only when every case ran)")
    ap.add_argument("--fresh", action="store_true",
                    help="one process (and pipeline) per case, even after accepted ones")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.model, args.worker, args.fresh)
        return
    cases = [c for c in _cases() if args.only in c[0]]
    if args.names:
        wanted = set(Path(args.names).read_text().splitlines())
        cases = [c for c in cases if c[0] in wanted]
    order = {c[0]: n for n, c in enumerate(cases)}
    shards = [list(enumerate(cases))[k::args.jobs] for k in range(args.jobs)]
    lock = threading.Lock()

    def report(r: dict[str, Any]) -> None:
        detail = r.get("error") or f"{r.get('text')!r} (first step {r.get('first_step_s')} s)"
        with lock:
            print(f"{r['outcome']:9} {r['case_s']:6.2f}s {r['case']}: {detail[:200]}",
                  flush=True)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as ex:
        parts = list(ex.map(lambda sh: _run_shard(args.model, sh, args.fresh, report), shards))
    results = sorted((r for p in parts for r in p), key=lambda r: order[r["case"]])
    summary = {k: sum(r["outcome"] == k for r in results)
               for k in ("accepted", "refused", "crashed")}
    doc = {"command": "python benchmarks/grammar_probe.py", "model": args.model,
           "timeout_s": TIMEOUT_S, "fresh": args.fresh,
           "total_s": round(time.perf_counter() - t0, 1),
           "summary": summary, "results": results}
    if args.out or not (args.only or args.names):
        Path(args.out or OUT).write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(summary, f"{doc['total_s']} s")


if __name__ == "__main__":
    main()
