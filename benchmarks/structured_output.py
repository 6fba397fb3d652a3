"""Time cost of constrained decoding (XGrammar, through openvino_genai's
StructuredOutputConfig on GenerationConfig.structured_output_config) per generated token,
on SmolLM2-135M-Instruct.

    python benchmarks/structured_output.py [--model DIR] [--rounds 5] [--max-new-tokens 64]

The engine the plugin uses: openvino_genai.ContinuousBatchingPipeline on CPU,
SchedulerConfig cache_size=1, greedy decoding, the pipeline stepped by hand (add_request,
then step() until done) so that each token's arrival is timed. Five configurations:

- unconstrained (ignore_eos, so that it makes max_new_tokens tokens);
- json_schema: an object with a bounded string, an enum and a nested array (1-3 items) of
  objects with bounded integers;
- json_object: the schema {"type": "object"} (OpenAI's JSON mode);
- tool_call: {"tool_calls": [{"name": "get_weather", "arguments": {"city": ...}}]},
  exactly one call;
- regex: an ISO date.

Constrained requests stop where the grammar ends (or at max_new_tokens), so they make
fewer tokens than the baseline: the figures are per token. Per request: time to first token
(from add_request; it includes the grammar's compilation), mean time per output token after
the first, and tokens. Each round runs, for each prompt, every configuration once (in an
order rotated by one each round, so that neighbours in time are compared), then a batch of
4 concurrent requests (two of each prompt) per configuration. The ratio
constrained/unconstrained is computed per round, then its median is taken over rounds.

Grammar compilation and its cache: in each round every constrained configuration first
runs with a variant of its grammar not compiled before (one bound moved by the round's
number, see variant(): XGrammar's cache sees through a new "title", a renamed "$ref" or
extra regex groups), then again with the very same grammar (both for the first token
only). Before the rounds, the json_schema request is the first constrained request on this
pipeline (XGrammar's per-tokenizer set-up and the schema's compilation), then runs again.

Every constrained output is checked: json.loads (the regex: re.fullmatch), and against its
schema with `jsonschema` when it is importable, else with the small checker below (the
keywords these schemas use).

Writes benchmarks/structured_output.json.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("structured_output.json")
DEFAULT_MODEL = Path.home() / ".cache" / "ovms-plugin" / "test-models" / "smollm2-v1"

PROMPTS = [
    "What is the weather going to be in Paris for the next two days? Answer in JSON.",
    "I am flying to Tokyo tomorrow. Give me the forecast there as JSON.",
]
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 24},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "day": {"type": "integer", "minimum": 1, "maximum": 7},
                    "temp": {"type": "integer", "minimum": -50, "maximum": 60},
                },
                "required": ["day", "temp"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
TOOL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "tool_calls": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"const": "get_weather"},
                    "arguments": {
                        "type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 40}},
                        "required": ["city"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 1,
        },
    },
    "required": ["tool_calls"],
    "additionalProperties": False,
}
DATE_REGEX = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
# name -> ("json_schema", schema) or ("regex", pattern); None: unconstrained
CONFIGS: dict[str, tuple[str, Any] | None] = {
    "unconstrained": None,
    "json_schema": ("json_schema", WEATHER_SCHEMA),
    "json_object": ("json_schema", OBJECT_SCHEMA),
    "tool_call": ("json_schema", TOOL_SCHEMA),
    "regex": ("regex", DATE_REGEX),
}
BATCH = 4


def variant(name: str, k: int) -> tuple[str, Any]:
    """Configuration `name` with one bound moved by `k`: a grammar XGrammar has not compiled
    yet, of about the same size. (Its cache sees through a new "title" or "$ref" name, or
    regex groups: those compile nothing new.)"""
    if name == "json_schema":
        schema = copy.deepcopy(WEATHER_SCHEMA)
        schema["properties"]["days"]["items"]["properties"]["temp"]["maximum"] = 60 + k
    elif name == "json_object":
        schema = {**OBJECT_SCHEMA, "maxProperties": 1000 + k}
    elif name == "tool_call":
        schema = copy.deepcopy(TOOL_SCHEMA)
        call = schema["properties"]["tool_calls"]["items"]["properties"]
        call["arguments"]["properties"]["city"]["maxLength"] = 40 + k
    else:  # the year's first digit at most 9 - k
        return "regex", DATE_REGEX.replace(r"\d{4}", rf"[0-{max(1, 9 - k)}]\d{{3}}", 1)
    return "json_schema", schema


def check_schema(value: Any, schema: dict[str, Any], where: str = "$") -> str | None:
    """The JSON Schema keywords used above; None when `value` conforms, else the first
    reason it does not."""
    types = {"object": dict, "array": list, "string": str, "integer": int,
             "number": (int, float)}
    kind = schema.get("type")
    if kind and (not isinstance(value, types[kind]) or isinstance(value, bool)
                 or (kind == "integer" and not isinstance(value, int))):
        return f"{where}: not of type {kind}"
    if "const" in schema and value != schema["const"]:
        return f"{where}: not {schema['const']!r}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where}: not one of {schema['enum']}"
    if isinstance(value, str) and not (schema.get("minLength", 0) <= len(value)
                                       <= schema.get("maxLength", len(value))):
        return f"{where}: length {len(value)} out of bounds"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not (
            schema.get("minimum", value) <= value <= schema.get("maximum", value)):
        return f"{where}: {value} out of bounds"
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            return f"{where}: {len(value)} items"
        for i, item in enumerate(value):
            if "items" in schema and (err := check_schema(item, schema["items"],
                                                          f"{where}[{i}]")):
                return err
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                return f"{where}: no {key!r}"
        for key, item in value.items():
            if key in props:
                if err := check_schema(item, props[key], f"{where}.{key}"):
                    return err
            elif schema.get("additionalProperties", True) is False:
                return f"{where}: unexpected {key!r}"
    return None


def schema_error(value: Any, schema: dict[str, Any]) -> str | None:
    try:
        import jsonschema
    except ImportError:
        return check_schema(value, schema)
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        return exc.message
    return None


def validity(grammar: tuple[str, Any], text: str) -> str | None:
    """None when the output is what the grammar promises, else why not."""
    kind, spec = grammar
    if kind == "regex":
        return None if re.fullmatch(spec, text) else "no full match"
    try:
        value = json.loads(text)
    except ValueError as exc:
        return f"json.loads: {exc}"
    return schema_error(value, spec)


class Bench:
    def __init__(self, model: Path, max_new_tokens: int) -> None:
        import openvino_genai as ov_genai

        self.g = ov_genai
        sc = ov_genai.SchedulerConfig()
        sc.cache_size = 1
        started = time.perf_counter()
        self.pipe = ov_genai.ContinuousBatchingPipeline(str(model), sc, "CPU", {})
        self.load_seconds = time.perf_counter() - started
        self.tok = self.pipe.get_tokenizer()
        self.prompts = []
        for text in PROMPTS:
            rendered = self.tok.apply_chat_template([{"role": "user", "content": text}],
                                                    add_generation_prompt=True)
            self.prompts.append(self.tok.encode(rendered, add_special_tokens=False).input_ids)
        self.max_new_tokens = max_new_tokens
        self.ids = itertools.count()

    def config(self, name: str, fresh: int = 0, max_new_tokens: int = 0) -> Any:
        """The GenerationConfig of a configuration; `fresh` > 0: a variant of its grammar
        (see variant())."""
        gc = self.g.GenerationConfig(max_new_tokens=max_new_tokens or self.max_new_tokens,
                                     do_sample=False)
        spec = CONFIGS[name]
        if spec is None:
            gc.ignore_eos = True
            return gc
        kind, value = variant(name, fresh) if fresh else spec
        if kind == "regex":
            gc.structured_output_config = self.g.StructuredOutputConfig(regex=value)
        else:
            gc.structured_output_config = self.g.StructuredOutputConfig(
                json_schema=json.dumps(value))
        return gc

    def run(self, gcs: list[Any], prompts: list[Any]) -> dict[str, Any]:
        """Add the requests together, step until all are done. Per request: ttft, tpot
        (mean time per token after the first), tokens, text; for the batch: wall time and
        the mean step time while every request is still decoding."""
        running = self.g.GenerationStatus.RUNNING
        started = time.perf_counter()
        handles = [self.pipe.add_request(next(self.ids), p, gc)
                   for p, gc in zip(prompts, gcs, strict=True)]
        add_seconds = time.perf_counter() - started
        reqs = [{"ids": [], "first": None, "last": None, "done": False} for _ in handles]
        full_steps: list[float] = []
        while not all(r["done"] for r in reqs):
            step_start = time.perf_counter()
            all_decoding = all(r["first"] is not None and not r["done"] for r in reqs)
            self.pipe.step()
            now = time.perf_counter()
            if all_decoding:
                full_steps.append(now - step_start)
            for h, r in zip(handles, reqs, strict=True):
                if r["done"]:
                    continue
                if h.can_read():  # read() blocks when there is nothing: only after can_read
                    new = list(next(iter(h.read().values())).generated_ids)
                    if new:
                        r["ids"] += new
                        r["first"] = r["first"] or now
                        r["last"] = now
                if h.get_status() != running and not h.can_read():
                    r["done"] = True
        out = []
        for r in reqs:
            n = len(r["ids"])
            out.append({
                "ttft": r["first"] - started, "tokens": n,
                "tpot": (r["last"] - r["first"]) / (n - 1) if n > 1 else None,
                "text": self.tok.decode(r["ids"], skip_special_tokens=True)})
        return {"requests": out, "wall": time.perf_counter() - started,
                "add_seconds": add_seconds, "full_steps": full_steps}


def med(values: list[float], digits: int = 2) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), digits) if values else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL if DEFAULT_MODEL.is_dir()
                        else None, help=f"the OpenVINO IR folder (default {DEFAULT_MODEL})")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    if args.model is None:
        sys.exit(f"no model at {DEFAULT_MODEL}: run `python -m ovms_plugin pull "
                 "smollm2-135m-instruct`, then pass --model with the folder the store made "
                 "for it (by default /var/lib/aog/engine/ovms-plugin/models/"
                 "smollm2-135m-instruct; $OVMS_PLUGIN_HOME/models/... when that is set)")
    import openvino_genai as ov_genai

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from ovms_plugin.sysinfo import machine_description

    bench = Bench(args.model, args.max_new_tokens)
    print(f"loaded {args.model} in {bench.load_seconds:.2f}s", flush=True)
    names = list(CONFIGS)
    constrained = names[1:]
    p0 = bench.prompts[0]

    # Warm-up: the pipeline's first request, then the first constrained request ever
    # (XGrammar's tokenizer set-up), then the same again (its grammar now compiled).
    bench.run([bench.config("unconstrained")], [p0])
    bench.run([bench.config("unconstrained")], [p0])
    warm_ttft = bench.run([bench.config("unconstrained")], [p0])["requests"][0]["ttft"]
    first_ever = bench.run([bench.config("json_schema")], [p0])
    again = bench.run([bench.config("json_schema")], [p0])
    setup = {"unconstrained_ttft_ms": round(warm_ttft * 1e3, 1),
             "first_constrained_request_ttft_ms":
                 round(first_ever["requests"][0]["ttft"] * 1e3, 1),
             "first_constrained_add_request_ms": round(first_ever["add_seconds"] * 1e3, 2),
             "next_constrained_request_ttft_ms": round(again["requests"][0]["ttft"] * 1e3, 1)}
    print("set-up:", setup, flush=True)

    single: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    compile_: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    batch: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    checks: dict[str, dict[str, Any]] = {n: {"valid": 0, "invalid": 0, "length": 0,
                                             "failures": [], "samples": []}
                                         for n in constrained}

    def check(name: str, req: dict[str, Any], fresh: int = 0) -> None:
        if name == "unconstrained":
            return
        c = checks[name]
        if req["tokens"] >= args.max_new_tokens:
            c["length"] += 1
        grammar = variant(name, fresh) if fresh else CONFIGS[name]
        if (err := validity(grammar, req["text"])) is None:  # type: ignore[arg-type]
            c["valid"] += 1
        else:
            c["invalid"] += 1
            if len(c["failures"]) < 3:
                c["failures"].append({"text": req["text"], "error": err})
        if req["text"] not in c["samples"] and len(c["samples"]) < 2:
            c["samples"].append(req["text"])

    started = time.perf_counter()
    for rnd in range(args.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:  # first token only: a grammar not compiled yet, then the same
            fresh = rnd + 1 if name != "unconstrained" else 0
            cold = bench.run([bench.config(name, fresh, 1)], [p0])
            warm = bench.run([bench.config(name, fresh, 1)], [p0])
            compile_[name].append({"cold_ttft": cold["requests"][0]["ttft"],
                                   "warm_ttft": warm["requests"][0]["ttft"],
                                   "cold_add": cold["add_seconds"],
                                   "warm_add": warm["add_seconds"]})
        for prompt in bench.prompts:  # one request at a time, configurations alternating
            for name in order:
                req = bench.run([bench.config(name)], [prompt])["requests"][0]
                single[name].append({"round": rnd, **{key: req[key] for key in
                                                      ("ttft", "tpot", "tokens")}})
                check(name, req)
        for name in order:  # batch of 4, the configuration's grammar already compiled
            prompts = [bench.prompts[i % 2] for i in range(BATCH)]
            res = bench.run([bench.config(name) for _ in prompts], prompts)
            tokens = sum(r["tokens"] for r in res["requests"])
            batch[name].append({
                "round": rnd, "tokens": tokens, "tokens_per_s": tokens / res["wall"],
                "full_step": statistics.mean(res["full_steps"]) if res["full_steps"] else None})
            for req in res["requests"]:
                check(name, req)
        print(f"round {rnd + 1}/{args.rounds} done at {time.perf_counter() - started:.0f}s",
              flush=True)

    def per_round(rows: list[dict[str, Any]], key: str, rnd: int) -> float | None:
        vals = [r[key] for r in rows if r["round"] == rnd and r[key] is not None]
        return statistics.median(vals) if vals else None

    results: dict[str, Any] = {}
    for name in names:
        tpot_ratios, step_ratios, tps_ratios = [], [], []
        for rnd in range(args.rounds):
            base_tpot = per_round(single["unconstrained"], "tpot", rnd)
            tpot = per_round(single[name], "tpot", rnd)
            if base_tpot and tpot:
                tpot_ratios.append(tpot / base_tpot)
            base_step = per_round(batch["unconstrained"], "full_step", rnd)
            step = per_round(batch[name], "full_step", rnd)
            if base_step and step:
                step_ratios.append(step / base_step)
            tps_ratios.append(per_round(batch[name], "tokens_per_s", rnd)
                              / per_round(batch["unconstrained"], "tokens_per_s", rnd))
        cold = [c["cold_ttft"] * 1e3 for c in compile_[name]]
        warm = [c["warm_ttft"] * 1e3 for c in compile_[name]]
        results[name] = {
            "single": {
                "requests": len(single[name]),
                "tokens_median": med([r["tokens"] for r in single[name]], 1),
                "ttft_ms_median": med([r["ttft"] * 1e3 for r in single[name]]),
                "tpot_ms_median": med([r["tpot"] * 1e3 for r in single[name]
                                       if r["tpot"] is not None]),
                "tpot_ratio_median": med(tpot_ratios, 3),
                "tpot_ratio_per_round": [round(x, 3) for x in tpot_ratios],
                "new_grammar_ttft_ms_median": med(cold, 1),
                "same_grammar_again_ttft_ms_median": med(warm, 1),
                "new_minus_same_ttft_ms_median":
                    med([c - w for c, w in zip(cold, warm, strict=True)], 1),
                "new_grammar_add_request_ms_median":
                    med([c["cold_add"] * 1e3 for c in compile_[name]], 2),
            },
            "batch4": {
                "tokens_median": med([b["tokens"] for b in batch[name]], 1),
                "tokens_per_s_median": med([b["tokens_per_s"] for b in batch[name]], 1),
                "step_ms_all_4_decoding_median": med([b["full_step"] * 1e3 for b in batch[name]
                                                      if b["full_step"] is not None]),
                "step_ratio_median": med(step_ratios, 3),
                "tokens_per_s_ratio_median": med(tps_ratios, 3),
            },
        }
        if name in checks:
            results[name]["checks"] = checks[name]
        print(name, json.dumps(results[name]["single"]), json.dumps(results[name]["batch4"]),
              {k: checks[name][k] for k in ("valid", "invalid", "length")}
              if name in checks else "", flush=True)

    try:
        import jsonschema  # noqa: F401
        validator = "jsonschema"
    except ImportError:
        validator = "json.loads + the script's own check of the schema keywords used"
    report = {
        "command": "python benchmarks/structured_output.py " + " ".join(sys.argv[1:]),
        "machine": machine_description(),
        "cores": __import__("os").cpu_count(),
        "openvino_genai": ov_genai.__version__,
        "model": str(args.model),
        "engine": "ContinuousBatchingPipeline, CPU, SchedulerConfig cache_size=1, greedy",
        "max_new_tokens": args.max_new_tokens,
        "rounds": args.rounds,
        "prompts": PROMPTS,
        "validator": validator,
        "load_seconds": round(bench.load_seconds, 2),
        "setup": setup,
        "seconds": round(time.perf_counter() - started, 1),
        "results": results,
        "schemas": {n: spec[1] for n, spec in CONFIGS.items() if spec},
        "raw": {"single": single, "grammar_ttft": compile_, "batch4": batch},
    }
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
