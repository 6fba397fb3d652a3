"""Launch and stop as AOG does: install layout, handshake, signals, and workers that never
outlive the plugin."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import CHAT, REAL, descendants, pid_alive, wait_for


def test_install_layout(plugin_dir: Path):
    exe = plugin_dir / "bin" / "linux-amd64" / "ovms-plugin"
    assert (plugin_dir / "plugin.yaml").is_file()
    assert os.access(exe, os.X_OK)
    text = exe.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert f"exec {sys.executable} -m ovms_plugin" in text  # absolute interpreter path


def test_without_the_cookie_it_refuses(plugin_dir: Path):
    exe = plugin_dir / "bin" / "linux-amd64" / "ovms-plugin"
    env = {k: v for k, v in os.environ.items() if k != "AOG_PLUGIN"}
    r = subprocess.run([str(exe)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stdout == ""
    assert "not meant to be executed directly" in r.stderr


def test_handshake_and_stdout(start_host):
    host = start_host()
    assert host.address.startswith("127.0.0.1:")
    port = int(host.address.split(":")[1])
    assert 10000 <= port <= 25000 and port not in (16666, 16677, 16688)
    # Recorded for the notes; AOG's limit (10 s) is enforced by the host itself.
    print(f"handshake took {host.handshake_seconds * 1000:.0f} ms")
    # Logs are on stderr with go-plugin level prefixes.
    assert wait_for(lambda: any(line.startswith("[INFO]") for line in host.stderr_lines))


def test_sigint_is_ignored_and_sigterm_stops(start_host):
    host = start_host()
    assert host.json_call("LoadModel", {"model": CHAT}).code == 0
    tree = [host.proc.pid, *descendants(host.proc.pid)]
    os.kill(host.proc.pid, signal.SIGINT)
    for pid in tree[1:]:
        os.kill(pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
    assert host.call("HealthCheck").code == 0
    os.kill(host.proc.pid, signal.SIGTERM)
    assert host.proc.wait(timeout=10) == 0
    assert wait_for(lambda: not any(pid_alive(p) for p in tree))


def test_workers_die_with_a_killed_plugin(start_host):
    host = start_host()
    assert host.json_call("LoadModel", {"model": CHAT}).code == 0
    workers = descendants(host.proc.pid)
    assert workers
    os.kill(host.proc.pid, signal.SIGKILL)  # no Shutdown, no cleanup code runs
    host.proc.wait(timeout=10)
    assert wait_for(lambda: not any(pid_alive(p) for p in workers), timeout=10)


def test_a_dead_worker_is_noticed_and_restarted(start_host):
    host = start_host()
    assert host.json_call("LoadModel", {"model": CHAT}).code == 0
    call = host.invoke_stream("chat", {"model": CHAT, "stream": True, "max_tokens": 1800,
                                       "ignore_eos": True,
                                       "messages": [{"role": "user", "content": "long"}]})
    first = next(iter(call))
    assert first.code == 0
    [worker] = descendants(host.proc.pid)
    os.kill(worker, signal.SIGKILL)
    rest = list(call)
    assert rest[-1].is_final and rest[-1].code == 14 and "died" in rest[-1].message
    health = host.call("HealthCheck")
    assert health.code != 0 and "died" in health.message
    assert host.json_call("LoadModel", {"model": CHAT}).code == 0  # starts a new worker
    assert host.call("HealthCheck").code == 0
    r = host.invoke("chat", {"model": CHAT, "max_tokens": 4,
                             "messages": [{"role": "user", "content": "again"}]})
    assert r.code == 0, r.message


def test_busy_requests_are_refused_clearly(start_host, plugin_home: Path, tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(plugin_home / "models")
    (home / "settings.yaml").write_text(json.dumps({
        "max_waiting_requests": 1,
        "models": {CHAT: {"scheduler": {"max_num_seqs": 1, "cache_size": 1}}}}))
    host = start_host(home)
    body = {"model": CHAT, "stream": True, "max_tokens": 1500, "ignore_eos": True,
            "messages": [{"role": "user", "content": "busy"}]}
    calls = [host.invoke_stream("chat", body) for _ in range(2)]
    firsts = [next(iter(c)) for c in calls]  # both admitted (one running, one waiting)
    assert all(m.code == 0 for m in firsts)
    r = host.invoke("chat", {**body, "stream": False})
    assert r.code == 6 and "busy" in r.message and "retry" in r.message
    for c in calls:
        c.cancel()
    assert wait_for(lambda: host.invoke("chat", {**body, "stream": False, "max_tokens": 2})
                    .code == 0, timeout=20)


def test_workers_on_the_loopback_transport(start_host):
    """Windows' engine channel (loopback TCP and a one-time token), run here on the real
    SmolLM2: the worker connects, answers as it does over the socketpair, and still dies
    with a killed plugin."""
    host = start_host(OVMS_PLUGIN_ENGINE_TRANSPORT="loopback")
    assert host.json_call("LoadModel", {"model": REAL}).code == 0
    [worker] = descendants(host.proc.pid)
    with open(f"/proc/{worker}/cmdline", "rb") as f:
        args = f.read().split(b"\0")
    assert b"--connect" in args and b"--fd" not in args
    r = host.invoke("chat", {"model": REAL, "temperature": 0, "max_tokens": 10,
                             "messages": [{"role": "user",
                                           "content": "What is the capital of France?"}]})
    assert r.code == 0, r.message
    answer = json.loads(r.response_data)["choices"][0]["message"]["content"]
    assert answer.startswith("The capital of France is Paris.")
    os.kill(host.proc.pid, signal.SIGKILL)
    host.proc.wait(timeout=10)
    assert wait_for(lambda: not pid_alive(worker), timeout=10)
