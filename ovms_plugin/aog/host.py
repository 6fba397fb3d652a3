"""A Python stand-in for AOG's side of the plugin protocol: launches an installed plugin
exactly as AOG v0.7 does (executable from plugin.yaml, no arguments, working directory
<plugin>/bin, AOG's environment, 10 s for the handshake), calls it over gRPC, reads its
streams as AOG does, and kills it as go-plugin's Kill() does. The tests, the demo and the
benchmark drive the plugin through it."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import yaml

from ovms_plugin.aog.proto import go_plugin_pb2, go_plugin_pb2_grpc
from ovms_plugin.aog.proto import provider_pb2 as pb
from ovms_plugin.aog.proto import provider_pb2_grpc as pb_grpc
from ovms_plugin.osutil import aog_platform

HANDSHAKE_TIMEOUT = 10.0


class HostError(Exception):
    pass


class AogHost:
    def __init__(self, plugin_dir: Path, env: dict[str, str] | None = None,
                 forward_stderr: bool = False) -> None:
        self.plugin_dir = plugin_dir
        self.extra_env = env or {}
        self.forward_stderr = forward_stderr
        self.proc: subprocess.Popen | None = None
        self.channel: grpc.Channel | None = None
        self.stub: pb_grpc.ProviderServiceStub | None = None
        self.address = ""
        self.handshake_seconds = 0.0
        self.stderr_lines: list[str] = []
        self._drains: list[threading.Thread] = []

    # --- launch -------------------------------------------------------------------------

    def start(self) -> AogHost:
        manifest = yaml.safe_load((self.plugin_dir / "plugin.yaml").read_text())
        if manifest["provider"]["name"] != self.plugin_dir.name:
            raise HostError("the plugin folder name must equal provider.name")
        exe = self.plugin_dir / manifest["platforms"][aog_platform()]["executable"]
        os.chmod(exe, 0o755)
        env = {**os.environ, "AOG_PLUGIN": "aog-provider-plugin-v1",
               "PLUGIN_PROTOCOL_VERSIONS": "1", "PLUGIN_MIN_PORT": "10000",
               "PLUGIN_MAX_PORT": "25000", "AOG_VERSION": "v0.7", **self.extra_env}
        started = time.monotonic()
        self.proc = subprocess.Popen([str(exe)], cwd=exe.parent.parent, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        line = self._read_handshake(started)
        self.handshake_seconds = time.monotonic() - started
        parts = line.split("|")
        if len(parts) < 5 or parts[0] != "1" or parts[1] != "1" or parts[4] != "grpc":
            self.kill()
            raise HostError(f"bad handshake line {line!r}")
        self.address = parts[3] if parts[2] == "tcp" else f"unix:{parts[3]}"
        self._drains = [threading.Thread(target=self._drain, args=(self.proc.stdout, False),
                                         daemon=True),
                        threading.Thread(target=self._drain, args=(self.proc.stderr, True),
                                         daemon=True)]
        for t in self._drains:
            t.start()
        self.channel = grpc.insecure_channel(self.address)
        try:
            grpc.channel_ready_future(self.channel).result(
                timeout=max(0.1, HANDSHAKE_TIMEOUT - (time.monotonic() - started)))
        except grpc.FutureTimeoutError:
            self.kill()
            raise HostError("the plugin's gRPC server did not answer in time") from None
        self.stub = pb_grpc.ProviderServiceStub(self.channel)
        return self

    def _read_handshake(self, started: float) -> str:
        """The first stdout line, within the handshake timeout (a thread reads it: select()
        cannot wait on a pipe on Windows)."""
        assert self.proc and self.proc.stdout
        stdout = self.proc.stdout
        box: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        threading.Thread(target=lambda: box.put(stdout.readline()), daemon=True).start()
        try:
            line = box.get(timeout=max(0.0, HANDSHAKE_TIMEOUT - (time.monotonic() - started)))
        except queue.Empty:
            line = b""
        if not line.endswith(b"\n"):
            err = self.proc.stderr.read1(65536).decode(errors="replace") \
                if self.proc.poll() is not None and self.proc.stderr else ""
            self.kill()
            raise HostError("no handshake line from the plugin within "
                            f"{HANDSHAKE_TIMEOUT:.0f}s: {err.strip()[-2000:]}")
        return line.decode().strip()

    def _drain(self, stream: Any, keep: bool) -> None:
        for raw in iter(stream.readline, b""):
            if keep:
                line = raw.decode(errors="replace").rstrip("\n")
                self.stderr_lines.append(line)
                if self.forward_stderr:
                    sys.stderr.write(line + "\n")

    # --- calls --------------------------------------------------------------------------

    def call(self, method: str, request: Any = None, timeout: float | None = 120.0) -> Any:
        assert self.stub is not None
        rpc = getattr(self.stub, method)
        if request is None:
            request = getattr(pb, f"{method}Request")()
        return rpc(request, timeout=timeout)

    def json_call(self, method: str, body: dict[str, Any],
                  timeout: float | None = 120.0) -> Any:
        return self.call(method, getattr(pb, f"{method}Request")(
            request_json=json.dumps(body).encode()), timeout)

    def invoke(self, service: str, body: dict[str, Any], timeout: float | None = 60.0):
        return self.call("InvokeService", pb.InvokeServiceRequest(
            service_name=service, request_data=json.dumps(body).encode()), timeout)

    def invoke_stream(self, service: str, body: dict[str, Any],
                      timeout: float | None = 300.0) -> Iterator[Any]:
        """The raw InvokeServiceStream messages (a gRPC call iterator; cancel() works)."""
        assert self.stub is not None
        return self.stub.InvokeServiceStream(pb.InvokeServiceRequest(
            service_name=service, request_data=json.dumps(body).encode()), timeout=timeout)

    def invoke_bidi(self, service: str, messages: Iterator[tuple[str, bytes]],
                    metadata: dict[str, str] | None = None,
                    timeout: float | None = 300.0) -> Iterator[Any]:
        """InvokeServiceBidi as AOG's SDK drives it: the first message carries the service
        name, is_first and the metadata (ws_conn_id, model, ...); every message is a
        (message_type, data) pair. Returns the response iterator (cancel() works)."""
        assert self.stub is not None

        def requests() -> Iterator[Any]:
            first = True
            for kind, data in messages:
                yield pb.InvokeServiceBidiRequest(
                    service_name=service if first else "", data=data, message_type=kind,
                    metadata=(metadata or {}) if first else {}, is_first=first)
                first = False

        return self.stub.InvokeServiceBidi(requests(), timeout=timeout)

    # --- stop ---------------------------------------------------------------------------

    def kill(self, grace: float = 2.0, eof_timeout: float = 10.0) -> float:
        """go-plugin's Kill(): Shutdown RPC, close the connection, wait `grace` seconds,
        SIGKILL the direct child, then wait for EOF on its stdout and stderr (which hangs
        if any process still holds them). Returns how long it took."""
        started = time.monotonic()
        if self.proc is None:
            return 0.0
        if self.channel is not None and self.proc.poll() is None:
            with contextlib.suppress(grpc.RpcError):
                go_plugin_pb2_grpc.GRPCControllerStub(self.channel).Shutdown(
                    go_plugin_pb2.Empty(), timeout=grace)
        if self.channel is not None:
            self.channel.close()
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for t in self._drains:
            t.join(eof_timeout)
            if t.is_alive():
                raise HostError("the plugin's stdout/stderr stayed open after it exited: a "
                                "child process still holds them (AOG's shutdown would hang)")
        return time.monotonic() - started


class SseReader:
    """Reads InvokeServiceStream messages the way AOG does: joins chunk_data into one byte
    stream, splits events on a blank line, stops at is_final, [DONE] or a blank event, and
    fails on a non-success code."""

    def __init__(self, messages: Iterator[Any]) -> None:
        self.messages = messages
        self.error: tuple[int, str] | None = None

    def events(self) -> Iterator[dict[str, Any]]:
        buf = b""
        for msg in self.messages:
            if msg.code not in (0, 200):
                self.error = (msg.code, msg.message)
                return
            buf += msg.chunk_data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if not event.strip():
                    return
                lines = event.split(b"\n")
                if len(lines) != 1 or not lines[0].startswith(b"data: "):
                    raise HostError(f"malformed SSE event {event!r}")
                data = lines[0][len(b"data: "):]
                if data == b"[DONE]":
                    return
                yield json.loads(data)
            if msg.is_final:
                return
