"""Front-end side of an engine worker: starts the process, sends requests, routes each
step's outputs to the waiting coroutines, and notices when the worker dies.

Every loaded model has one EngineClient; protocol adapters never talk to workers directly.

The watchdog: while a worker has requests in flight (or is loading), any message from it
(outputs, metrics, heartbeats) or CPU time it spends (osutil.proc_state: a long step that
holds the GIL sends nothing, but computes) counts as progress. A worker with no
progress for `engine_stall_seconds` (settings; five times that while loading), or one
stopped (SIGSTOP) that long even when idle, is reported in the log, its requests fail with
"stopped responding ... being restarted" (code 14, HTTP 503), and it is killed; the runtime's
supervisor (Runtime.supervise) starts it again.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ovms_plugin import osutil, settings
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


LOAD_STALL_FACTOR = 5  # a loading worker gets this many stall limits (compiling is slow)


def _stall_limit(kind: str, name: str) -> float:
    try:
        return settings.engine_stall_seconds(kind, name)
    except settings.SettingsError as e:
        log.warning("%s; using %.0f s", e, settings.DEFAULT_ENGINE_STALL_SECONDS)
        return settings.DEFAULT_ENGINE_STALL_SECONDS


class EngineClient:
    _ids = itertools.count(1)
    # Per model, over every client it had: "stalls" (killed by the watchdog), "deaths" (the
    # worker exited on its own), "restarts" (a worker started again after either).
    events: ClassVar[Counter[tuple[str, str]]] = Counter()
    _lost: ClassVar[set[str]] = set()  # models whose worker stalled or died, not yet back

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
        self.refusing: str | None = None  # set on shutdown: new requests get this error
        self.stall_seconds = _stall_limit(kind, name)
        self.stalled = False
        self.loading = False
        self._last_sign = time.monotonic()  # the last sign of progress from the worker
        self._watch_task: asyncio.Task | None = None

    @property
    def in_flight(self) -> int:
        return len(self._queues)

    @property
    def alive(self) -> bool:
        return self.dead_reason is None and self.proc is not None and \
            self.proc.returncode is None

    @property
    def busy(self) -> bool:
        """Whether the worker owes us anything: requests in flight or metrics."""
        return bool(self._queues or self._metric_waiters)

    async def start(self) -> dict[str, Any]:
        """Starts the worker and waits until its pipeline is loaded."""
        channel = osutil.engine_channel()
        beat = self._tick() if self.stall_seconds > 0 else 0.0
        try:
            # Spawned from the event loop's (main) thread: the worker's parent-death signal
            # fires when the thread that forked it ends.
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ovms_plugin.engine.worker", *channel.child_args,
                "--kind", self.kind, "--model-dir", str(self.model_dir),
                "--config", json.dumps(self.config), "--parent-pid", str(os.getpid()),
                "--name", self.name, "--beat", str(beat),
                env={**os.environ, **channel.env} if channel.env else None,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, **channel.popen_kwargs,
                **osutil.child_popen_kwargs())
        except BaseException:
            channel.close()
            raise
        finally:
            channel.started()
        try:
            osutil.tie_to_plugin(self.proc.pid)
        except OSError as e:  # Windows only; the channel's EOF still ends the worker
            log.warning("model %s: the engine worker could not join the plugin's job object "
                        "(%s); it may outlive a plugin that is killed", self.name, e)
        self._tasks.append(asyncio.create_task(self._relay_stderr()))
        self.loading = True
        self._last_sign = time.monotonic()
        if self.stall_seconds > 0:
            self._watch_task = asyncio.create_task(self._watch())
        try:
            sock = await channel.connected(self.proc.wait())
            reader, self._writer = await asyncio.open_connection(sock=sock)
            while (msg := await ipc.read(reader))[0] == "beat":
                self._last_sign = time.monotonic()
        except (asyncio.IncompleteReadError, ConnectionError):
            if self.proc.returncode is None:  # it never connected
                self.proc.kill()
            code = await self.proc.wait()
            self._stop_watch()
            self.dead_reason = self.dead_reason or \
                f"engine worker exited with code {code} while loading"
            raise EngineError.of(FailureKind.LOAD_FAILED,
                                 f"loading model {self.name!r} failed: {self.dead_reason} "
                                 "(see the plugin log)") from None
        finally:
            self.loading = False
        if msg[0] != "ready":
            await self.stop()
            self.dead_reason = msg[1]
            raise EngineError.of(FailureKind.LOAD_FAILED,
                                 f"loading model {self.name!r} failed: {msg[1]}")
        self.info = msg[1]
        self._tasks.append(asyncio.create_task(self._read_loop(reader)))
        if self.name in EngineClient._lost:
            EngineClient._lost.discard(self.name)
            EngineClient.events[(self.name, "restarts")] += 1
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
                self._last_sign = time.monotonic()
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
        self._stop_watch()
        if not self.stopping and self.dead_reason is None:
            self.dead_reason = (f"the engine worker of model {self.name!r} died (exit code "
                                f"{code}); it is being restarted")
            log.error(self.dead_reason)
            EngineClient.events[(self.name, "deaths")] += 1
            EngineClient._lost.add(self.name)
        self._fail_all(self.dead_reason or f"model {self.name!r} was unloaded")

    def _fail_all(self, reason: str) -> int:
        """Ends every request in flight, and every metrics call, with `reason` (code 14)."""
        for q in self._queues.values():
            q.put_nowait((None, None, (FailureKind.ENGINE_DIED.value, reason)))
        for fut in self._metric_waiters.values():
            if not fut.done():
                fut.set_exception(EngineError.of(FailureKind.ENGINE_DIED, reason))
        return len(self._queues)

    # --- the watchdog --------------------------------------------------------------------

    def _tick(self) -> float:
        return min(1.0, max(0.05, self.stall_seconds / 4))

    async def _watch(self) -> None:
        """Kills the worker when it makes no progress for the stall limit while it has work
        (or is loading), or when it stays stopped that long. See the module's docstring."""
        assert self.proc is not None
        proc, tick = self.proc, self._tick()
        last_tick = time.monotonic()
        prev = osutil.proc_state(proc.pid)
        stopped_since: float | None = None
        while proc.returncode is None and self.dead_reason is None and not self.stopping:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - last_tick > 2 * tick + 1.0:
                # This event loop itself was held up: nobody watched, nothing is known.
                self._last_sign = now
                stopped_since = None
            last_tick = now
            state = osutil.proc_state(proc.pid)
            stopped = state is not None and state.stopped
            if stopped:
                stopped_since = stopped_since or now
            else:
                stopped_since = None
                if state and prev and state.cpu_seconds - prev.cpu_seconds >= 0.05 * tick:
                    self._last_sign = now  # computing: a long step, not a hang
            prev = state
            limit = self.stall_seconds * (LOAD_STALL_FACTOR if self.loading else 1)
            quiet = now - self._last_sign
            if (self.loading or self.busy) and quiet >= limit:
                self._trip(quiet, stopped)
            elif stopped_since is not None and now - stopped_since >= limit:
                self._trip(now - stopped_since, stopped)

    def _trip(self, quiet: float, stopped: bool) -> None:
        if self.proc is None or self.proc.returncode is not None or self.stopping:
            return
        how = "its process is stopped" if stopped else "no output, heartbeat or CPU use"
        what = "while loading" if self.loading else f"with {self.in_flight} request(s) in flight"
        log.error("model %s: the engine worker (pid %d) made no progress for %.1f s %s (%s); "
                  "killing it%s", self.name, self.proc.pid, quiet, what, how,
                  "" if self.loading else " and restarting the engine")
        self.stalled = True
        if self.loading:
            self.dead_reason = (f"the engine worker stopped responding while loading (no "
                                f"progress for {quiet:.0f} s)")
        else:
            self.dead_reason = (f"the engine of model {self.name!r} stopped responding (no "
                                f"progress for {quiet:.0f} s); it is being restarted, retry "
                                "shortly")
            EngineClient._lost.add(self.name)
        EngineClient.events[(self.name, "stalls")] += 1
        self._fail_all(self.dead_reason)
        self.proc.kill()  # SIGKILL ends a stopped process too

    def _stop_watch(self) -> None:
        task, self._watch_task = self._watch_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

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
        if self.refusing:
            raise EngineError.of(FailureKind.ENGINE_DIED, self.refusing)
        if self.in_flight >= self.max_in_flight:
            raise EngineError.of(FailureKind.BUSY,
                                 f"model {self.name!r} is busy: {self.in_flight} requests "
                                 "are already running or waiting; retry shortly")
        req_id = next(self._ids)
        q: asyncio.Queue = asyncio.Queue()
        if not self.busy:  # the watchdog's clock starts with the work
            self._last_sign = time.monotonic()
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
        if not self.busy:
            self._last_sign = time.monotonic()
        self._metric_waiters[token] = fut
        try:
            self._send(("metrics", token))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._metric_waiters.pop(token, None)

    def refuse(self, reason: str) -> None:
        """From now on, new requests fail with `reason` (code 14); running ones go on."""
        self.refusing = reason

    def cut(self, reason: str) -> int:
        """Ends the requests in flight with `reason` (code 14), aborting them in the engine;
        returns how many there were."""
        if self.alive and self._writer is not None:
            for req_id in self._queues:
                self._send(("abort", req_id))
        return self._fail_all(reason)

    async def stop(self, timeout: float = 1.0) -> None:
        """Asks the worker to exit, then kills it if it has not within `timeout`."""
        self.stopping = True
        self._stop_watch()
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
        self.stopping = True
        self._stop_watch()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
