"""Shutdown and readiness: a stream running at SIGTERM (HTTP server and plugin) or at
GRPCController/Shutdown ends with an error event or message after a short drain, and the
process exits within its bound; a killed engine worker is restarted on its own and /ready
comes back without any request; a busy port is one clear line and a non-zero exit, no
traceback; a request body that stalls gets 408 within the body timeout while other requests
are served.

Network only on 127.0.0.1; every wait is bounded in count and time."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import CHAT, REAL, pid_alive, wait_for
from test_watchdog import Poller, one_worker

from ovms_plugin.aog.host import AogHost, SseReader
from ovms_plugin.aog.proto import go_plugin_pb2, go_plugin_pb2_grpc
from ovms_plugin.service import errors

DRAIN = 0.5
LONG_REAL = {"model": REAL, "messages": [{"role": "user", "content": "Tell me a long story"}],
             "max_tokens": 3000, "ignore_eos": True, "stream": True}


def server(home: Path, *args: str, env: dict[str, str] | None = None):
    from test_http import Server  # the same launcher as the HTTP tests
    return Server(home, ["--port", "0", "--idle-unload", "0", *args], env=env)


def read_events(resp: http.client.HTTPResponse, limit: float) -> list:
    """SSE data of a response until it ends properly (a chunked body's last chunk); raises
    if it is cut short. Bounded by the socket's timeout and `limit` seconds."""
    out: list = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        line = resp.readline()
        if not line:
            return out
        if line.startswith(b"data: "):
            data = line[6:].strip()
            out.append(data.decode() if data == b"[DONE]" else json.loads(data))
    raise AssertionError(f"the stream did not end within {limit} s")


def open_stream(port: int, body: dict) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()  # the first event is on its way
    assert resp.status == 200
    return resp


def test_sigterm_drains_then_ends_running_http_streams_with_an_error_event(plugin_home: Path):
    """At SIGTERM a short stream finishes within the drain; a long one gets an error event
    and `[DONE]` after it, and its response ends properly; the server exits soon after."""
    drain = 3.0
    s = server(plugin_home, "--model", REAL, "--drain", str(drain))
    try:
        assert wait_for(lambda: s.http.get("/ready").status_code == 200, 90), s.log()
        long = open_stream(s.port, LONG_REAL)
        got = 0
        while got < 3:
            if long.readline().startswith(b"data: "):
                got += 1
        short = open_stream(s.port, {**LONG_REAL, "max_tokens": 3})
        s.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        events = read_events(short, 30)
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), events
        # http.client raises IncompleteRead on a stream cut without its last chunk.
        events = read_events(long, 30)
        assert events[-1] == "[DONE]", events[-3:]
        error = events[-2]["error"]
        assert "shutting down" in error["message"], error
        assert error["type"] == "server_error"
        assert all("choices" in e for e in events[:-2])  # tokens until then, no other error
        assert time.monotonic() - signalled >= drain - 0.2  # it had its drain
        assert s.proc.wait(drain + 15) == 0
        assert time.monotonic() - signalled < drain + 10
        assert any(f"2 request(s) running, given up to {drain:.1f} s" in line
                   for line in s.lines), s.log()
        assert any(f"1 request(s) still running after {drain:.1f} s were ended" in line
                   for line in s.lines), s.log()
        assert not any("status=499" in line for line in s.lines), s.log()
    finally:
        s.stop()


def aog_stream(host: AogHost) -> tuple[SseReader, Iterator]:
    assert host.json_call("LoadModel", {"model": REAL}).code == 0
    reader = SseReader(host.invoke_stream("chat", LONG_REAL, timeout=120))
    events = reader.events()
    for _ in range(3):
        next(events)
    return reader, events


def test_sigterm_ends_a_running_grpc_stream_with_an_error(start_host):
    host: AogHost = start_host(OVMS_PLUGIN_DRAIN_SECONDS=str(DRAIN))
    reader, events = aog_stream(host)
    host.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    rest = list(events)
    assert reader.error is not None, rest[-1:]
    code, message = reader.error
    assert code == errors.UNAVAILABLE and "shutting down" in message, reader.error
    assert host.proc.wait(10) == 0
    assert time.monotonic() - signalled < 2.0  # AOG's own bound after Shutdown


def test_shutdown_rpc_ends_a_stream_and_exits_within_aog_bound(start_host):
    """go-plugin's Kill(): Shutdown, then 2 s before SIGKILL. With the default drain (1 s)
    a running stream gets its final error message and the plugin exits on its own."""
    host: AogHost = start_host()
    reader, events = aog_stream(host)
    assert host.channel is not None
    go_plugin_pb2_grpc.GRPCControllerStub(host.channel).Shutdown(go_plugin_pb2.Empty(),
                                                                 timeout=2)
    asked = time.monotonic()
    with contextlib.suppress(grpc.RpcError):  # gone before the error was read: see below
        list(events)
    try:
        host.proc.wait(2.0)
    except subprocess.TimeoutExpired:
        pytest.fail("the plugin did not exit within 2 s of Shutdown (AOG would SIGKILL it)")
    took = time.monotonic() - asked
    assert host.proc.returncode == 0
    assert reader.error is not None and reader.error[0] == errors.UNAVAILABLE, reader.error
    assert "shutting down" in reader.error[1]
    assert took < 2.0, took


def test_a_killed_worker_is_restarted_and_ready_comes_back_on_its_own(plugin_home: Path):
    s = server(plugin_home, "--model", CHAT)
    try:
        assert wait_for(lambda: s.http.get("/ready").status_code == 200, 60), s.log()
        old = one_worker(s.proc.pid, CHAT)
        poller = Poller(lambda: s.http.get("/ready", timeout=10).status_code)
        os.kill(old, signal.SIGKILL)
        # No request but /ready (and /metrics below): the server restarts it by itself.
        assert wait_for(lambda: 503 in poller.seen, 10), poller.seen
        assert wait_for(lambda: poller.seen[-1] == 200, 60), s.log()
        poller.stop()
        assert one_worker(s.proc.pid, CHAT) != old
        assert s.value("ovms_engine_deaths", model=CHAT) == 1
        assert s.value("ovms_engine_restarts", model=CHAT) == 1
        assert s.value("ovms_model_alive", model=CHAT) == 1
        assert any(f"model {CHAT}: engine restarted" in line for line in s.lines), s.log()
    finally:
        s.stop()


def test_a_busy_port_is_one_clear_line(plugin_home: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "ovms_plugin", "serve", "--port", str(port),
                            "--model", CHAT], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "OVMS_PLUGIN_HOME": str(plugin_home)})
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert str(port) in lines[0] and "already in use" in lines[0] and "--port" in lines[0]
    assert lines[0].startswith("[ERROR]")


def test_a_stalled_body_gets_408_while_others_are_served(plugin_home: Path):
    s = server(plugin_home, "--model", CHAT, "--body-timeout", "1")
    try:
        assert wait_for(lambda: s.http.get("/ready").status_code == 200, 60), s.log()
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as slow:
            slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n"
                         b'{"model": "' + CHAT.encode())
            sent = time.monotonic()
            # Meanwhile the server serves others.
            for _ in range(3):
                r = httpx.post(f"{s.url}/v1/chat/completions", timeout=30, json={
                    "model": CHAT, "max_tokens": 2,
                    "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200, r.text
            data = b""
            while time.monotonic() - sent < 10:
                try:
                    chunk = slow.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break  # closed after the answer
                data += chunk
            took = time.monotonic() - sent
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), data
        assert b"connection: close" in head.lower()
        assert "did not arrive in full within 1 s" in json.loads(body)["error"]["message"]
        assert took < 5, took  # the 408, and the connection closed, soon after 1 s
        assert httpx.get(f"{s.url}/health").status_code == 200
    finally:
        s.stop()
    assert not pid_alive(s.proc.pid)
