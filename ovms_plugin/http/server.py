"""The standalone HTTP server (`python -m ovms_plugin serve`): the engines behind an
OpenAI-compatible and an AOG-compatible HTTP API, without AOG.

One asyncio process with aiohttp; every model runs in its own engine worker, as in plugin
mode (the front end never runs a model). Routes: routes_openai.py, routes_aog.py,
routes_ollama.py (Ollama's /api/...) and ops.py (/health, /ready, /metrics); cors.py answers
browsers (off unless --cors-origins, $OVMS_PLUGIN_CORS_ORIGINS or the cors_origins setting).

Behaviour:
- binds to 127.0.0.1 unless told otherwise; listens first, then preloads the named models
  (without --model, the built-in default model when it is installed); /ready answers 503
  until they are loaded. Other models load on first use. A model that fails to preload
  stops the server (exit code 1).
- models other than the preloaded ones are unloaded after --idle-unload seconds without a
  request (0 keeps them).
- a body over --max-body-mb gets 413; an optional API key (--api-key or
  OVMS_PLUGIN_API_KEY) is required as `Authorization: Bearer <key>` on every route but
  /health.
- a model at its limit of running plus waiting requests (its engine's max_num_seqs and
  settings' max_waiting_requests) answers 429 with `Retry-After: 1` and code "model_busy";
  503 is kept for a model that cannot be loaded for lack of memory and for a dead engine.
- a client that disconnects cancels its request in the engine, streamed or not: aiohttp
  cancels the handler when the connection is lost (handler_cancellation=True), and a
  stream's write to a closed connection ends it too.
- a request body that has not arrived in full after --body-timeout seconds (default 30) is
  answered 408 and its connection closed.
- an engine worker that dies, or that the watchdog finds stalled (engine.client), is
  restarted on its own; /ready answers 503 until it is back.
- SIGTERM or SIGINT (or cancelling serve()) stops accepting and refuses new requests (503),
  gives running ones --drain seconds (default 5) to finish, ends each still running with an
  error (a stream: an SSE error event, then `[DONE]` where the API has it), then unloads
  every model: no engine worker outlives the server.
- a port already in use (or otherwise not bindable) is one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from aiohttp import web

from ovms_plugin import osutil, paths, settings
from ovms_plugin.http import cors, ops, routes_aog, routes_ollama, routes_openai
from ovms_plugin.http.common import BODY_TIMEOUT, RUNTIME, STATE, ServerState
from ovms_plugin.service.errors import ServiceError
from ovms_plugin.service.runtime import Runtime
from ovms_plugin.store.store import ModelStore

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_IDLE_UNLOAD = 600.0  # seconds
DEFAULT_MAX_BODY_MB = 16.0
CUT_GRACE = 1.0  # seconds requests ended on shutdown get to send their error
API_KEY_ENV = "OVMS_PLUGIN_API_KEY"
SHUTDOWN_REASON = ("the server is shutting down; this request was stopped before it "
                   "finished (retry once the server is back)")


def create_app(runtime: Runtime, state: ServerState,
               body_timeout: float = settings.DEFAULT_BODY_TIMEOUT,
               cors_origins: Sequence[str] = (),
               idle_unload: float = DEFAULT_IDLE_UNLOAD) -> web.Application:
    app = web.Application(middlewares=[ops.access, cors.middleware, ops.auth, ops.errors],
                          client_max_size=state.max_body_bytes)
    app[RUNTIME] = runtime
    app[STATE] = state
    app[BODY_TIMEOUT] = float(body_timeout)
    app.on_response_prepare.append(ops.add_request_id)
    ops.add_routes(app)
    routes_openai.add_routes(app)
    routes_aog.add_routes(app)
    routes_ollama.add_routes(app, idle_unload)
    cors.setup(app, cors_origins)
    return app


def _default_models(store: ModelStore) -> list[str]:
    """The built-in default model, when it is installed (nothing is made or pulled here)."""
    from ovms_plugin.builtin import DEFAULT_MODEL
    return [DEFAULT_MODEL] if store.find(DEFAULT_MODEL) is not None else []


async def _preload(runtime: Runtime, state: ServerState, names: list[str]) -> None:
    for name in names:
        try:
            await runtime.load(name)
        except Exception as e:
            reason = e.message if isinstance(e, ServiceError) else f"{type(e).__name__}: {e}"
            state.preload_error = f"preloading model {name!r} failed: {reason}"
            raise
        finally:
            state.loading.remove(name)
        log.info("preloaded %s", name)


async def _unload_idle(runtime: Runtime, max_idle: float, keep: Iterable[str]) -> None:
    every = max(0.5, min(30.0, max_idle / 4))
    while True:
        await asyncio.sleep(every)
        try:
            await runtime.unload_idle(max_idle, keep=keep)
        except Exception:
            log.exception("unloading idle models failed")


def _bind_failure(host: str, port: int, e: OSError) -> str:
    """One line saying why the server cannot listen, and what to do."""
    where = f"{host}:{port}"
    if e.errno == errno.EADDRINUSE:
        return (f"cannot listen on {where}: port {port} is already in use (another server, "
                f"or another 'serve'); stop that process, or pick another port with --port "
                f"(--port 0 picks a free one)")
    if e.errno == errno.EACCES:
        return (f"cannot listen on {where}: permission denied (ports below 1024 need "
                "privileges); pick another port with --port")
    if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or isinstance(e, socket.gaierror):
        return (f"cannot listen on {where}: {host!r} is not an address of this machine; "
                "use --host 127.0.0.1 (this machine only) or 0.0.0.0 (all interfaces)")
    return f"cannot listen on {where}: {e.strerror or e}"


async def _drain(runner: web.AppRunner, runtime: Runtime, state: ServerState,
                 seconds: float) -> None:
    """Stops listening and refuses new requests, waits up to `seconds` for the running ones,
    then ends those still running with an error (a stream gets an SSE error event)."""
    for site in list(runner.sites):
        await site.stop()
    running = state.metrics.in_flight
    log.info("shutting down: %d request(s) running, given up to %.1f s to finish", running,
             seconds)
    await runtime.drain(seconds, SHUTDOWN_REASON, settle=CUT_GRACE,
                        running=lambda: state.metrics.in_flight)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                models: Sequence[str] | None = None, api_key: str | None = None,
                idle_unload_seconds: float = DEFAULT_IDLE_UNLOAD,
                max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20),
                models_dir: Path | None = None, images_dir: Path | None = None,
                drain_seconds: float | None = None, body_timeout: float | None = None,
                cors_origins: Sequence[str] | None = None) -> int:
    """Serves until cancelled, SIGTERM or SIGINT; returns the exit code (0, or 1 when a
    model could not be preloaded or the port cannot be bound). `models=None` preloads the
    built-in default model when it is installed; `api_key=None` takes OVMS_PLUGIN_API_KEY
    (unset or empty: no key); `drain_seconds` and `body_timeout` None take the settings
    (shutdown_drain_seconds, body_timeout_seconds)."""
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    try:
        if drain_seconds is None:
            drain_seconds = settings.shutdown_drain_seconds(plugin=False)
        if body_timeout is None:
            body_timeout = settings.body_timeout_seconds()
        cors_origins = cors.configured_origins(cors_origins)  # None: env, then settings
    except settings.SettingsError as e:
        log.error("%s", e)
        return 1
    runtime = Runtime(ModelStore(models_dir or paths.models_dir()))
    names = list(dict.fromkeys(_default_models(runtime.store) if models is None else models))
    state = ServerState(api_key=api_key, max_body_bytes=int(max_body_bytes),
                        images_dir=images_dir or paths.plugin_data_dir() / "images",
                        pinned=tuple(names), loading=list(names))
    if not _is_loopback(host) and not api_key:
        log.warning("listening on %s, beyond this machine, without an API key: anyone who "
                    "can reach it can use the models (set --api-key)", host)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = osutil.on_stop_signals(loop, stop.set)  # none outside the main thread
    settings.reload_on_sighup(loop)  # `kill -HUP` reads settings.yaml again at once
    # The drain happens before aiohttp's own shutdown, which then only has stragglers to
    # cancel (a request still loading its model, a client that stopped reading).
    runner = web.AppRunner(create_app(runtime, state, body_timeout, cors_origins,
                                      idle_unload_seconds),
                           handler_cancellation=True, shutdown_timeout=CUT_GRACE,
                           access_log=None)
    tasks: list[asyncio.Task] = []
    code = 0
    listening = False
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            log.error("%s", _bind_failure(host, port, e))
            return 1
        listening = True
        bound = runner.addresses[0][1] if runner.addresses else port
        log.info("listening on http://%s:%d (models: %s; API key %s)", host, bound,
                 runtime.store.root, "required" if api_key else "not required")
        preload = asyncio.create_task(_preload(runtime, state, names))
        preload.add_done_callback(lambda t: t.cancelled() or t.exception() is None
                                  or stop.set())
        tasks.append(preload)
        if idle_unload_seconds > 0:
            tasks.append(asyncio.create_task(
                _unload_idle(runtime, idle_unload_seconds, state.pinned)))
        tasks.append(asyncio.create_task(runtime.supervise()))
        await stop.wait()
        if state.preload_error:
            log.error("%s; stopping", state.preload_error)
            code = 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            if listening:
                # A second SIGTERM or SIGINT during the drain cuts it short.
                drain = asyncio.create_task(_drain(runner, runtime, state, drain_seconds))
                if signals:
                    osutil.on_stop_signals(loop, drain.cancel)
                try:
                    await drain
                except asyncio.CancelledError:
                    if not drain.cancelled():
                        raise
                    log.warning("shutting down at once: the drain was interrupted")
        finally:
            osutil.clear_signals(loop, signals)
            try:
                await runner.cleanup()
            finally:
                await runtime.unload_all()
    return code


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m ovms_plugin serve",
        description="Serve the models over an OpenAI-compatible and an AOG-compatible HTTP "
                    "API, without AOG.")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port (default {DEFAULT_PORT}; 0 picks a free one, logged)")
    p.add_argument("--model", action="append", dest="models", default=None, metavar="NAME",
                   help="model to load at start and keep loaded (repeatable; default: the "
                        "built-in default model when installed); others load on first use")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    p.add_argument("--idle-unload", type=float, default=DEFAULT_IDLE_UNLOAD, metavar="SECONDS",
                   help="unload models not named by --model after this long without a "
                        f"request (default {DEFAULT_IDLE_UNLOAD:.0f}; 0: never)")
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB, metavar="N",
                   help=f"largest request body accepted (default {DEFAULT_MAX_BODY_MB:.0f} MB)")
    p.add_argument("--drain", type=float, default=None, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long running requests get to finish before "
                        "each is ended with an error (default: shutdown_drain_seconds in "
                        f"settings, else {settings.SERVE_DRAIN_SECONDS:.0f})")
    p.add_argument("--body-timeout", type=float, default=None, metavar="SECONDS",
                   help="answer 408 when a request body has not arrived in full after this "
                        "long (default: body_timeout_seconds in settings, else "
                        f"{settings.DEFAULT_BODY_TIMEOUT:.0f}; 0: no limit)")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="model store folder (default: $OVMS_PLUGIN_MODELS or "
                        "<AOG data dir>/engine/ovms-plugin/models)")
    p.add_argument("--images-dir", type=Path, default=None,
                   help="where AOG-style text-to-image requests get their PNG files "
                        "(default <plugin data>/images)")
    p.add_argument("--cors-origins", default=None, metavar="ORIGINS",
                   help="let web apps of these origins call the server (comma-separated, "
                        "like http://localhost:3000; '*' for any; default: "
                        f"${cors.ENV}, else the cors_origins setting, else none)")
    args = p.parse_args(argv)
    if args.port < 0 or args.port > 65535:
        p.error("--port must be from 0 to 65535")
    if args.max_body_mb <= 0:
        p.error("--max-body-mb must be positive")
    if args.idle_unload < 0:
        p.error("--idle-unload must be 0 (never) or a number of seconds")
    if args.drain is not None and args.drain < 0:
        p.error("--drain must be 0 or more seconds")
    if args.body_timeout is not None and args.body_timeout < 0:
        p.error("--body-timeout must be 0 (no limit) or a number of seconds")
    if args.cors_origins is not None:
        try:
            args.cors_origins = cors.parse_origins(args.cors_origins)
        except ValueError as e:
            p.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ovms_plugin serve [flags]`: see parse_args."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from ovms_plugin.logs import setup_logging
    setup_logging()
    return asyncio.run(serve(host=args.host, port=args.port, models=args.models,
                             api_key=args.api_key, idle_unload_seconds=args.idle_unload,
                             max_body_bytes=int(args.max_body_mb * 2**20),
                             models_dir=args.models_dir, images_dir=args.images_dir,
                             drain_seconds=args.drain, body_timeout=args.body_timeout,
                             cors_origins=args.cors_origins))


if __name__ == "__main__":
    sys.exit(main())
