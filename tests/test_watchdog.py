"""The engine watchdog: a worker that stops making progress while it has work (here: stopped
with SIGSTOP) is noticed within the stall limit, its requests fail with a clear "stopped
responding, being restarted" error (code 14 / HTTP 503), HealthCheck and /ready report it,
/metrics counts it, it is killed and started again on its own, and the next request is
served by the new worker. A long step that computes (a big prefill in one step, which holds
the GIL so the worker's heartbeat cannot run) is not taken for a hang.

Every wait is bounded in time; the stall limit is set to 2 s (0.5 s for the long step)
through OVMS_PLUGIN_ENGINE_STALL_SECONDS."""

from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import CHAT, REAL, descendants, pid_alive, wait_for

from ovms_plugin.aog.host import AogHost, SseReader
from ovms_plugin.engine import worker
from ovms_plugin.service import errors

STALL = "2"
LONG = {"model": CHAT, "messages": [{"role": "user", "content": "Go on forever"}],
        "max_tokens": 1500, "ignore_eos": True, "stream": True}


def workers(root: int, model: str) -> list[int]:
    """The live engine worker processes of one model under a process."""
    out = []
    for pid in descendants(root):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"ovms_plugin.engine.worker" in args and model.encode() in args and pid_alive(pid):
            out.append(pid)
    return out


def one_worker(root: int, model: str) -> int:
    assert wait_for(lambda: len(workers(root, model)) == 1, 30), workers(root, model)
    return workers(root, model)[0]


class Poller:
    """Calls `probe` every 50 ms in a thread (at most `limit` seconds) and keeps what it
    returned, so a short state (a restart) is seen however fast it passes."""

    def __init__(self, probe: Callable[[], object], limit: float = 60.0) -> None:
        self.seen: list[object] = []
        self._stop = threading.Event()

        def run() -> None:
            deadline = time.monotonic() + limit
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    self.seen.append(probe())
                except Exception as e:  # a refused connection is an observation too
                    self.seen.append(e)
                self._stop.wait(0.05)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> list[object]:
        self._stop.set()
        self._thread.join(10)
        return self.seen


def test_a_stopped_worker_is_noticed_failed_and_restarted_over_aog(start_host):
    host: AogHost = start_host(OVMS_PLUGIN_ENGINE_STALL_SECONDS=STALL)
    assert host.json_call("LoadModel", {"model": CHAT}).code == 0
    old = one_worker(host.proc.pid, CHAT)

    def health() -> tuple[int, str]:
        r = host.call("HealthCheck", timeout=5)
        return r.code, r.message

    assert health()[0] == 0
    reader = SseReader(host.invoke_stream("chat", LONG, timeout=60))
    events = reader.events()
    for _ in range(3):
        next(events)
    poller = Poller(health)
    os.kill(old, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        rest = list(events)  # ends with the error, or hangs until the call's deadline
        took = time.monotonic() - stopped
        assert reader.error is not None, f"the stream ended without an error: {rest[-1:]}"
        code, message = reader.error
        assert code == errors.UNAVAILABLE
        assert "stopped responding" in message and "restart" in message and CHAT in message
        assert took < float(STALL) + 5, took
        # Killed (SIGKILL ends a stopped process), then started again on its own.
        assert wait_for(lambda: not pid_alive(old), 10)
        assert wait_for(lambda: health()[0] == 0, 60), health()
    finally:
        if pid_alive(old):
            os.kill(old, signal.SIGCONT)
    seen = poller.stop()
    failing = [s for s in seen if isinstance(s, tuple) and s[0] == errors.UNAVAILABLE]
    assert failing, seen  # HealthCheck said so while it restarted
    assert any(CHAT in s[1] and ("stopped responding" in s[1] or "restart" in s[1])
               for s in failing), failing
    new = one_worker(host.proc.pid, CHAT)
    assert new != old
    r = host.invoke("chat", {"model": CHAT, "max_tokens": 4,
                             "messages": [{"role": "user", "content": "hi"}]})
    assert r.code == 0, r.message
    assert workers(host.proc.pid, CHAT) == [new]  # served by the restarted worker
    logged = [line for line in host.stderr_lines if "made no progress" in line]
    assert logged and "[ERROR]" in logged[0] and CHAT in logged[0] and f"pid {old}" in \
        logged[0], host.stderr_lines[-20:]
    assert any(f"model {CHAT}: engine restarted" in line for line in host.stderr_lines)


@pytest.fixture
def http_server(plugin_home: Path) -> Iterator:
    from test_http import Server  # the same launcher as the HTTP tests
    s = Server(plugin_home, ["--port", "0", "--model", CHAT, "--idle-unload", "0"],
               env={"OVMS_PLUGIN_ENGINE_STALL_SECONDS": STALL})
    try:
        assert wait_for(lambda: s.http.get("/ready").status_code == 200, 60), s.log()
        yield s
    finally:
        s.stop()


def test_a_stopped_worker_over_http_ready_metrics_and_the_stream(http_server):
    s = http_server
    old = one_worker(s.proc.pid, CHAT)
    poller = Poller(lambda: s.http.get("/ready", timeout=10).status_code)
    lines: queue.Queue = queue.Queue()

    def stream() -> None:
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{s.url}/v1/chat/completions",
                                                     json=LONG) as r:
            lines.put(r.status_code)
            for line in r.iter_lines():
                lines.put(line)
        lines.put(None)

    threading.Thread(target=stream, daemon=True).start()
    assert lines.get(timeout=30) == 200
    got = 0
    while got < 3:
        if lines.get(timeout=30).startswith("data: "):
            got += 1
    os.kill(old, signal.SIGSTOP)
    try:
        events = []
        while (line := lines.get(timeout=float(STALL) + 10)) is not None:
            if line.startswith("data: "):
                events.append(line[6:])
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "stopped responding" in error["message"] and CHAT in error["message"]
        assert error["type"] == "server_error" and error["code"] == "engine_unavailable"
        assert wait_for(lambda: s.http.get("/ready").status_code == 200, 60), s.log()
    finally:
        if pid_alive(old):
            os.kill(old, signal.SIGCONT)
    assert 503 in poller.stop()  # /ready said so until the engine was back
    assert s.value("ovms_engine_stalls", model=CHAT) == 1
    assert s.value("ovms_engine_restarts", model=CHAT) == 1
    assert s.value("ovms_engine_restarting", model=CHAT) == 0
    r = s.http.post("/v1/chat/completions", json={
        "model": CHAT, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert workers(s.proc.pid, CHAT) != [old]


def test_a_long_step_that_computes_is_not_a_hang(start_host, plugin_home: Path,
                                                 tmp_path: Path):
    """One prefill step of a ~700-token prompt (no chunking) takes well over the 0.5 s
    limit and sends nothing meanwhile; the worker's CPU time shows it is working."""
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({"models": {REAL: {
        "properties": {"INFERENCE_PRECISION_HINT": "f32"},
        "scheduler": {"cache_size": 1, "max_num_batched_tokens": 4096,
                      "dynamic_split_fuse": False}}}}))
    host: AogHost = start_host(OVMS_PLUGIN_ENGINE_STALL_SECONDS="0.5",
                               OVMS_PLUGIN_SETTINGS=str(settings))
    assert host.json_call("LoadModel", {"model": REAL}).code == 0
    prompt = " ".join(f"word{i % 97} and" for i in range(200))
    started = time.monotonic()
    r = host.invoke("generate", {"model": REAL, "prompt": prompt, "max_tokens": 2}, 120)
    took = time.monotonic() - started
    assert r.code == 0, r.message
    usage = json.loads(r.response_data)["usage"]
    assert usage["prompt_tokens"] > 500, usage
    assert took > 1.0, f"the prefill took {took:.2f} s: too short to show anything"
    assert not any("made no progress" in line for line in host.stderr_lines)
    assert host.call("HealthCheck").code == 0


class _Sent(list):
    last = 0.0

    def __call__(self, msg) -> None:
        self.append(msg)
        self.last = time.monotonic()


def test_heartbeat_only_while_making_progress():
    """The worker's heartbeat: beats while the process computes or its loop moves on, none
    while it is idle or stuck without using the CPU."""
    progress = worker._Progress()
    sent = _Sent()
    threading.Thread(target=worker._heartbeat, args=(sent, progress, 0.1),
                     daemon=True).start()
    progress.idle = True
    time.sleep(0.5)
    assert sent == []  # idle: nothing owed
    progress.idle = False
    time.sleep(0.5)
    assert sent == []  # busy, but stuck without using the CPU: silence
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:  # computing
        sum(i * i for i in range(2000))
    assert len(sent) >= 2 and set(sent) == {("beat",)}
    n = len(sent)
    for _ in range(6):  # the loop moves on, without much CPU
        progress.count += 1
        time.sleep(0.1)
    assert len(sent) > n
