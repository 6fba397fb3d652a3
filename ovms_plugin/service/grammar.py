"""The guard in front of constrained decoding: JSON schemas and regexes are checked here,
before they reach XGrammar (openvino_genai.StructuredOutputConfig inside a
ContinuousBatchingPipeline).

Why: a grammar XGrammar cannot compile is not refused by add_request; it raises inside
pipe.step(), and the pipeline is broken for every request afterwards ("this function cannot
be called when we are already in scheduling phase", leaked blocks). And compilation runs
inside step(), so a grammar that takes seconds to compile stalls every request of the
pipeline for that long. Requests come from untrusted clients: everything here is an
allow-list, and what is not known to compile quickly is refused with a GrammarError that
names the place in the schema (a JSON path such as ``properties.age.minimum``) and says
what would work.

    check_json_schema(schema) -> str   # a dict (a JSON text, or True: any JSON) -> the
                                       # canonical compact JSON text to give XGrammar
    check_regex(pattern) -> str
    JSON_OBJECT_SCHEMA                 # response_format json_object: any JSON object

What XGrammar in openvino_genai 2026.4 does (measured by benchmarks/grammar_probe.py,
results in benchmarks/grammar_probe.json: every case on SmolLM2-135M in a subprocess of its
own once it fails):

Compiles, and the guard lets through:
  type (one of the seven names, or a non-empty list of them), properties, required,
  additionalProperties (true, false or a schema), unevaluatedProperties, patternProperties,
  propertyNames, minProperties/maxProperties, items (a schema, or false), prefixItems,
  minItems/maxItems, enum, const, anyOf, oneOf (compiled as anyOf), allOf with one member,
  $ref to "#", "#/$defs/x", "#/definitions/x" or any other object path in the document
  (recursion included), $defs/definitions, pattern, format (any name), minLength/maxLength
  (bounded, see below), minimum/maximum/exclusiveMinimum/exclusiveMaximum on integers
  (whole int64 numbers; on "number" they are refused: XGrammar does not keep them),
  multipleOf and uniqueItems (compiled but NOT enforced),
  boolean schema true, {}, annotations (title, description, default, examples, deprecated,
  readOnly, writeOnly, $schema, $id, $comment, contentMediaType, contentEncoding) and
  "x-" extension keywords (ignored).

Breaks the engine (an error inside step()), so refused here:
  a text that is not JSON, NaN/Infinity, a schema that is not an object or true; the
  schema false anywhere except as additionalProperties/unevaluatedProperties/items; an
  unknown type name or a type that is not a string/list; properties, required, enum with
  the wrong kind of value; empty enum, anyOf, oneOf; minItems > maxItems, minLength >
  maxLength, minimum > maximum (also exclusive bounds that leave no integer); fractional or
  beyond-int64 bounds on integers; bounds that are not numbers (draft-4 boolean
  exclusiveMinimum, "3"); non-integer minItems; items as a list (draft-4 tuples: use
  prefixItems); a $ref that does not resolve, goes through an array index, or uses JSON
  pointer escapes (~0, ~1, %20: XGrammar looks the names up literally); a $ref that is not
  a string; property names containing '"', '\\' or control characters (an EBNF lexer
  error); a pattern XGrammar's regex parser refuses (see check_regex); contains with
  minContains.

Compiles but ignores it (the output would not satisfy the schema), so refused here:
  not, if/then/else, dependentRequired, dependentSchemas, contains/minContains/maxContains,
  unevaluatedItems, allOf with more than one member, remote or relative $ref
  ("http://...", "other.json#/x"), $ref to an "$anchor" ("#foo"), $dynamicRef,
  $dynamicAnchor, $recursiveRef, $recursiveAnchor; also a $ref loop that never reaches a
  schema ({"$defs": {"a": {"$ref": "#/$defs/a"}}}: compiles, generates nothing or blanks).
  Unknown keywords other than "x-..." are refused too (e.g. OpenAPI's "nullable": use
  "type": [..., "null"]).

Too slow to compile (the time of the step() that compiles it; 2 shared, loaded cores, so
inflated): maxLength 64: 3.4 s, 128: 6 s, 300 to 10000: 9 to 12 s; minLength 1000: 2.5 s;
200 nested objects or arrays: 3.5 s; 1000 nested arrays: over 60 s; 500 properties in one
object: 9.6 s (200: 0.3 s, 2000: over 60 s); an enum of 3000 strings: 1.3 s (1000: 0.4 s);
anyOf of 500 objects: 1.1 s. Hence the caps: MAX_DEPTH, MAX_SCHEMA_CHARS, MAX_ENUM,
MAX_PROPERTIES, MAX_ALTERNATIVES, MAX_STRING_LENGTH_BOUND, MAX_REPEAT, MAX_REGEX_CHARS.

Regexes (check_regex): Python's re must compile it first; then refused because XGrammar
refuses them: lookahead/lookbehind, backreferences (\\1, (?P=n)) and octal escapes, named
groups ((?P<n>...)), inline flags ((?i), (?i:...)), atomic groups, comments (?#...), \\b
and \\B, possessive quantifiers (a*+), {,n}, a '{' that is not a repetition, an empty class
'[]...]', an empty alternative ('a|', '|'); refused because XGrammar reads them otherwise:
\\A and \\Z (the letters), '^'/'$' other than at the very start/end (ignored); refused
because they produce nothing: the empty regex, empty groups '()'. Repetition counts are
capped (a{1000} compiles in 2.4 s). Lazy quantifiers, (?:...), classes, \\d\\w\\s, \\xhh,
\\uhhhh, \\Uhhhhhhhh and literal Unicode compile.

Surprises: picojson accepts trailing text after the schema ('{"type":"object"} x'), so the
text handed over is always re-serialised here; a "pattern" is emitted without JSON
escaping: '^a"b$' produces '"a"b"' (not JSON) and '^a\\\\b$' produces '"a\\b"' (a
backspace), so patterns that match '"' or '\\' literally are refused; "\\A"/"\\Z" are read
as the letters A and Z and an anchor in the middle of a pattern is ignored, so both are
refused.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["JSON_OBJECT_SCHEMA", "GrammarError", "check_json_schema", "check_regex"]

JSON_OBJECT_SCHEMA = '{"type":"object"}'

MAX_SCHEMA_CHARS = 64 * 1024  # canonical text
MAX_DEPTH = 32  # nested subschemas
MAX_ENUM = 1000  # values of one enum
MAX_PROPERTIES = 200  # properties of one object (200: 0.3 s; 500: 9.6 s; 2000: over 60 s)
MAX_ALTERNATIVES = 256  # members of anyOf/oneOf/prefixItems (anyOf 500 objects: 1.1 s)
MAX_STRING_LENGTH_BOUND = 64  # maxLength/minLength (compile: 64: 3.4 s, 128: 6 s, 300: 11 s)
MAX_REPEAT = 256  # {m,n} counts in regexes
MAX_REGEX_CHARS = 4096
MAX_INT64 = 2**63 - 1
MIN_INT64 = -(2**63)

TYPES = ("string", "integer", "number", "boolean", "null", "object", "array")
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly",
    "$schema", "$id", "$comment", "contentMediaType", "contentEncoding",
})
# keyword -> what to do with its value
_SCHEMA = "schema"  # one subschema
_SCHEMA_OR_FALSE = "schema-or-false"
_SCHEMA_MAP = "map of schemas"
_SCHEMA_LIST = "non-empty list of schemas"
_COUNT = "count"  # a non-negative integer
_BOUND = "bound"  # a number
HANDLED = {
    "type": "type", "properties": _SCHEMA_MAP, "required": "required",
    "additionalProperties": _SCHEMA_OR_FALSE, "unevaluatedProperties": _SCHEMA_OR_FALSE,
    "patternProperties": "patternProperties", "propertyNames": _SCHEMA,
    "minProperties": _COUNT, "maxProperties": _COUNT,
    "items": "items", "prefixItems": _SCHEMA_LIST, "minItems": _COUNT, "maxItems": _COUNT,
    "uniqueItems": "bool",
    "enum": "enum", "const": "const",
    "anyOf": _SCHEMA_LIST, "oneOf": _SCHEMA_LIST, "allOf": "allOf",
    "$ref": "$ref", "$defs": _SCHEMA_MAP, "definitions": _SCHEMA_MAP,
    "pattern": "pattern", "format": "format", "minLength": _COUNT, "maxLength": _COUNT,
    "minimum": _BOUND, "maximum": _BOUND, "exclusiveMinimum": _BOUND,
    "exclusiveMaximum": _BOUND, "multipleOf": "multipleOf",
}
REFUSED = {
    "not": "XGrammar ignores 'not'; describe the allowed values instead (enum, anyOf, ...)",
    "if": "XGrammar ignores if/then/else; use anyOf with one schema per case",
    "then": "XGrammar ignores if/then/else; use anyOf with one schema per case",
    "else": "XGrammar ignores if/then/else; use anyOf with one schema per case",
    "dependentRequired": "XGrammar ignores it; list the properties in 'required', or use "
                         "anyOf with one object schema per case",
    "dependentSchemas": "XGrammar ignores it; use anyOf with one object schema per case",
    "dependencies": "XGrammar ignores it; use anyOf with one object schema per case",
    "contains": "XGrammar does not support it; use items (or prefixItems)",
    "minContains": "XGrammar does not support it; use items with minItems",
    "maxContains": "XGrammar does not support it; use items with maxItems",
    "unevaluatedItems": "XGrammar ignores it; use items: false after prefixItems",
    "additionalItems": "a draft-2019 keyword; use prefixItems with items",
    "$dynamicRef": "use $ref to '#/$defs/...'",
    "$dynamicAnchor": "use $ref to '#/$defs/...'",
    "$recursiveRef": "use $ref to '#/$defs/...'",
    "$recursiveAnchor": "use $ref to '#/$defs/...'",
    "$anchor": "$ref by anchor name is not supported; use $ref to '#/$defs/...'",
    "$vocabulary": "not supported",
    "nullable": "an OpenAPI keyword; use \"type\": [..., \"null\"] or anyOf with "
                "{\"type\": \"null\"}",
}
_NAME_FORBIDDEN = re.compile(r'["\\\x00-\x1f\x7f]')


class GrammarError(ValueError):
    """A schema or regex the server refuses; the message says where (path) and what works."""

    def __init__(self, message: str, path: str = "") -> None:
        self.path = path
        if len(path) > 160:
            path = path[:60] + "..." + path[-90:]
        super().__init__(f"{path}: {message}" if path else message)


# --- JSON schemas -------------------------------------------------------------------------


def check_json_schema(schema: Any) -> str:
    """Checks a JSON schema (a dict, a JSON text of one, or True meaning any JSON value) and
    returns the compact canonical JSON text to give XGrammar. Raises GrammarError."""
    if isinstance(schema, (str, bytes)):
        if len(schema) > MAX_SCHEMA_CHARS:
            raise GrammarError(f"the schema is {len(schema)} characters long; at most "
                               f"{MAX_SCHEMA_CHARS} are accepted")
        schema = _parse_json_text(schema)
    if schema is True:
        return "{}"
    if schema is False:
        raise GrammarError("the schema false accepts no value at all; use true or {} for "
                           "any JSON value")
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be a JSON object (or true), got "
                           f"{_kind(schema)}")
    _check_json_value(schema)
    try:
        text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError as e:  # NaN, Infinity
        raise GrammarError(f"the schema holds a number JSON cannot carry ({e})") from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise GrammarError(f"the schema is {len(text)} characters long (compact JSON); at "
                           f"most {MAX_SCHEMA_CHARS} are accepted")
    _Walker(schema).run()
    return text


def _parse_json_text(text: str | bytes) -> Any:
    def no_constant(name: str) -> Any:
        raise GrammarError(f"{name} is not JSON; numbers in a schema must be finite")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise GrammarError(f"the key {k!r} appears twice in one object of the schema")
            out[k] = v
        return out

    try:
        return json.loads(text, parse_constant=no_constant, object_pairs_hook=no_duplicates)
    except RecursionError:
        raise GrammarError(f"the schema is nested too deeply (at most {MAX_DEPTH} levels "
                           f"of subschemas)") from None
    except (ValueError, UnicodeDecodeError) as e:
        if isinstance(e, GrammarError):
            raise
        raise GrammarError(f"the schema is not valid JSON: {e}") from None


def _check_json_value(value: Any) -> None:
    """Plain JSON data (what json.loads makes), finite numbers, no lone surrogates, and
    nested at most a few times deeper than the schema depth cap (iteratively: no
    RecursionError on hostile input)."""
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    limit = 4 * MAX_DEPTH
    while stack:
        v, depth, path = stack.pop()
        if depth > limit:
            raise GrammarError(f"the schema is nested too deeply (at most {MAX_DEPTH} levels "
                               f"of subschemas)", path)
        if isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise GrammarError(f"object keys must be strings, got {_kind(k)}", path)
                _check_text(k, path)
                stack.append((item, depth + 1, _join(path, k)))
        elif isinstance(v, list):
            stack.extend((item, depth + 1, _join(path, i)) for i, item in enumerate(v))
        elif isinstance(v, str):
            _check_text(v, path)
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise GrammarError("numbers in a schema must be finite (no NaN or Infinity)",
                                   path)
        elif v is None or isinstance(v, (bool, int)):
            pass
        else:
            raise GrammarError(f"not JSON data: {_kind(v)}", path)


def _check_text(s: str, path: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise GrammarError("a string holds a lone UTF-16 surrogate; use the character "
                           "itself", path) from None


class _Walker:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.refs: list[tuple[str, str]] = []  # (ref, path)

    def run(self) -> None:
        self.schema(self.root, "", 0)
        done: set[str] = set()
        while self.refs:  # resolving may walk a target, which may add refs
            ref, path = self.refs.pop(0)
            if ref not in done:
                done.add(ref)
                self.resolve(ref, path)

    # one subschema
    def schema(self, s: Any, path: str, depth: int, false_ok: bool = False) -> None:
        if depth > MAX_DEPTH:
            raise GrammarError(f"the schema is nested too deeply: at most {MAX_DEPTH} levels "
                               f"of subschemas", path)
        if s is True:
            return
        if s is False:
            if false_ok:
                return
            raise GrammarError("the schema false is only accepted as additionalProperties, "
                               "unevaluatedProperties or items; leave the property out, or "
                               "use additionalProperties: false", path)
        if not isinstance(s, dict):
            raise GrammarError(f"a schema must be an object or true, got {_kind(s)}", path)
        types = self.type_of(s, path)
        for key, value in s.items():
            at = _join(path, key)
            if key in ANNOTATIONS or key.startswith("x-"):
                continue
            if key in REFUSED:
                raise GrammarError(f"the keyword {key!r} is not supported: {REFUSED[key]}", at)
            what = HANDLED.get(key)
            if what is None:
                raise GrammarError(f"unknown keyword {key!r}; supported: "
                                   f"{', '.join(sorted(HANDLED))}; ignored: annotations "
                                   f"(title, description, ...) and 'x-' extensions", at)
            self.keyword(s, key, what, value, at, depth, types)
        self.pairs(s, path, types)

    def type_of(self, s: dict[str, Any], path: str) -> tuple[str, ...]:
        if "type" not in s:
            return ()
        t, at = s["type"], _join(path, "type")
        names = t if isinstance(t, list) else [t]
        if isinstance(t, list) and not t:
            raise GrammarError(f"type must name at least one of {', '.join(TYPES)}", at)
        for n in names:
            if n not in TYPES:
                raise GrammarError(f"unknown type {n!r}; use one of {', '.join(TYPES)} (or a "
                                   f"list of them)", at)
        if len(set(names)) != len(names):
            raise GrammarError("type lists a name twice", at)
        return tuple(names)

    def keyword(self, s: dict[str, Any], key: str, what: str, value: Any, at: str,
                depth: int, types: tuple[str, ...]) -> None:
        if what == "type":
            return  # type_of
        if what == _SCHEMA:
            self.schema(value, at, depth + 1)
        elif what == _SCHEMA_OR_FALSE:
            self.schema(value, at, depth + 1, false_ok=True)
        elif what == _SCHEMA_MAP:
            if not isinstance(value, dict):
                raise GrammarError(f"{key} must be an object mapping names to schemas", at)
            if key == "properties" and len(value) > MAX_PROPERTIES:
                raise GrammarError(f"properties names {len(value)} properties; at most "
                                   f"{MAX_PROPERTIES} are accepted per object", at)
            for name, sub in value.items():
                if key == "properties":
                    _check_name(name, _join(at, name))
                self.schema(sub, _join(at, name), depth + 1)
        elif what == _SCHEMA_LIST:
            if not isinstance(value, list) or not value:
                raise GrammarError(f"{key} must be a non-empty list of schemas", at)
            if len(value) > MAX_ALTERNATIVES:
                raise GrammarError(f"{key} has {len(value)} schemas; at most "
                                   f"{MAX_ALTERNATIVES} are accepted", at)
            for i, sub in enumerate(value):
                self.schema(sub, _join(at, i), depth + 1)
        elif what == "allOf":
            if not isinstance(value, list) or len(value) != 1:
                raise GrammarError("allOf is supported with exactly one schema (XGrammar "
                                   "ignores the others); merge the schemas into one", at)
            self.schema(value[0], _join(at, 0), depth + 1)
        elif what == "items":
            if isinstance(value, list):
                raise GrammarError("items as a list (draft 4 tuples) is not supported; use "
                                   "prefixItems for the list and items: false after it", at)
            self.schema(value, at, depth + 1, false_ok=True)
        elif what == "patternProperties":
            if not isinstance(value, dict):
                raise GrammarError("patternProperties must be an object mapping regexes to "
                                   "schemas", at)
            for pattern, sub in value.items():
                _check_name(pattern, _join(at, pattern))
                _check_pattern(pattern, _join(at, pattern))
                self.schema(sub, _join(at, pattern), depth + 1)
        elif what == "required":
            if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
                raise GrammarError("required must be a list of property names", at)
            if len(set(value)) != len(value):
                raise GrammarError("required lists a name twice", at)
            for i, n in enumerate(value):
                _check_name(n, _join(at, i))
        elif what == _COUNT:
            if not _is_int(value) or value < 0:
                raise GrammarError(f"{key} must be a non-negative integer, got {value!r}", at)
            if key in ("minLength", "maxLength") and value > MAX_STRING_LENGTH_BOUND:
                raise GrammarError(f"{key} above {MAX_STRING_LENGTH_BOUND} is not accepted "
                                   f"(XGrammar takes seconds to compile it); leave it out or "
                                   f"use a smaller bound", at)
        elif what == _BOUND:
            if not _is_number(value):
                raise GrammarError(f"{key} must be a number, got {value!r}", at)
            if "integer" in types and not _number_ok_for_integer(value):
                raise GrammarError(f"{key} of an integer must be a whole number between "
                                   f"-2^63 and 2^63-1, got {value!r}", at)
        elif what == "multipleOf":
            if not _is_number(value) or value <= 0:
                raise GrammarError(f"multipleOf must be a positive number, got {value!r}", at)
        elif what == "bool":
            if not isinstance(value, bool):
                raise GrammarError(f"{key} must be true or false", at)
        elif what == "enum":
            if not isinstance(value, list) or not value:
                raise GrammarError("enum must be a non-empty list of values", at)
            if len(value) > MAX_ENUM:
                raise GrammarError(f"enum has {len(value)} values; at most {MAX_ENUM} are "
                                   f"accepted", at)
        elif what == "const":
            pass
        elif what == "pattern":
            if not isinstance(value, str):
                raise GrammarError("pattern must be a string (a regex)", at)
            _check_pattern(value, at)
        elif what == "format":
            if not isinstance(value, str):
                raise GrammarError("format must be a string", at)
        elif what == "$ref":
            if not isinstance(value, str):
                raise GrammarError("$ref must be a string such as '#/$defs/name'", at)
            self.refs.append((value, at))
        else:  # pragma: no cover - HANDLED and this function disagree
            raise AssertionError(what)

    def pairs(self, s: dict[str, Any], path: str, types: tuple[str, ...]) -> None:
        """Bounds that contradict each other (XGrammar fails on them)."""
        for lo, hi in (("minItems", "maxItems"), ("minLength", "maxLength"),
                       ("minProperties", "maxProperties"), ("minimum", "maximum")):
            if lo in s and hi in s and s[lo] > s[hi]:
                raise GrammarError(f"{lo} ({s[lo]}) is greater than {hi} ({s[hi]}): no value "
                                   f"fits", _join(path, lo))
        bounds = [k for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
                  if k in s]
        if bounds and "number" in types:
            # Measured on openvino-genai 2026.4: XGrammar keeps integer bounds but lets a
            # bounded number out of its range (1.58 for maximum 1), so the output would not
            # validate.
            raise GrammarError(f"{bounds[0]} on a \"number\" is not enforced by the grammar "
                               "engine, so the output could fall outside it; use \"integer\" "
                               "with bounds, or leave the bound out and check the value",
                               _join(path, bounds[0]))
        lo, hi = _range(s, "integer" in types)
        exclusive = "exclusiveMinimum" in s or "exclusiveMaximum" in s
        if lo is not None and hi is not None and (
                lo > hi or (lo == hi and exclusive and "integer" not in types)):
            raise GrammarError("the bounds (minimum, maximum, exclusiveMinimum, "
                               "exclusiveMaximum) leave no value", path)

    def resolve(self, ref: str, path: str) -> None:
        seen: set[str] = set()
        while True:
            target = self.lookup(ref, path)
            if not (isinstance(target, dict) and set(target) - ANNOTATIONS == {"$ref"}):
                return
            seen.add(ref)
            ref = target["$ref"]
            if ref in seen:
                raise GrammarError("this $ref loops through $refs only and never reaches a "
                                   "schema", path)

    def lookup(self, ref: str, path: str) -> Any:
        if ref == "#":
            return self.root
        if not ref.startswith("#/"):
            raise GrammarError(f"$ref {ref!r} is not supported: only references inside the "
                               f"schema ('#', '#/$defs/name', '#/definitions/name'); put the "
                               f"referenced schema under $defs", path)
        node: Any = self.root
        walked = "#"
        for part in ref[2:].split("/"):
            if "~" in part or "%" in part:
                raise GrammarError(f"$ref {ref!r}: JSON pointer escapes (~0, ~1, %xx) are "
                                   f"not supported; name the definition with letters, "
                                   f"digits, '_' or '-'", path)
            if not isinstance(node, dict):
                raise GrammarError(f"$ref {ref!r}: {walked} is not an object (a $ref cannot "
                                   f"go into a list); move the schema under $defs", path)
            if part not in node:
                raise GrammarError(f"$ref {ref!r} does not resolve: {walked} has no "
                                   f"{part!r}", path)
            node = node[part]
            walked += "/" + part
        if not (isinstance(node, dict) or node is True):
            raise GrammarError(f"$ref {ref!r} points at {_kind(node)}, not a schema", path)
        # a target outside the walked keywords (under an annotation, say) is checked too
        self.schema(node, path, 0)
        return node


def _range(s: dict[str, Any], integer: bool) -> tuple[float | None, float | None]:
    """The lowest and highest value the numeric bounds allow (whole numbers for integers)."""
    lows, highs = [], []
    if "minimum" in s:
        lows.append(math.ceil(s["minimum"]) if integer else s["minimum"])
    if "exclusiveMinimum" in s:
        v = s["exclusiveMinimum"]
        lows.append(math.floor(v) + 1 if integer else v)
    if "maximum" in s:
        highs.append(math.floor(s["maximum"]) if integer else s["maximum"])
    if "exclusiveMaximum" in s:
        v = s["exclusiveMaximum"]
        highs.append(math.ceil(v) - 1 if integer else v)
    return (max(lows) if lows else None), (min(highs) if highs else None)


def _check_name(name: str, path: str) -> None:
    if _NAME_FORBIDDEN.search(name):
        raise GrammarError("property names (and patternProperties regexes) may not contain "
                           "'\"', '\\' or control characters (XGrammar cannot compile them)",
                           path)


def _check_pattern(pattern: str, path: str) -> None:
    try:
        check_regex(pattern)
    except GrammarError as e:
        raise GrammarError(str(e), path) from None
    # XGrammar emits the characters a pattern matches without JSON escaping
    if re.search(r'"|\\\\|\\"|\\x22|\\x5[cC]|\\u0022|\\u005[cC]', pattern):
        raise GrammarError("a pattern that matches '\"' or '\\' is not supported in a JSON "
                           "string (XGrammar would emit it unescaped)", path)


# --- regexes ------------------------------------------------------------------------------

_GROUP_REFUSALS = [
    ("?=", "lookahead (?=...)"), ("?!", "negative lookahead (?!...)"),
    ("?<=", "lookbehind (?<=...)"), ("?<!", "negative lookbehind (?<!...)"),
    ("?P=", "a named backreference (?P=name)"), ("?P<", "a named group (?P<name>...)"),
    ("?<", "a named group (?<name>...)"), ("?>", "an atomic group (?>...)"),
    ("?#", "a comment (?#...)"), ("?(", "a conditional (?(...))"),
]
_ESCAPE_REFUSALS = {
    "A": "\\A (XGrammar reads it as the letter A); use ^",
    "Z": "\\Z (XGrammar reads it as the letter Z); use $",
    "z": "\\z; use $",
    "b": "\\b (word boundaries are not supported)",
    "B": "\\B (word boundaries are not supported)",
    "G": "\\G", "K": "\\K",
}
_REPEAT = re.compile(r"\{(\d+)(,(\d*))?\}")


def check_regex(pattern: Any) -> str:
    """Checks a regex for constrained decoding; returns it unchanged. Raises GrammarError
    for what Python's re rejects and for the constructs XGrammar does not support."""
    if not isinstance(pattern, str):
        raise GrammarError(f"a regex must be a string, got {_kind(pattern)}")
    if not pattern:
        raise GrammarError("the regex is empty; give a pattern such as '[a-z]+'")
    if len(pattern) > MAX_REGEX_CHARS:
        raise GrammarError(f"the regex is {len(pattern)} characters long; at most "
                           f"{MAX_REGEX_CHARS} are accepted")
    _check_text(pattern, "")
    try:
        re.compile(pattern)
    except re.error as e:
        raise GrammarError(f"invalid regex: {e}") from None
    except (RecursionError, OverflowError):
        raise GrammarError("the regex is too complex (nesting or repetition counts)") from None
    _scan_regex(pattern)
    return pattern


def _scan_regex(p: str) -> None:
    def refuse(what: str, at: int, hint: str = "") -> None:
        raise GrammarError(f"{what} at position {at} is not supported by the constrained "
                           f"decoder" + (f"; {hint}" if hint else ""))

    i, n = 0, len(p)
    prev_atom = False  # something a quantifier could apply to just before i
    prev_quant = False
    depth = 0
    while i < n:
        c = p[i]
        if c == "\\":
            e = p[i + 1]
            if e in _ESCAPE_REFUSALS:
                refuse(_ESCAPE_REFUSALS[e], i)
            if e.isdigit() and e != "0":
                refuse("\\" + e + " (a backreference or an octal escape)", i,
                       "repeat the group's pattern instead, or write \\xhh")
            if e == "0":
                refuse("an octal escape", i, "use \\xhh")
            i += 2
            prev_atom, prev_quant = True, False
            continue
        if c == "[":
            j = i + 1
            if j < n and p[j] == "^":
                j += 1
            if j < n and p[j] == "]":
                refuse("']' first in a character class", i, "escape it as \\]")
            while j < n and p[j] != "]":
                if p[j] == "\\":
                    if p[j + 1] in "bAZzBG":
                        refuse(f"\\{p[j + 1]} in a character class", j)
                    if p[j + 1].isdigit():
                        refuse("an octal escape in a character class", j, "use \\xhh")
                    j += 2
                elif p[j] == "[" and j + 1 < n and p[j + 1] in ":=.":
                    refuse("a POSIX class [:...:]", j)
                else:
                    j += 1
            i = j + 1
            prev_atom, prev_quant = True, False
            continue
        if c == "(":
            if p.startswith("?", i + 1) and not p.startswith("?:", i + 1):
                for prefix, what in _GROUP_REFUSALS:
                    if p.startswith(prefix, i + 1):
                        refuse(what, i, "use a plain group (...) or (?:...)")
                refuse("an inline flag group (?...)", i, "spell the cases out, e.g. [aA]")
            if p.startswith(")", i + 1) or p.startswith("?:)", i + 1):
                refuse("an empty group", i)
            if p.startswith("|", i + 1) or p.startswith("?:|", i + 1):
                refuse("an empty alternative", i + 1)
            depth += 1
            i += 3 if p.startswith("?:", i + 1) else 1
            prev_atom = prev_quant = False
            continue
        if c == ")":
            if p[i - 1] == "|":
                refuse("an empty alternative", i - 1)
            depth -= 1
            i += 1
            prev_atom, prev_quant = True, False
            continue
        if c == "|":
            if i == 0 or i == n - 1 or p[i + 1] == "|":
                refuse("an empty alternative", i, "every side of | needs a pattern")
            i += 1
            prev_atom = prev_quant = False
            continue
        if c == "^":
            if i != 0:
                refuse("'^' not at the start of the regex", i, "escape it as \\^ or move it "
                       "to the start")
            i += 1
            continue
        if c == "$":
            if i != n - 1:
                refuse("'$' not at the end of the regex", i, "escape it as \\$ or move it to "
                       "the end")
            i += 1
            continue
        if c in "*+?":
            if prev_quant:
                if c == "?":  # lazy: the same language
                    i += 1
                    prev_quant = False
                    continue
                refuse(f"a possessive quantifier ({p[i - 1]}{c})", i, "drop the second "
                       "quantifier")
            prev_quant, prev_atom = True, False
            i += 1
            continue
        if c == "{":
            m = _REPEAT.match(p, i)
            if not m or (not prev_atom and not prev_quant):
                refuse("'{' that does not start a repetition {m}, {m,} or {m,n}", i,
                       "escape it as \\{")
            assert m is not None
            for count in (m.group(1), m.group(3)):
                if count and int(count) > MAX_REPEAT:
                    refuse(f"a repetition count above {MAX_REPEAT} ({count})", i)
            if prev_quant:
                refuse("a repetition after a quantifier", i)
            prev_quant, prev_atom = True, False
            i = m.end()
            continue
        if c == "}":
            refuse("a lone '}'", i, "escape it as \\}")
        i += 1
        prev_atom, prev_quant = True, False


# --- helpers ------------------------------------------------------------------------------


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    part = key if re.fullmatch(r"[A-Za-z_$][\w$-]*", key) else json.dumps(key,
                                                                           ensure_ascii=False)
    return f"{path}.{part}" if path else part


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number_ok_for_integer(v: int | float) -> bool:
    if isinstance(v, float) and not v.is_integer():
        return False
    return MIN_INT64 <= v <= MAX_INT64
