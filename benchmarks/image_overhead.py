"""Overhead of the plugin over calling Text2ImagePipeline directly (issue 5): the same
model, size, steps and seed, one image at a time; the plugin is launched as AOG launches
it and called with InvokeService, as AOG calls it.

    python benchmarks/image_overhead.py [--size 128] [--steps 20] [--runs 10]

Writes benchmarks/image_overhead.json. Target: plugin <= direct x 1.05 + 50 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).with_name("image_overhead.json")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    import openvino_genai as ov_genai

    from ovms_plugin import devmodels
    from ovms_plugin.aog.host import AogHost
    from ovms_plugin.aog.install import install
    from ovms_plugin.store import pull
    from ovms_plugin.store.store import ModelStore
    from ovms_plugin.sysinfo import machine_description

    sd = devmodels.ensure_models(devmodels.default_cache_dir(), ["tiny-sd"])["tiny-sd"]
    size, steps = args.size, args.steps
    pipe = ov_genai.Text2ImagePipeline(str(sd), "CPU")
    pipe.generate("warm", width=size, height=size, num_inference_steps=steps,
                  generator=ov_genai.TorchGenerator(1))
    direct = []
    for i in range(args.runs):
        started = time.perf_counter()
        pipe.generate(f"a red cat {i}", width=size, height=size, num_inference_steps=steps,
                      generator=ov_genai.TorchGenerator(i))
        direct.append(time.perf_counter() - started)
    del pipe

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        pull.pull(ModelStore(home / "models"), pull.PullRequest(model=str(sd), name="sd"),
                  lambda m: None)
        host = AogHost(install(home / "plugins"), env={"OVMS_PLUGIN_HOME": str(home)}).start()
        try:
            assert host.json_call("LoadModel", {"model": "sd"}).code == 0
            body = {"model": "sd", "size": f"{size}x{size}", "num_inference_steps": steps}
            host.invoke("text-to-image", {**body, "prompt": "warm", "rng_seed": 1})
            plugin = []
            for i in range(args.runs):
                started = time.perf_counter()
                r = host.invoke("text-to-image", {**body, "prompt": f"a red cat {i}",
                                                  "rng_seed": i}, timeout=300)
                plugin.append(time.perf_counter() - started)
                assert r.code == 0, r.message
        finally:
            host.kill()
    d, p = statistics.mean(direct), statistics.mean(plugin)
    result = {"machine": machine_description(), "model": "tiny-sd (devmodels)",
              "size": f"{size}x{size}", "steps": steps, "runs": args.runs,
              "command": f"python benchmarks/image_overhead.py --size {size} --steps {steps} "
                         f"--runs {args.runs}",
              "direct_mean_ms": round(d * 1000, 1), "plugin_mean_ms": round(p * 1000, 1),
              "overhead_ms": round((p - d) * 1000, 1),
              "overhead_pct": round((p / d - 1) * 100, 1),
              "target_met": p <= d * 1.05 + 0.05}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
