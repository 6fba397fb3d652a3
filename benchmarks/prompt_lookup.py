"""Prompt-lookup decoding (llm.prompt_lookup) against plain decoding, on two workloads:
an answer that copies the prompt (repeat/edit a paragraph) and free generation (a story).
One ContinuousBatchingPipeline of each, driven step by step as the plugin's engine worker
drives it, greedy, interleaved rounds; the output must be the same token for token.

    python benchmarks/prompt_lookup.py --model DIR [--tokens 96] [--rounds 3] \
        [--assistant-tokens 5] [--ngram 3] [--json benchmarks/prompt_lookup.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

TEXT = ("The plugin loads OpenVINO models in the same process and serves chat, embeddings "
        "and images. A model manager pulls models from a hub, converts them and installs "
        "them atomically. Requests are batched continuously, so many users share one engine "
        "without waiting for each other.")
TASKS = {"copies_the_prompt": f"Repeat this text exactly, word for word:\n\n{TEXT}",
         "free_generation": "Write a short story about a robot who learns to paint."}


def run_one(g: Any, pipe: Any, ids: Any, cfg: Any, rid: list[int]) -> tuple[list[int], float,
                                                                          float, int]:
    rid[0] += 1
    started = time.perf_counter()
    handle = pipe.add_request(rid[0], ids, cfg)
    out: list[int] = []
    first = None
    steps = 0
    while True:
        pipe.step()
        steps += 1
        if handle.can_read():
            out += list(next(iter(handle.read().values())).generated_ids)
            if first is None and out:
                first = time.perf_counter()
        if handle.get_status() != g.GenerationStatus.RUNNING:
            break
    assert first is not None
    end = time.perf_counter()
    return out, (first - started) * 1000, (end - first) * 1000 / max(1, len(out) - 1), steps


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--assistant-tokens", type=int, default=5)
    p.add_argument("--ngram", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    import openvino_genai as g

    def scheduler() -> Any:
        sc = g.SchedulerConfig()
        sc.num_kv_blocks, sc.max_num_batched_tokens = 256, 256
        sc.dynamic_split_fuse, sc.enable_prefix_caching = True, False
        return sc

    tok = g.Tokenizer(args.model)
    plain = g.ContinuousBatchingPipeline(args.model, scheduler(), "CPU", {})
    lookup = g.ContinuousBatchingPipeline(args.model, scheduler(), "CPU",
                                          {"prompt_lookup": True})

    def config(assisted: bool) -> Any:
        cfg = g.GenerationConfig(max_new_tokens=args.tokens, do_sample=False)
        if assisted:
            cfg.num_assistant_tokens, cfg.max_ngram_size = args.assistant_tokens, args.ngram
        return cfg

    rid = [0]
    result: dict[str, Any] = {"command": " ".join(["python", *sys.argv]),
                              "max_new_tokens": args.tokens, "rounds": args.rounds,
                              "num_assistant_tokens": args.assistant_tokens,
                              "max_ngram_size": args.ngram, "tasks": {}}
    for task, prompt in TASKS.items():
        text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                       add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False).input_ids
        run_one(g, plain, ids, config(False), rid)  # warm-up, both
        run_one(g, lookup, ids, config(True), rid)
        figures: dict[str, list[float]] = {"plain": [], "lookup": []}
        same = True
        steps = {}
        for r in range(args.rounds):
            for name in (("plain", "lookup") if r % 2 == 0 else ("lookup", "plain")):
                out, _, tpot, n_steps = run_one(g, plain if name == "plain" else lookup, ids,
                                             config(name == "lookup"), rid)
                figures[name].append(round(tpot, 2))
                steps[name] = (len(out), n_steps)
                if name == "plain":
                    reference = out
                else:
                    answer = out
            same = same and reference == answer
        row = {"same_output": same,
               "tokens_and_steps": {k: list(v) for k, v in steps.items()},
               "plain_tpot_ms": statistics.median(figures["plain"]),
               "lookup_tpot_ms": statistics.median(figures["lookup"]), "per_round": figures}
        row["speedup"] = round(row["plain_tpot_ms"] / row["lookup_tpot_ms"], 2)
        result["tasks"][task] = row
        print(f"{task:18s} same output {same}  tokens/steps {steps}  TPOT plain "
              f"{row['plain_tpot_ms']:.2f} ms, lookup {row['lookup_tpot_ms']:.2f} ms  "
              f"speedup {row['speedup']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
