"""Engine worker process: owns one OpenVINO pipeline and runs its loop.

Started by the front end (engine.client) as
    python -m ovms_plugin.engine.worker (--fd N | --connect HOST:PORT) --kind KIND
        --model-dir DIR --config JSON
with stdout on /dev/null and stderr on a pipe the front end reads, never the plugin's own
stdout/stderr (AOG's shutdown waits for EOF on those). It dies with its parent: a
parent-death signal (Linux), the plugin's job object (Windows), and EOF on the engine
socket (everywhere). The socket is an inherited descriptor (--fd) on POSIX, or a loopback
connection that proves itself with a one-time token (--connect) on Windows (osutil).

While it has work, a heartbeat thread tells the front end it is alive when the loop went
quiet (a prefill chunk gives no tokens, an image's last phase no step) but is still making
progress: the loop moved on since the last beat, or the process spent CPU time. A loop stuck
without using the CPU (or a stopped process) sends nothing, and the front end's watchdog
(engine.client) restarts the worker. `--beat 0` turns the heartbeat off.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from ovms_plugin import osutil
from ovms_plugin.engine import ipc
from ovms_plugin.engine.protocol import FailureKind, StepOutput, failed
from ovms_plugin.logs import setup_logging
from ovms_plugin.osutil import rss_bytes
from ovms_plugin.procs import die_with_parent

log = logging.getLogger("ovms_plugin.worker")


class Engine(Protocol):
    """One kind's engine (LLM, embeddings, images): what the worker loop drives. `add`
    takes the kind's request dataclass; `step` returns what came out of one step."""

    def info(self) -> dict[str, Any]: ...
    def add(self, req_id: int, payload: Any) -> None: ...
    def abort(self, req_id: int) -> None: ...
    def has_work(self) -> bool: ...
    def step(self) -> list[StepOutput]: ...
    def metrics(self) -> dict[str, Any]: ...


def make_engine(kind: str, model_dir: Path, config: dict[str, Any]) -> Engine:
    """The engine of a registered kind (ovms_plugin.kinds)."""
    from ovms_plugin import kinds
    return kinds.get(kind).make_engine(model_dir, config)


class _Sender:
    """Messages to the front end, from the loop, the reader and progress callbacks."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.last = time.monotonic()  # when the front end last heard from us

    def __call__(self, msg: Any) -> None:
        with self.lock:
            ipc.send(self.sock, msg)
            self.last = time.monotonic()


class _Progress:
    """What the heartbeat reads of the loop: whether it waits for work, and a counter it
    moves on every turn and every mid-step report (plain attributes: the GIL keeps them
    whole)."""

    def __init__(self) -> None:
        self.idle = False  # loading counts as busy
        self.count = 0


def _metrics(engine: Engine) -> dict[str, Any]:
    """The engine's own metrics, and the memory its worker process holds."""
    return {**engine.metrics(), "worker_rss_bytes": rss_bytes()}


def _heartbeat(send: _Sender, progress: _Progress, every: float) -> None:
    """Sends ("beat",) every `every` seconds while the loop has work but sent nothing for
    that long, and only when it is making progress: its counter moved, or the process used
    at least 5 % of a core (a long step computing, possibly holding the GIL between
    beats). A loop hung without computing, or a stopped process, sends no beat."""
    count, cpu = progress.count, time.process_time()
    while True:
        time.sleep(every)
        now_count, now_cpu = progress.count, time.process_time()
        moving = now_count != count or now_cpu - cpu >= 0.05 * every
        count, cpu = now_count, now_cpu
        if progress.idle or not moving or time.monotonic() - send.last < every:
            continue
        try:
            send(("beat",))
        except OSError:
            return


def _reader(sock: socket.socket, inbox: queue.SimpleQueue, engine_ref: list,
            send: _Sender) -> None:
    """Receives front-end messages into the inbox; EOF means the front end is gone. Engines
    with long steps (an image's denoising loop) hear of aborts at once, through
    `interrupt`, and have their metrics answered from here rather than after the step."""
    try:
        while True:
            msg = ipc.recv(sock)
            engine = engine_ref[0] if engine_ref else None
            if msg[0] == "abort" and hasattr(engine, "interrupt"):
                engine.interrupt(msg[1])
            if msg[0] == "metrics" and getattr(engine, "long_steps", False):
                send(("metrics", msg[1], _metrics(engine)))
                continue
            inbox.put(msg)
    except (EOFError, OSError):
        pass
    # No one is left to serve: leave now, even if the engine is mid-step.
    os._exit(0)


def serve(engine: Engine, send: _Sender, inbox: queue.SimpleQueue,
          progress: _Progress | None = None) -> None:
    """The loop: take new messages (blocking only when idle), step, send what came out."""
    progress = progress or _Progress()
    if hasattr(engine, "emit"):  # engines that report progress in the middle of a step
        def emit(outs: list) -> None:
            progress.count += 1
            send(("out", [o.wire() for o in outs]))
        engine.emit = emit

    while True:
        progress.count += 1
        msgs = []
        if not engine.has_work():
            progress.idle = True
            msgs.append(inbox.get())
            progress.idle = False
        while True:
            try:
                msgs.append(inbox.get_nowait())
            except queue.Empty:
                break
        errors: list[StepOutput] = []
        for msg in msgs:
            op = msg[0]
            if op == "add":
                try:
                    engine.add(msg[1], msg[2])
                except Exception as e:  # a bad request must not take the engine down
                    errors.append(failed(msg[1], FailureKind.INTERNAL,
                                         f"{type(e).__name__}: {e}"))
            elif op == "abort":
                engine.abort(msg[1])
            elif op == "metrics":
                send(("metrics", msg[1], _metrics(engine)))
            elif op == "shutdown":
                return
        if errors:
            send(("out", [o.wire() for o in errors]))
        if engine.has_work():
            outs = engine.step()
            if outs:
                send(("out", [o.wire() for o in outs]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--fd", type=int, help="the inherited socket (POSIX)")
    where.add_argument("--connect", help="HOST:PORT to connect to, with the token from the "
                       f"environment ({osutil.TOKEN_ENV})")
    parser.add_argument("--kind", required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--config", default="{}")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--name", default="")
    parser.add_argument("--beat", type=float, default=0.0,
                        help="heartbeat interval in seconds while busy (0: none)")
    args = parser.parse_args(argv)
    die_with_parent(args.parent_pid)
    osutil.ignore_interrupts()  # Ctrl-C in AOG's terminal is not for us
    setup_logging(prefix=f"worker[{args.name or args.model_dir.name}] ")
    sock = osutil.connect_engine_channel(args.fd, args.connect)
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    engine_ref: list = []
    send = _Sender(sock)
    progress = _Progress()
    threading.Thread(target=_reader, args=(sock, inbox, engine_ref, send), daemon=True).start()
    if args.beat > 0:
        threading.Thread(target=_heartbeat, args=(send, progress, args.beat),
                         daemon=True).start()
    try:
        engine = make_engine(args.kind, args.model_dir, json.loads(args.config))
    except Exception as e:
        log.exception("loading %s failed", args.model_dir)
        send(("fatal", f"{type(e).__name__}: {e}"))
        return 1
    send(("ready", engine.info()))
    engine_ref.append(engine)
    serve(engine, send, inbox, progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
