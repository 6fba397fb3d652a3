"""Handshake time and one chat request's latency on the tiny model, through the plugin
launched as AOG launches it. Writes benchmarks/latency_tiny.json.

    python benchmarks/latency_tiny.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from ovms_plugin import __version__, devmodels
from ovms_plugin.aog.host import AogHost, SseReader
from ovms_plugin.aog.install import install
from ovms_plugin.store import pull
from ovms_plugin.store.store import ModelStore
from ovms_plugin.sysinfo import machine_description

OUT = Path(__file__).with_name("latency_tiny.json")


def summary(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"mean_ms": round(statistics.mean(xs) * 1000, 2),
            "p50_ms": round(xs[len(xs) // 2] * 1000, 2),
            "p90_ms": round(xs[int(len(xs) * 0.9)] * 1000, 2), "n": len(xs)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    model = devmodels.ensure_models(devmodels.default_cache_dir(), ["tiny-chat"])["tiny-chat"]
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        pull.pull(ModelStore(home / "models"), pull.PullRequest(model=str(model),
                                                                name="tiny-chat"), lambda m: None)
        plugin = install(home / "plugins")
        env = {"OVMS_PLUGIN_HOME": str(home)}
        handshakes, kills = [], []
        for _ in range(5):
            host = AogHost(plugin, env=env).start()
            handshakes.append(host.handshake_seconds)
            kills.append(host.kill())
        host = AogHost(plugin, env=env).start()
        try:
            started = time.monotonic()
            host.json_call("LoadModel", {"model": "tiny-chat"})
            load = time.monotonic() - started
            started = time.monotonic()
            host.json_call("LoadModel", {"model": "tiny-chat"})
            reload = time.monotonic() - started
            msgs = [{"role": "user", "content": "Hello, how are you today?"}]
            unary, ttft = [], []
            for i in range(args.runs):
                body = {"model": "tiny-chat", "messages": msgs, "max_tokens": 16,
                        "ignore_eos": True, "seed": i}
                started = time.monotonic()
                r = host.invoke("chat", body)
                assert r.code == 0, r.message
                unary.append(time.monotonic() - started)
                started = time.monotonic()
                reader = SseReader(host.invoke_stream("chat", {**body, "stream": True}))
                next(reader.events())
                ttft.append(time.monotonic() - started)
                list(reader.events())
        finally:
            host.kill()
    result = {
        "machine": machine_description(),
        "plugin": __version__, "command": "python benchmarks/latency_tiny.py",
        "handshake": summary(handshakes), "kill_shutdown": summary(kills),
        "load_model_first_s": round(load, 3), "load_model_again_ms": round(reload * 1000, 2),
        "chat_unary_16_tokens": summary(unary), "chat_stream_ttft": summary(ttft),
    }
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
