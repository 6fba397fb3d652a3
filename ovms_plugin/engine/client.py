"""Front-end side of an engine worker: starts the process, sends requests, routes each
step's outputs to the waiting coroutines, and notices when the worker dies.

Every loaded model has one EngineClient; protocol adapters never talk to workers directly.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ovms_plugin.engine import ipc
from ovms_plugin.engine.protocol import EngineFailure, FailureKind

log = logging.getLogger(__name__)


class EngineError(Exception):
    """The engine could not serve the request: `failure` says why (service/errors.py
    turns it into a protocol's code)."""

    def __init__(self, failure: EngineFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure

    @classmethod
    def of(cls, kind: FailureKind, message: str) -> EngineError:
        return cls(EngineFailure(kind, message))


@dataclass
class Output:
    result: Any
    finish: str | None


class EngineClient:
    _ids = itertools.count(1)

    def __init__(self, name: str, kind: str, model_dir: Path, config: dict[str, Any],
                 max_in_flight: int) -> None:
        self.name = name
        self.kind = kind
        self.model_dir = model_dir
        self.config = config
        self.max_in_flight = max_in_flight
        self.info: dict[str, Any] = {}
        self.proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._outbox: list[bytes] = []
        self._queues: dict[int, asyncio.Queue] = {}
        self._metric_waiters: dict[int, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []
        self.dead_reason: str | None = None
        self.stopping = False

    @property
    def in_flight(self) -> int:
        return len(self._queues)

    @property
    def alive(self) -> bool:
        return self.dead_reason is None and self.proc is not None and \
            self.proc.returncode is None

    async def start(self) -> dict[str, Any]:
        """Starts the worker and waits until its pipeline is loaded."""
        parent, child = socket.socketpair()
        try:
            # Spawned from the event loop's (main) thread: the worker's parent-death signal
            # fires when the thread that forked it ends.
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ovms_plugin.engine.worker",
                "--fd", str(child.fileno()), "--kind", self.kind,
                "--model-dir", str(self.model_dir), "--config", json.dumps(self.config),
                "--parent-pid", str(os.getpid()), "--name", self.name,
                pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        finally:
            child.close()
        self._tasks.append(asyncio.create_task(self._relay_stderr()))
        reader, self._writer = await asyncio.open_unix_connection(sock=parent)
        try:
            msg = await ipc.read(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            code = await self.proc.wait()
            self.dead_reason = f"engine worker exited with code {code} while loading"
            raise EngineError.of(FailureKind.LOAD_FAILED,
                                 f"loading model {self.name!r} failed: {self.dead_reason} "
                                 "(see the plugin log)") from None
        if msg[0] != "ready":
            await self.stop()
            self.dead_reason = msg[1]
            raise EngineError.of(FailureKind.LOAD_FAILED,
                                 f"loading model {self.name!r} failed: {msg[1]}")
        self.info = msg[1]
        self._tasks.append(asyncio.create_task(self._read_loop(reader)))
        return self.info

    async def _relay_stderr(self) -> None:
        """Worker log lines go to the plugin's stderr (already [LEVEL]-prefixed)."""
        assert self.proc and self.proc.stderr
        async for line in self.proc.stderr:
            sys.stderr.write(line.decode(errors="replace"))
        sys.stderr.flush()

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                msg = await ipc.read(reader)
                if msg[0] == "out":
                    for req_id, result, finish, error in msg[1]:
                        q = self._queues.get(req_id)
                        if q is not None:
                            q.put_nowait((result, finish, error))
                elif msg[0] == "metrics":
                    fut = self._metric_waiters.pop(msg[1], None)
                    if fut and not fut.done():
                        fut.set_result(msg[2])
        except (asyncio.IncompleteReadError, ConnectionError, EOFError):
            pass
        code = await self.proc.wait() if self.proc else None
        if not self.stopping:
            self.dead_reason = (f"the engine worker of model {self.name!r} died (exit code "
                                f"{code}); the next LoadModel or request restarts it")
            log.error(self.dead_reason)
        reason = self.dead_reason or f"model {self.name!r} was unloaded"
        for q in self._queues.values():
            q.put_nowait((None, None, (FailureKind.ENGINE_DIED.value, reason)))
        for fut in self._metric_waiters.values():
            if not fut.done():
                fut.set_exception(EngineError.of(FailureKind.ENGINE_DIED, reason))

    def _send(self, msg: Any) -> None:
        if not self.alive or self._writer is None:
            raise EngineError.of(FailureKind.ENGINE_DIED,
                                 self.dead_reason or f"model {self.name!r} is not running")
        # Messages of one event-loop turn (gRPC hands over many requests in one) go out in
        # one write: one system call and one wake-up of the worker instead of one per request.
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(ipc.encode(msg))

    def _flush(self) -> None:
        data, self._outbox = b"".join(self._outbox), []
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(data)

    async def submit(self, payload: Any) -> AsyncIterator[Output]:
        """Runs one request; yields its outputs until it finishes. Leaving the iteration
        early (cancellation, client gone, stop string) aborts it in the engine."""
        if self.in_flight >= self.max_in_flight:
            raise EngineError.of(FailureKind.BUSY,
                                 f"model {self.name!r} is busy: {self.in_flight} requests "
                                 "are already running or waiting; retry shortly")
        req_id = next(self._ids)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[req_id] = q
        finished = False
        try:
            self._send(("add", req_id, payload))
            while True:
                result, finish, error = await q.get()
                # Steps that piled up while the consumer was busy go out as one output
                # (token lists are joined): fewer, larger messages when the front end lags.
                while isinstance(result, list) and finish is None and error is None \
                        and not q.empty():
                    more, finish, error = q.get_nowait()
                    if more is not None:
                        result = result + more
                if error is not None:  # a StepOutput's failure, as it travels
                    finished = True
                    kind = FailureKind(error[0]) if self.alive else FailureKind.ENGINE_DIED
                    raise EngineError.of(kind, error[1])
                if finish is not None:
                    finished = True
                yield Output(result, finish)
                if finished:
                    return
        finally:
            del self._queues[req_id]
            if not finished and self.alive:
                self._send(("abort", req_id))

    async def metrics(self, timeout: float = 5.0) -> dict[str, Any]:
        token = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._metric_waiters[token] = fut
        try:
            self._send(("metrics", token))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._metric_waiters.pop(token, None)

    async def stop(self, timeout: float = 1.0) -> None:
        """Asks the worker to exit, then kills it if it has not within `timeout`."""
        self.stopping = True
        if self.proc is None:
            return
        if self.proc.returncode is None:
            try:
                if self._writer is not None:
                    self._writer.write(ipc.encode(("shutdown",)))
            except (ConnectionError, RuntimeError):
                pass
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.kill()
                await self.proc.wait()
        if self._writer is not None:
            self._writer.close()
        # Let the read loop see EOF and fail the requests still waiting, then tidy up.
        others = [t for t in self._tasks if t is not asyncio.current_task()]
        if others:
            _, pending = await asyncio.wait(others, timeout=1.0)
            for t in pending:
                t.cancel()

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
