"""Where a decode step's time goes: the model's IR compiled with PERF_COUNT, a prompt
prefilled, then decode steps of `--batch` sequences, the per-layer-type times of the last
step summed (OpenVINO's own profiling), and the median step time.

    python benchmarks/decode_profile.py --model DIR [--batch 1] [--props '{}']
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=60)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--props", default="{}")
    args = p.parse_args()
    import numpy as np
    import openvino as ov
    compiled = ov.Core().compile_model(f"{args.model}/openvino_model.xml", "CPU",
                                       {"PERF_COUNT": True, **json.loads(args.props)})
    req = compiled.create_infer_request()
    b, n = args.batch, args.prompt
    rng = np.random.default_rng(0)
    req.reset_state()
    req.infer({"input_ids": rng.integers(100, 1000, (b, n)).astype(np.int64),
               "attention_mask": np.ones((b, n), np.int64),
               "position_ids": np.tile(np.arange(n, dtype=np.int64), (b, 1)),
               "beam_idx": np.arange(b, dtype=np.int32)})
    times = []
    for i in range(args.steps):
        started = time.perf_counter()
        req.infer({"input_ids": np.full((b, 1), 500, np.int64),
                   "attention_mask": np.ones((b, n + i + 1), np.int64),
                   "position_ids": np.full((b, 1), n + i, np.int64),
                   "beam_idx": np.arange(b, dtype=np.int32)})
        times.append(time.perf_counter() - started)
    by_type: collections.Counter[tuple[str, str]] = collections.Counter()
    count: collections.Counter[tuple[str, str]] = collections.Counter()
    for info in req.profiling_info:
        us = info.real_time.total_seconds() * 1e6
        if us > 0:
            by_type[(info.node_type, info.exec_type)] += us
            count[(info.node_type, info.exec_type)] += 1
    print(f"batch {b}: decode step median {statistics.median(times) * 1000:.2f} ms, "
          f"min {min(times) * 1000:.2f} ms; the last step by layer type:")
    for (node, kernel), us in by_type.most_common(8):
        print(f"  {us / 1000:8.2f} ms  {count[(node, kernel)]:4d} x {node} ({kernel})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
