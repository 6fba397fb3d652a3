"""Worst front-end event-loop stall while a ~100k-character prompt arrives during 16
streaming chats (issue 13, item 4).

    python benchmarks/loop_stall.py --before-tree /tmp/loopstall-before \
        [--after-tree DIR] [--rounds 3] [--big 5]

The standalone HTTP server (`python -m ovms_plugin serve`, one front-end process plus the
SmolLM2-135M-Instruct engine worker) on 127.0.0.1 with a free port. Per server run: 16
streaming chats (ignore_eos, bounded by max_tokens and by time), /health polled every
10 ms, then `--big` times, 1.5 s apart, one chat whose user message is `--prompt-chars`
characters of varied English-like words (max_tokens 8). SmolLM2 has a context of 8192
tokens, so the server tokenizes that prompt and refuses it (400, "the prompt has N
tokens"): its cost is the template rendering and the tokenization, which is the point.

For each big prompt, the window is from sending it to its answer + 20 ms (100 ms at least).
Measured in it: the largest gap between consecutive streamed chunks of any of the 16
streams (gaps that overlap the window), and the largest /health latency (polls that
overlap it; the poller is a thread of its own with a keep-alive connection). The baseline
is the same figures over consecutive 100 ms windows of the 2 s before the first big prompt
(their median per run). `--prompt-chars` takes several sizes (each sent `--big` times per
run, alternating).

"before" and "after" are two source trees (`git worktree add /tmp/loopstall-before HEAD`;
"after" defaults to this tree), each run by putting it first on PYTHONPATH. Before the
measurement each server gets one long prompt (the code after the change starts its prompt
helper process on the first). Rounds are interleaved (before, after; after, before; ...),
each a fresh server.

Writes benchmarks/loop_stall.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("loop_stall.json")
HERE = Path(__file__).resolve().parent.parent
MODEL = "smollm2"


def big_text(chars: int, seed: int) -> str:
    """Varied, English-like words (a repeated sentence would tokenize unusually well)."""
    rnd = random.Random(seed)
    syll = ["ka", "lo", "ren", "ti", "mar", "os", "vel", "un", "dra", "se", "po", "li",
            "the", "and", "for", "ing", "tion", "er", "an", "qu"]
    words = ["".join(rnd.choice(syll) for _ in range(rnd.randint(1, 4))) for _ in range(3000)]
    common = "the of and to in is that it for on with as was at by".split()
    out: list[str] = []
    n = 0
    while n < chars:
        w = rnd.choice(common) if rnd.random() < 0.35 else rnd.choice(words)
        if rnd.random() < 0.06:
            w += rnd.choice([".", ",", ";", "?"])
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[:chars]


class Server:
    """`python -m ovms_plugin serve` from the given source tree."""

    def __init__(self, tree: Path, home: Path) -> None:
        env = {**os.environ, "OVMS_PLUGIN_HOME": str(home),
               "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ovms_plugin", "serve", "--port", "0", "--model", MODEL,
             "--idle-unload", "0", "--models-dir", str(home / "models")],
            cwd=tree, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        self.port = 0
        deadline = time.monotonic() + 60
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("the server exited before listening")
            if "listening on http://" in line:
                self.port = int(line.split("listening on http://", 1)[1].split()[0]
                                .rsplit(":", 1)[1])
                break
        if not self.port:
            raise RuntimeError("the server did not listen within 60 s")
        # Keep draining its log so it never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


WINDOW = 0.100  # seconds: the shortest window a figure is taken over
QUIET = 2.0  # seconds of the 16 streams alone before the first big prompt


async def measure(port: int, streams: int, big: int, sizes: list[int],
                  seed: int) -> dict[str, Any]:
    import aiohttp

    base = f"http://127.0.0.1:{port}"
    timeout = aiohttp.ClientTimeout(total=120)
    conn = aiohttp.TCPConnector(limit=streams + 8)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        deadline = time.monotonic() + 120
        while True:  # /ready: the model is loaded
            async with session.get(f"{base}/ready") as r:
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the model did not load")
            await asyncio.sleep(0.2)
        chat = {"model": MODEL, "temperature": 0, "max_tokens": 8,
                "messages": [{"role": "user", "content": "Say hello."}]}
        async with session.post(f"{base}/v1/chat/completions", json=chat) as r:
            assert r.status == 200, await r.text()  # warm-up

        def big_body(chars: int, text_seed: int) -> bytes:
            return json.dumps({"model": MODEL, "max_tokens": 8, "messages": [
                {"role": "user", "content": big_text(chars, text_seed)}]}).encode()

        # Built before anything is measured: building them takes this process's loop.
        bodies = {(k, chars): big_body(chars, seed * 100 + k)
                  for k in range(big) for chars in sizes}

        async def big_chat(data: bytes) -> tuple[float, float, str]:
            started = time.perf_counter()
            async with session.post(f"{base}/v1/chat/completions", data=data,
                                    headers={"Content-Type": "application/json"}) as r:
                answer = await r.text()
            ended = time.perf_counter()
            said = json.loads(answer)["error"]["message"][:60] if r.status != 200 else ""
            return started, ended, f"{r.status} {said}".strip()

        # A long prompt first, outside the measurement: the code after the change starts
        # its prompt helper process on the first one (about 1.5 s, off the event loop).
        started, ended, _ = await big_chat(big_body(max(sizes), -1))
        first_ms = (ended - started) * 1000

        arrivals: list[list[float]] = [[] for _ in range(streams)]
        stop = asyncio.Event()

        async def stream(i: int) -> None:
            body = {"model": MODEL, "stream": True, "ignore_eos": True, "max_tokens": 4000,
                    "temperature": 0.7, "seed": i,
                    "messages": [{"role": "user",
                                  "content": f"Tell me a long story about ship number {i}."}]}
            async with session.post(f"{base}/v1/chat/completions", json=body) as r:
                assert r.status == 200, await r.text()
                async for line in r.content:
                    if line.startswith(b"data: "):
                        arrivals[i].append(time.perf_counter())
                    if stop.is_set():
                        return

        polls: list[tuple[float, float]] = []  # (sent, answered)
        polling = threading.Event()

        def poll_health() -> None:
            """Its own thread and keep-alive connection: the streams' event loop in this
            process does not delay it."""
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            while not polling.is_set():
                sent = time.perf_counter()
                conn.request("GET", "/health")
                conn.getresponse().read()
                polls.append((sent, time.perf_counter()))
                time.sleep(max(0.0, 0.010 - (time.perf_counter() - sent)))
            conn.close()

        poller = threading.Thread(target=poll_health, daemon=True)
        poller.start()
        tasks = [asyncio.create_task(stream(i)) for i in range(streams)]
        while min(len(a) for a in arrivals) < 5:  # every stream is producing
            for t in tasks:
                if t.done():
                    t.result()
            await asyncio.sleep(0.05)
        await asyncio.sleep(QUIET)
        quiet_end = time.perf_counter()
        bigs: list[tuple[int, float, float, str]] = []
        for k in range(big):
            for chars in sizes:
                started, ended, said = await big_chat(bodies[k, chars])
                bigs.append((chars, started, ended, said))
                await asyncio.sleep(1.5)
        stop.set()
        polling.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(poller.join)

    def stream_gap(lo: float, hi: float) -> float:
        """The longest wait for a chunk, over the streams, that overlaps [lo, hi]."""
        return max((b - a for times in arrivals for a, b in itertools.pairwise(times)
                    if b > lo and a < hi), default=float("nan"))

    def health_worst(lo: float, hi: float) -> float:
        return max((b - a for a, b in polls if b > lo and a < hi), default=float("nan"))

    def ms(x: float) -> float:
        return round(x * 1000, 1)

    # Baseline: consecutive WINDOW-long windows over the quiet seconds.
    quiet = [(quiet_end - QUIET + i * WINDOW, quiet_end - QUIET + (i + 1) * WINDOW)
             for i in range(int(QUIET / WINDOW))]
    base_health = [health_worst(lo, hi) for lo, hi in quiet]
    base_gap = [stream_gap(lo, hi) for lo, hi in quiet]
    return {
        "first_long_prompt_ms": ms(first_ms / 1000),
        "baseline": {"health_max_ms": {"median": ms(statistics.median(base_health)),
                                       "max": ms(max(base_health))},
                     "stream_gap_max_ms": {"median": ms(statistics.median(base_gap)),
                                           "max": ms(max(base_gap))},
                     "stream_gap_median_ms": ms(statistics.median(
                         b - a for times in arrivals for a, b in itertools.pairwise(times)
                         if quiet_end - QUIET < a < quiet_end))},
        # Each big prompt's window: from sending it to its answer + 20 ms, WINDOW at least.
        "big_prompts": [{"chars": chars, "request_ms": ms(ended - started),
                         "stream_gap_max_ms": ms(stream_gap(
                             started, max(started + WINDOW, ended + 0.020))),
                         "health_max_ms": ms(health_worst(
                             started, max(started + WINDOW, ended + 0.020))),
                         "answer": said}
                        for chars, started, ended, said in bigs],
    }


def summarize(runs: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    def stats(vals: list[float]) -> dict[str, float]:
        return {"median": round(statistics.median(vals), 1), "max": max(vals)}

    out: dict[str, Any] = {}
    for chars in sizes:
        out[f"{chars}_chars"] = {
            key: stats([b[key] for run in runs for b in run["big_prompts"]
                        if b["chars"] == chars])
            for key in ("health_max_ms", "stream_gap_max_ms", "request_ms")}
    out["baseline_windows"] = {
        "health_max_ms": stats([run["baseline"]["health_max_ms"]["median"] for run in runs]),
        "stream_gap_max_ms": stats([run["baseline"]["stream_gap_max_ms"]["median"]
                                    for run in runs]),
        "note": f"per run, the median over {int(QUIET / WINDOW)} windows of "
                f"{WINDOW * 1000:.0f} ms without a big prompt; then median and max over runs"}
    out["stream_gap_median_ms"] = stats([run["baseline"]["stream_gap_median_ms"]
                                         for run in runs])
    out["first_long_prompt_ms"] = stats([run["first_long_prompt_ms"] for run in runs])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before-tree", type=Path, required=True,
                        help="source tree of the code before the change (a git worktree)")
    parser.add_argument("--after-tree", type=Path, default=HERE,
                        help="source tree of the code after the change (default: this one)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--big", type=int, default=5, help="big prompts per server run")
    parser.add_argument("--prompt-chars", type=int, nargs="+", default=[100_000],
                        help="sizes of the big prompts (each size --big times per run)")
    args = parser.parse_args()

    from ovms_plugin import devmodels
    from ovms_plugin.store.pull import PullRequest, pull
    from ovms_plugin.store.store import ModelStore
    from ovms_plugin.sysinfo import machine_description

    folder = devmodels.ensure_models(devmodels.default_cache_dir(),
                                     [devmodels.SMOLLM2])[devmodels.SMOLLM2]
    trees = {"before": args.before_tree.resolve(), "after": args.after_tree.resolve()}
    results: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        (home / "settings.yaml").write_text(
            json.dumps({"models": {MODEL: {"scheduler": {"cache_size": 1}}}}))
        pull(ModelStore(home / "models"), PullRequest(model=str(folder), name=MODEL),
             lambda m: None)
        for r in range(args.rounds):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for variant in order:
                server = Server(trees[variant], home)
                try:
                    run = asyncio.run(measure(server.port, args.streams, args.big,
                                              args.prompt_chars, seed=r))
                finally:
                    server.stop()
                run["round"] = r + 1
                results[variant].append(run)
                print(variant, json.dumps(run), flush=True)

    report = {
        "machine": machine_description(),
        "command": f"python benchmarks/loop_stall.py --before-tree {args.before_tree} "
                   + ("" if args.after_tree.resolve() == HERE else
                      f"--after-tree {args.after_tree} ")
                   + f"--rounds {args.rounds} --streams {args.streams} --big {args.big} "
                   f"--prompt-chars {' '.join(map(str, args.prompt_chars))}",
        "trees": {v: {"path": str(t), "commit": subprocess.run(
            ["git", "-C", str(t), "rev-parse", "HEAD"], capture_output=True,
            text=True).stdout.strip(), "runtime_py_sha256": hashlib.sha256(
            (t / "ovms_plugin/service/runtime.py").read_bytes()).hexdigest()}
            for v, t in trees.items()},
        "server": "python -m ovms_plugin serve (HTTP, 127.0.0.1), model smollm2 "
                  "(SmolLM2-135M-Instruct IR from devmodels), scheduler cache_size 1",
        "load": f"{args.streams} streaming chats (ignore_eos, temperature 0.7) + /health "
                f"every 10 ms; per server run {args.big} chats of each of "
                f"{args.prompt_chars} characters, 1.5 s apart, max_tokens 8",
        "summary": {v: summarize(runs, args.prompt_chars) for v, runs in results.items()},
        "runs": results,
    }
    OUT.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["summary"], indent=1))


if __name__ == "__main__":
    main()
