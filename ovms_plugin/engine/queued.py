"""The frame of engines that run one request at a time, each step a whole request (an
image, a stateful LLM generation): an ordered queue, aborts that reach a running request
at once from the worker's reader thread, and progress sent in the middle of a step."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from ovms_plugin.engine.protocol import FailureKind, StepOutput, failed

log = logging.getLogger(__name__)


class QueuedEngine:
    long_steps = True  # metrics are answered from the reader thread, not after the step
    what = "the engine"  # how failures name it: "the image engine failed: ..."

    def __init__(self) -> None:
        self.queue: deque[tuple[int, Any]] = deque()  # (req_id, the kind's request)
        self.interrupted: set[int] = set()
        self.lock = threading.Lock()
        self.emit: Callable[[list[StepOutput]], None] = lambda outs: None  # set by the worker

    def add(self, req_id: int, payload: Any) -> None:
        self.queue.append((req_id, payload))

    def interrupt(self, req_id: int) -> None:
        """Called from the reader thread the moment an abort arrives."""
        with self.lock:
            self.interrupted.add(req_id)

    def abort(self, req_id: int) -> None:
        self.queue = deque(item for item in self.queue if item[0] != req_id)
        with self.lock:
            self.interrupted.discard(req_id)

    def has_work(self) -> bool:
        return bool(self.queue)

    def is_interrupted(self, req_id: int) -> bool:
        with self.lock:
            return req_id in self.interrupted

    def take_interrupt(self, req_id: int) -> bool:
        """Whether the request was aborted; forgets it (the request is over)."""
        with self.lock:
            if req_id in self.interrupted:
                self.interrupted.discard(req_id)
                return True
            return False

    def run(self, req_id: int, payload: Any) -> list[StepOutput]:
        """One whole request (engines that use step() below implement it)."""
        raise NotImplementedError

    def step(self) -> list[StepOutput]:
        """The oldest request, run whole. Its failure fails it alone: the engine goes on
        with the next. A request aborted meanwhile gives nothing."""
        req_id, payload = self.queue.popleft()
        if self.take_interrupt(req_id):
            return []
        try:
            outs = self.run(req_id, payload)
        except Exception as e:
            log.exception("%s failed", self.what)
            self.take_interrupt(req_id)
            # GenAI's checks name their source file first; the last line says what failed.
            why = (str(e).strip().splitlines() or [""])[-1]
            return [failed(req_id, FailureKind.INTERNAL,
                           f"{self.what} failed: {type(e).__name__}: {why}")]
        if self.take_interrupt(req_id):
            return []  # the caller is gone
        return outs
