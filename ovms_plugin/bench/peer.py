"""The bench's side-by-side mode: the plugin (`serve`, OpenAI HTTP) against a peer server
on the same model file (llama.cpp's `llama-server`, started here on the same GGUF, or any
OpenAI-compatible server already running), through the same client, with the same
prompts, in interleaved rounds; every figure is a median over the rounds and a ratio
plugin / peer.

Each round gives each system prompts of its own (a prompt seen before would be a prefix
cache hit), and alternates which system goes first.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ovms_plugin.osutil import rss_bytes

log = logging.getLogger(__name__)

START_SECONDS = 180.0  # a server that is not answering /health by then failed to start
# The figures compared, and whether more is better.
COMPARED = {"output_throughput": True, "mean_ttft_ms": False, "median_ttft_ms": False,
            "mean_tpot_ms": False, "p99_ttft_ms": False, "p99_tpot_ms": False}


def parse_peer(value: str) -> tuple[str, Path]:
    """`--peer llama-server=PATH`."""
    name, sep, path = value.partition("=")
    if not sep or name != "llama-server" or not path:
        raise argparse.ArgumentTypeError(
            f"--peer takes llama-server=PATH (the llama.cpp server binary), not {value!r}")
    return name, Path(path)


def threads() -> int:
    """The threads the plugin's engine uses (all cores, OpenVINO's default on CPU): the
    peer gets the same."""
    return os.cpu_count() or 1


def llama_server_command(binary: Path, gguf: Path, port: int, *, slots: int,
                         prompt_tokens: int, max_tokens: int) -> list[str]:
    """llama-server on the GGUF with the plugin's thread count, one slot per concurrent
    request, and a context per slot that holds the templated prompt and the answer."""
    per_slot = -(-(2 * prompt_tokens + max_tokens + 128) // 256) * 256
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(threads()), "-tb", str(threads()), "-np", str(slots),
            "-c", str(per_slot * slots), "--jinja", "--no-warmup"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health",
                                                              timeout=2) as r:
        return r.status == 200
    return False


class Server:
    """A server process on loopback, its output kept in a log file (the tail is shown if it
    fails to start)."""

    def __init__(self, name: str, command: list[str], env: dict[str, str] | None = None,
                 port: int | None = None) -> None:
        self.name = name
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (lives as long as the server)
            prefix=f"ovms-bench-{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.port = port
        self.url = ""

    def _tail(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-2000:]

    def wait_ready(self, port_from_log: bool = False) -> Server:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited ({self.proc.returncode}) before it "
                                 f"was ready:\n{self._tail()}")
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self._tail()) \
                if port_from_log and self.port is None else None
            if found:
                self.port = int(found.group(1))
            if self.port is not None:
                self.url = f"http://127.0.0.1:{self.port}"
                if _healthy(self.url):
                    return self
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"{self.name} was not ready after {START_SECONDS:.0f} s:\n"
                         f"{self._tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


@dataclass
class Running:
    """A server under test: its URL, and how to read the memory its model takes."""
    url: str
    memory: Callable[[], int | None] = lambda: None


def plugin_worker_rss(url: str, model: str) -> int | None:
    """The model's engine worker's resident memory, from the plugin's /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(r'^ovms_model_worker_rss_bytes\{model="' + re.escape(model)
                  + r'"\} (\S+)$', text, re.M)
    return int(float(m.group(1))) if m else None


@contextlib.contextmanager
def plugin_server(models_dir: Path, model: str, env: dict[str, str]) -> Iterator[Running]:
    """`python -m ovms_plugin serve` on loopback with the model loaded; yields its URL."""
    command = [sys.executable, "-m", "ovms_plugin", "serve", "--models-dir", str(models_dir),
               "--host", "127.0.0.1", "--port", "0", "--model", model, "--idle-unload", "0"]
    server = Server("plugin", command, env).wait_ready(port_from_log=True)
    try:
        _wait_loaded(server.url, model)
        yield Running(server.url, lambda: plugin_worker_rss(server.url, model))
    finally:
        server.stop()


def _wait_loaded(url: str, model: str) -> None:
    """`serve --model` loads in the background: one tiny request waits for it."""
    import json
    body = json.dumps({"model": model, "prompt": "hi", "max_tokens": 1}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=START_SECONDS) as r:
        r.read()


@contextlib.contextmanager
def llama_server(binary: Path, gguf: Path, *, slots: int, prompt_tokens: int,
                 max_tokens: int) -> Iterator[Running]:
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise SystemExit(f"--peer: {binary} is not an executable llama-server; build one "
                         "with benchmarks/build_llama_server.sh")
    port = _free_port()
    command = llama_server_command(binary, gguf, port, slots=slots,
                                   prompt_tokens=prompt_tokens, max_tokens=max_tokens)
    server = Server("llama-server", command, port=port).wait_ready()
    try:
        yield Running(server.url, lambda: rss_bytes(server.proc.pid))
    finally:
        server.stop()


def peer_body(body: dict[str, Any]) -> dict[str, Any]:
    """What llama-server gets: the same body, with its prompt cache off (no reuse of an
    earlier request's KV)."""
    return {**body, "cache_prompt": False}


def median_level(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One level's figures, each the median over the rounds (and the rounds kept)."""
    out: dict[str, Any] = {"concurrency": rounds[0]["concurrency"], "rounds": len(rounds)}
    for key in ("output_throughput", "request_throughput", "mean_ttft_ms", "median_ttft_ms",
                "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "mean_e2el_ms"):
        out[key] = round(statistics.median(r[key] for r in rounds), 2)
    out["completed"] = sum(r["completed"] for r in rounds)
    out["failed"] = sum(r["failed"] for r in rounds)
    if errors := sorted({e for r in rounds for e in r.get("errors", [])}):
        out["errors"] = errors[:5]
    out["mean_prompt_tokens"] = round(statistics.mean(
        r["total_input_tokens"] / max(1, r["completed"]) for r in rounds), 1)
    out["per_round"] = {k: [r[k] for r in rounds]
                        for k in ("output_throughput", "mean_ttft_ms", "mean_tpot_ms")}
    return out


def ratios(plugin: dict[str, Any], peer: dict[str, Any]) -> dict[str, float | None]:
    """plugin / peer for each compared figure (above 1 is better for the plugin on
    throughput; below 1 is better on times)."""
    out: dict[str, float | None] = {}
    for key in COMPARED:
        a, b = plugin.get(key), peer.get(key)
        out[key] = round(a / b, 3) if a and b else None
    return out


def side_by_side(levels: list[int], bodies_for: Callable[[int, int, str], Any],
                 run_level: Callable[[str, str, Any], dict[str, Any]],
                 servers: dict[str, Any], rounds: int) -> dict[str, Any]:
    """Runs every level on both systems, round after round, alternating which goes first.
    `servers[name]` is a context-manager factory yielding a URL; both are started once and
    stay up, the one not being measured idle, so no round pays a start-up."""
    per: dict[str, dict[int, list[dict[str, Any]]]] = {n: {c: [] for c in levels}
                                                       for n in servers}
    with contextlib.ExitStack() as stack:
        running = {name: stack.enter_context(factory()) for name, factory in servers.items()}
        order = list(servers)
        for r in range(rounds):
            for c in levels:
                for name in order if r % 2 == 0 else order[::-1]:
                    print(f"round {r + 1}/{rounds}, concurrency {c}: {name}",
                          file=sys.stderr, flush=True)
                    per[name][c].append(run_level(running[name].url, name,
                                                  bodies_for(r, c, name)))
        # After the busiest level: what each holds for the model (weights, KV, runtime).
        memory = {name: run.memory() for name, run in running.items()}
    out: dict[str, Any] = {"rounds": rounds, "rss_bytes_after": memory, "levels": []}
    for c in levels:
        row = {name: median_level(per[name][c]) for name in servers}
        a, b = list(servers)
        out["levels"].append({"concurrency": c, **row, "ratio": ratios(row[a], row[b])})
    return out


def table(result: dict[str, Any], names: tuple[str, str]) -> str:
    a, b = names
    lines = [f"{'conc':>5} {a + ' tok/s':>14} {b + ' tok/s':>18} {'ratio':>6} "
             f"{'TTFT ms ' + a + '/' + b:>26} {'TPOT ms ' + a + '/' + b:>26}"]
    for row in result["levels"]:
        pa, pb, ratio = row[a], row[b], row["ratio"]
        ttft = f"{pa['mean_ttft_ms']} / {pb['mean_ttft_ms']}"
        tpot = f"{pa['mean_tpot_ms']} / {pb['mean_tpot_ms']}"
        lines.append(f"{row['concurrency']:>5} {pa['output_throughput']:>14} "
                     f"{pb['output_throughput']:>18} {ratio['output_throughput'] or '-':>6} "
                     f"{ttft:>26} {tpot:>26}")
    return "\n".join(lines)
