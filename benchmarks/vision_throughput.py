"""Vision chat throughput through the plugin against the pipeline's own offline ceiling
(issue 18), on the tiny offline vision-language model (LLaVA shape, random weights), at
concurrency 1, 4 and 16, in interleaved rounds (the order alternates each round).

    python benchmarks/vision_throughput.py [--rounds 3] [--tokens 32] [--json FILE]

Plugin: launched as AOG launches it; each of `c` client threads sends streamed chat
requests (InvokeServiceStream), one image each (every request its own picture), greedy,
`ignore_eos`, `--tokens` new tokens, until 2c requests (at least 8) are answered; output
tokens per second of wall time, TTFT and the time between tokens from the stream.
Ceiling: the same model in a ContinuousBatchingPipeline in this process, with the same
scheduler, the same prompts (rendered by the model's chat template as the plugin renders
them) and images all added at once and stepped to the end: the most the engine gives.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

SCHEDULER = {"cache_size": 1, "max_num_batched_tokens": 256, "max_num_seqs": 64,
             "dynamic_split_fuse": True, "enable_prefix_caching": True}
PROMPT = "What is in the picture? Describe it."


def picture(i: int) -> np.ndarray:
    return np.random.default_rng(1000 + i).integers(0, 256, (56, 56, 3), dtype=np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import openvino as ov
    import openvino_genai as ov_genai
    import yaml
    from PIL import Image

    from ovms_plugin import devmodels
    from ovms_plugin.aog.host import AogHost, SseReader
    from ovms_plugin.aog.install import install
    from ovms_plugin.service.text import IMAGE_TAG
    from ovms_plugin.store import pull
    from ovms_plugin.store.store import ModelStore
    from ovms_plugin.sysinfo import machine_description

    levels = [int(x) for x in args.levels.split(",")]
    model = devmodels.ensure_models(devmodels.default_cache_dir(),
                                    [devmodels.TINY_VLM])[devmodels.TINY_VLM]
    n_max = max(max(8, 2 * c) for c in levels)
    pngs = []
    for i in range(n_max):
        buf = io.BytesIO()
        Image.fromarray(picture(i)).save(buf, "PNG")
        pngs.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())

    # --- the ceiling -------------------------------------------------------------------
    sc = ov_genai.SchedulerConfig()
    for k, v in SCHEDULER.items():
        setattr(sc, k, v)
    cb = ov_genai.ContinuousBatchingPipeline(str(model), sc, "CPU",
                                             {"INFERENCE_PRECISION_HINT": "f32"})
    tok = cb.get_tokenizer()
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": IMAGE_TAG.format(0) + PROMPT}], add_generation_prompt=True)

    def ceiling(c: int) -> dict[str, Any]:
        n = max(8, 2 * c)
        gc = ov_genai.GenerationConfig(max_new_tokens=args.tokens, ignore_eos=True,
                                       do_sample=False, apply_chat_template=False)
        started = time.perf_counter()
        handles = []
        done = 0
        next_i = 0
        while done < n:
            while next_i < n and len(handles) - done < c:
                handles.append(cb.add_request(next_i, rendered, [ov.Tensor(picture(next_i))], gc))
                next_i += 1
            cb.step()
            done = sum(1 for h in handles if h.get_status() ==
                       ov_genai.GenerationStatus.FINISHED)
        wall = time.perf_counter() - started
        tokens = sum(len(h.read_all()[0].generated_ids) for h in handles)
        return {"requests": n, "tokens": tokens, "seconds": round(wall, 3),
                "tokens_per_s": round(tokens / wall, 1)}

    results: dict[str, Any] = {"plugin": {c: [] for c in levels},
                               "ceiling": {c: [] for c in levels}}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        pull.pull(ModelStore(home / "models"), pull.PullRequest(model=str(model), name="vlm"),
                  lambda m: None)
        (home / "settings.yaml").write_text(yaml.safe_dump({"models": {"vlm": {
            "scheduler": SCHEDULER, "properties": {"INFERENCE_PRECISION_HINT": "f32"}}}}))
        host = AogHost(install(home / "plugins"), env={"OVMS_PLUGIN_HOME": str(home)}).start()

        def one(i: int, ttfts: list, gaps: list, counts: list) -> None:
            body = {"model": "vlm", "stream": True, "temperature": 0, "ignore_eos": True,
                    "max_tokens": args.tokens, "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": pngs[i]}},
                        {"type": "text", "text": PROMPT}]}]}
            started = time.perf_counter()
            last = None
            reader = SseReader(host.invoke_stream("chat", body, timeout=600))
            for e in reader.events():
                now = time.perf_counter()
                if e["choices"] and e["choices"][0]["delta"].get("content"):
                    if last is None:
                        ttfts.append(now - started)
                    else:
                        gaps.append(now - last)
                    last = now
                if e.get("usage"):
                    counts.append(e["usage"]["completion_tokens"])
            assert reader.error is None, reader.error

        def plugin(c: int) -> dict[str, Any]:
            n = max(8, 2 * c)
            todo = list(range(n))
            lock = threading.Lock()
            ttfts: list[float] = []
            gaps: list[float] = []
            counts: list[int] = []

            def worker() -> None:
                while True:
                    with lock:
                        if not todo:
                            return
                        i = todo.pop(0)
                    one(i, ttfts, gaps, counts)

            started = time.perf_counter()
            threads = [threading.Thread(target=worker) for _ in range(c)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            wall = time.perf_counter() - started
            tokens = sum(counts)
            return {"requests": n, "tokens": tokens, "seconds": round(wall, 3),
                    "tokens_per_s": round(tokens / wall, 1),
                    "ttft_ms_median": round(1000 * statistics.median(ttfts), 1),
                    "itl_ms_median": round(1000 * statistics.median(gaps), 2) if gaps else None}

        try:
            for c in levels:  # warm both
                plugin(c)
                ceiling(c)
            for r in range(args.rounds):
                for c in levels:
                    for side in ((0, 1) if (r + c) % 2 == 0 else (1, 0)):
                        if side == 0:
                            results["plugin"][c].append(plugin(c))
                        else:
                            results["ceiling"][c].append(ceiling(c))
        finally:
            host.kill()

    summary = {}
    for c in levels:
        p = statistics.median(x["tokens_per_s"] for x in results["plugin"][c])
        k = statistics.median(x["tokens_per_s"] for x in results["ceiling"][c])
        summary[str(c)] = {
            "plugin_tokens_per_s": p, "ceiling_tokens_per_s": k, "ratio": round(p / k, 3),
            "plugin_ttft_ms": statistics.median(x["ttft_ms_median"]
                                                for x in results["plugin"][c]),
            "plugin_itl_ms": statistics.median(x["itl_ms_median"] for x in results["plugin"][c]
                                               if x["itl_ms_median"] is not None)}
    out = {"command": "python benchmarks/vision_throughput.py " + " ".join(argv or sys.argv[1:]),
           "machine": machine_description(), "openvino": ov.get_version(),
           "model": "tiny-vlm (LLaVA shape, random weights, 56x56 images)",
           "tokens_per_request": args.tokens, "rounds": args.rounds, "scheduler": SCHEDULER,
           "summary": summary,
           "rounds_detail": {side: {str(c): v for c, v in d.items()}
                             for side, d in results.items()}}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
