"""Engine levers for one user (concurrency 1), measured in interleaved rounds: each variant
is a model folder with OpenVINO properties, run through LLMPipeline and/or a
ContinuousBatchingPipeline driven step by step from Python (as the plugin's engine worker
drives it), on the same ~60-token chat prompt, greedy, `ignore_eos`.

    python benchmarks/engine_levers.py --model smollm2=DIR \
        --variant 'f32={"INFERENCE_PRECISION_HINT": "f32"}' --variant 'default={}' \
        --engine both --rounds 5 --json benchmarks/engine_levers.json

A variant may name its own model: --variant 'int8@m8={}' with --model m8=DIR.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

PROMPT = ("Request 3: the local model answers questions about laptops graphics memory "
          "tokens cache batching engines drivers kernels images vectors search documents "
          "stories the local model answers questions about laptops graphics")


def _config(g: Any, tokens: int) -> Any:
    return g.GenerationConfig(max_new_tokens=tokens, do_sample=False, ignore_eos=True)


def _llm(g: Any, ov: Any, pipe: Any, ids: Any, tokens: int) -> tuple[float, float]:
    pm = pipe.generate(ov.Tensor(ids), _config(g, tokens)).perf_metrics
    return pm.get_ttft().mean, pm.get_tpot().mean


def _cb(g: Any, ov: Any, pipe: Any, ids: Any, tokens: int, counter: list[int]
        ) -> tuple[float, float]:
    counter[0] += 1
    started = time.perf_counter()
    handle = pipe.add_request(counter[0], ov.Tensor(ids), _config(g, tokens))
    first, n = None, 0
    while True:
        pipe.step()
        if handle.can_read():
            n += len(next(iter(handle.read().values())).generated_ids)
            if first is None and n:
                first = time.perf_counter()
        if handle.get_status() != g.GenerationStatus.RUNNING:
            break
    assert first is not None and n > 1
    return (first - started) * 1000, (time.perf_counter() - first) * 1000 / (n - 1)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", action="append", required=True, help="NAME=DIR")
    p.add_argument("--variant", action="append", required=True,
                   help="NAME[@MODEL]=JSON properties")
    p.add_argument("--engine", choices=["llm", "cb", "both"], default="both")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    import numpy as np
    import openvino as ov
    import openvino_genai as g
    models = dict(m.split("=", 1) for m in args.model)
    first_model = next(iter(models))
    variants = []
    for v in args.variant:
        name, props = v.split("=", 1)
        name, _, model = name.partition("@")
        variants.append((name, models[model or first_model], json.loads(props)))
    engines = ["llm", "cb"] if args.engine == "both" else [args.engine]
    tok = g.Tokenizer(models[first_model])
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                   add_generation_prompt=True)
    ids = np.asarray(tok.encode(text, add_special_tokens=False).input_ids.data)
    pipes, runs = {}, {}
    counter = [0]
    for name, folder, props in variants:
        for engine in engines:
            key = f"{name}/{engine}"
            if engine == "llm":
                pipe = g.LLMPipeline(folder, "CPU", **props)
                runs[key] = lambda pipe=pipe: _llm(g, ov, pipe, ids, args.tokens)
            else:
                sc = g.SchedulerConfig()
                sc.num_kv_blocks, sc.max_num_batched_tokens = 256, 256
                sc.dynamic_split_fuse, sc.enable_prefix_caching = True, False
                pipe = g.ContinuousBatchingPipeline(folder, sc, "CPU", props)
                runs[key] = lambda pipe=pipe: _cb(g, ov, pipe, ids, args.tokens, counter)
            pipes[key] = pipe
            runs[key]()  # warm-up
    figures: dict[str, dict[str, list[float]]] = {k: {"ttft_ms": [], "tpot_ms": []}
                                                   for k in runs}
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for key in order:
            ttft, tpot = runs[key]()
            figures[key]["ttft_ms"].append(round(ttft, 2))
            figures[key]["tpot_ms"].append(round(tpot, 2))
    result = {"command": " ".join(["python", *sys.argv]), "prompt_tokens": int(ids.shape[1]),
              "new_tokens": args.tokens, "rounds": args.rounds,
              "variants": {name: {"model": str(folder), "properties": props}
                           for name, folder, props in variants}, "results": {}}
    for key, f in figures.items():
        row = {"median_ttft_ms": round(statistics.median(f["ttft_ms"]), 2),
               "median_tpot_ms": round(statistics.median(f["tpot_ms"]), 2), **f}
        result["results"][key] = row
        print(f"{key:32s} TTFT {row['median_ttft_ms']:8.2f} ms  TPOT "
              f"{row['median_tpot_ms']:7.2f} ms  {f['tpot_ms']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
