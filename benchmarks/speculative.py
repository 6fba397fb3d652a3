"""Speculative decoding with a draft model (llm.draft_model) against plain decoding, on two
workloads: an answer that copies the prompt (repeat a paragraph) and free generation (a
story). For each pair, one ContinuousBatchingPipeline of the main model alone and one with
the draft (openvino_genai.draft_model), driven step by step as the plugin's engine worker
drives them, greedy, interleaved rounds; the output must be the same token for token.

    python benchmarks/speculative.py --pair smollm2=MAIN_DIR,DRAFT_DIR [--pair ...] \
        [--tokens 96] [--rounds 5] [--assistant-tokens 3] [--json benchmarks/speculative.json]

Tokens per step (the main model's) shows how many proposals were accepted: 1 is none,
1 + assistant tokens is all of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

# The same workloads and step-by-step driver as the prompt-lookup benchmark (its folder is
# on sys.path when this runs as a script).
from prompt_lookup import TASKS, run_one


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--pair", action="append", required=True, help="NAME=MAIN_DIR,DRAFT_DIR")
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--assistant-tokens", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    import openvino_genai as g

    def scheduler() -> Any:
        sc = g.SchedulerConfig()
        sc.num_kv_blocks, sc.max_num_batched_tokens = 256, 256
        sc.dynamic_split_fuse, sc.enable_prefix_caching = True, False
        return sc

    def config(assisted: bool) -> Any:
        cfg = g.GenerationConfig(max_new_tokens=args.tokens, do_sample=False)
        if assisted:
            cfg.num_assistant_tokens = args.assistant_tokens
        return cfg

    rid = [0]
    result: dict[str, Any] = {"command": " ".join(["python", *sys.argv]),
                              "max_new_tokens": args.tokens, "rounds": args.rounds,
                              "num_assistant_tokens": args.assistant_tokens, "pairs": {}}
    for spec in args.pair:
        name, dirs = spec.split("=", 1)
        main_dir, draft_dir = dirs.split(",", 1)
        tok = g.Tokenizer(main_dir)
        plain = g.ContinuousBatchingPipeline(main_dir, scheduler(), "CPU", {})
        drafted = g.ContinuousBatchingPipeline(
            main_dir, scheduler(), "CPU", {"draft_model": g.draft_model(draft_dir, "CPU")})
        alone = g.ContinuousBatchingPipeline(draft_dir, scheduler(), "CPU", {})
        rows: dict[str, Any] = {"main": main_dir, "draft": draft_dir, "tasks": {}}
        for task, prompt in TASKS.items():
            text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                           add_generation_prompt=True)
            ids = tok.encode(text, add_special_tokens=False).input_ids
            runs = {"plain": (plain, False), "draft": (drafted, True),
                    "draft_alone": (alone, False)}
            for pipe, assisted in runs.values():  # warm-up
                run_one(g, pipe, ids, config(assisted), rid)
            tpots: dict[str, list[float]] = {k: [] for k in runs}
            outs: dict[str, list[int]] = {}
            steps: dict[str, list[int]] = {}
            same = True
            for r in range(args.rounds):
                order = list(runs) if r % 2 == 0 else list(runs)[::-1]
                for key in order:
                    pipe, assisted = runs[key]
                    out, _, tpot, n_steps = run_one(g, pipe, ids, config(assisted), rid)
                    tpots[key].append(round(tpot, 2))
                    outs[key], steps[key] = out, [len(out), n_steps]
                same = same and outs["plain"] == outs["draft"]
            agree = next((i for i, (a, b) in enumerate(zip(outs["plain"], outs["draft_alone"],
                                                           strict=False)) if a != b),
                         min(len(outs["plain"]), len(outs["draft_alone"])))
            row = {"same_output": same,
                   "draft_alone_same_first_tokens": agree,
                   "tokens_and_steps": steps,
                   "tokens_per_step_with_draft": round(steps["draft"][0] / steps["draft"][1],
                                                       2),
                   **{f"{k}_tpot_ms": statistics.median(v) for k, v in tpots.items()},
                   "per_round": tpots}
            row["speedup"] = round(row["plain_tpot_ms"] / row["draft_tpot_ms"], 2)
            rows["tasks"][task] = row
            print(f"{name:10s} {task:18s} same {same}  tokens/steps {steps}  TPOT plain "
                  f"{row['plain_tpot_ms']:.2f} ms, with draft {row['draft_tpot_ms']:.2f} ms, "
                  f"draft alone {row['draft_alone_tpot_ms']:.2f} ms  speedup "
                  f"{row['speedup']}", flush=True)
        result["pairs"][name] = rows
        del plain, drafted, alone
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
