"""An engine client for tests that runs a kind's engine in this process, no worker: the
kind's own make_engine, driven by the worker loop's contract (add, abort, has_work, step),
one step per event-loop turn. Pass it as Runtime(store, client_factory=InProcessClient)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ovms_plugin import kinds
from ovms_plugin.engine.client import EngineError, Output
from ovms_plugin.engine.protocol import EngineFailure, FailureKind


class InProcessClient:
    _ids = itertools.count(1)
    fail_on: tuple[str, ...] = ()  # device families whose "compile" fails (routing tests)
    started: list[InProcessClient] = []  # noqa: RUF012 - every client made, for assertions

    def __init__(self, name: str, kind: str, model_dir: Path, config: dict[str, Any],
                 max_in_flight: int) -> None:
        self.name, self.kind, self.model_dir = name, kind, model_dir
        self.config, self.max_in_flight = config, max_in_flight
        self.info: dict[str, Any] = {}
        self.dead_reason: str | None = None
        self.engine: Any = None
        self._queues: dict[int, asyncio.Queue] = {}
        self._stepper: asyncio.Task | None = None
        self._running = False
        InProcessClient.started.append(self)

    @property
    def alive(self) -> bool:
        return self._running and self.dead_reason is None

    @property
    def in_flight(self) -> int:
        return len(self._queues)

    async def start(self) -> dict[str, Any]:
        if self.config["device"].split(".")[0] in self.fail_on:
            raise EngineError.of(FailureKind.LOAD_FAILED,
                                 f"cannot compile on {self.config['device']}")
        self.engine = kinds.get(self.kind).make_engine(self.model_dir, self.config)
        self.info = self.engine.info()
        self._running = True
        return self.info

    def _kick(self) -> None:
        if self._stepper is None or self._stepper.done():
            self._stepper = asyncio.get_running_loop().create_task(self._steps())

    async def _steps(self) -> None:
        while self._running and self.engine.has_work():
            for out in self.engine.step():
                q = self._queues.get(out.req_id)
                if q is not None:
                    q.put_nowait((out.result, out.finish, out.error))
            await asyncio.sleep(0)

    async def submit(self, payload: Any) -> AsyncIterator[Output]:
        if not self.alive:
            raise EngineError.of(FailureKind.ENGINE_DIED, f"model {self.name!r} is not running")
        if self.in_flight >= self.max_in_flight:
            raise EngineError.of(FailureKind.BUSY, f"model {self.name!r} is busy")
        req_id = next(self._ids)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[req_id] = q
        finished = False
        try:
            try:
                self.engine.add(req_id, payload)
            except Exception as e:
                finished = True
                raise EngineError.of(FailureKind.INTERNAL, f"{type(e).__name__}: {e}") from None
            self._kick()
            while True:
                result, finish, error = await q.get()
                if error is not None:
                    finished = True
                    raise EngineError(error)  # the step output's EngineFailure
                finished = finish is not None
                yield Output(result, finish)
                if finished:
                    return
        finally:
            del self._queues[req_id]
            if not finished and self._running:
                self.engine.abort(req_id)

    async def metrics(self, timeout: float = 5.0) -> dict[str, Any]:
        return self.engine.metrics()

    async def stop(self, timeout: float = 1.0) -> None:
        self._running = False
        for q in self._queues.values():
            q.put_nowait((None, None, EngineFailure(FailureKind.ENGINE_DIED,
                                                    f"model {self.name!r} was unloaded")))

    def kill(self) -> None:
        self._running = False
