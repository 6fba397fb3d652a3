"""Plugin mode: what AOG launches. Checks the go-plugin handshake environment, starts the
gRPC server on loopback, prints the handshake line, then serves until Shutdown/SIGTERM.

Shutdown (the Shutdown RPC or SIGTERM): new requests are refused (code 14) and HealthCheck
fails; running requests get `shutdown_drain_seconds` (default 1 s, at most 1.2 s: AOG
SIGKILLs the plugin 2 s after Shutdown) to finish, then each still running ends with a
final message carrying code 14 and "the plugin is shutting down"; then the engine workers
are killed and the process exits. Meanwhile engines that die or stall are restarted on
their own (Runtime.supervise).

Only light modules are imported before the handshake line; OpenVINO is imported after it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ovms_plugin import engine_check, osutil, paths
from ovms_plugin.aog import servicer
from ovms_plugin.aog.proto import go_plugin_pb2, go_plugin_pb2_grpc
from ovms_plugin.service.runtime import Runtime
from ovms_plugin.store.store import ModelStore

log = logging.getLogger(__name__)

COOKIE_KEY = "AOG_PLUGIN"
COOKIE_VALUE = "aog-provider-plugin-v1"
CORE_PROTOCOL = 1
APP_PROTOCOL = 1
# AOG and its built-in engines listen on these.
RESERVED_PORTS = {9000, 16666, 16677, 16688}


class HandshakeError(Exception):
    pass


def check_handshake_env(env: dict[str, str]) -> None:
    if env.get(COOKIE_KEY) != COOKIE_VALUE:
        raise HandshakeError(
            "This binary is an AOG plugin and is not meant to be executed directly: AOG starts "
            f"it with {COOKIE_KEY}={COOKIE_VALUE} in the environment. To use it, install it "
            "with 'python -m ovms_plugin install-aog'; for the command line, run "
            "'python -m ovms_plugin --help'.")
    versions = env.get("PLUGIN_PROTOCOL_VERSIONS")
    if versions and str(APP_PROTOCOL) not in versions.split(","):
        raise HandshakeError(f"AOG asks for plugin protocol version(s) {versions}; this plugin "
                             f"speaks version {APP_PROTOCOL}")


class Controller(go_plugin_pb2_grpc.GRPCControllerServicer):
    def __init__(self, shutdown: asyncio.Event) -> None:
        self.shutdown = shutdown

    async def Shutdown(self, request, context):
        # Answer first, then stop: AOG waits 2 s for us to exit before SIGKILL.
        asyncio.get_running_loop().call_later(0.01, self.shutdown.set)
        return go_plugin_pb2.Empty()


class Stdio(go_plugin_pb2_grpc.GRPCStdioServicer):
    """go-plugin opens this after the handshake to copy the plugin's stdio; we log to stderr
    directly, so the stream just stays open (and empty) until shutdown."""

    def __init__(self, shutdown: asyncio.Event) -> None:
        self.shutdown = shutdown

    async def StreamStdio(self, request, context):
        await self.shutdown.wait()
        return
        yield  # makes this a (server-streaming) async generator


class Broker(go_plugin_pb2_grpc.GRPCBrokerServicer):
    """go-plugin opens the broker stream and ignores its errors; AOG never brokers."""

    async def StartStream(self, request_iterator, context):
        async for _ in request_iterator:
            pass
        return
        yield


def _bind(server: grpc.aio.Server, env: dict[str, str]) -> int:
    lo = int(env.get("PLUGIN_MIN_PORT") or 10000)
    hi = int(env.get("PLUGIN_MAX_PORT") or 25000)
    candidates = [p for p in range(lo, hi + 1) if p not in RESERVED_PORTS]
    random.shuffle(candidates)
    for port in candidates[:64]:
        try:
            if server.add_insecure_port(f"127.0.0.1:{port}") == port:
                return port
        except RuntimeError:
            continue
    port = server.add_insecure_port("127.0.0.1:0")  # the range is only a hint
    if not port:
        raise HandshakeError("could not bind a loopback port for the gRPC server")
    return port


SHUTDOWN_REASON = ("the plugin is shutting down; this request was stopped before it "
                   "finished (retry once the plugin is back)")


def _drain_seconds() -> float:
    from ovms_plugin import settings
    try:
        return settings.shutdown_drain_seconds(plugin=True)
    except settings.SettingsError as e:
        log.warning("%s; using %.1f s", e, settings.PLUGIN_DRAIN_SECONDS)
        return settings.PLUGIN_DRAIN_SECONDS


def gc_quietly(store: ModelStore) -> None:
    """The store's gc at start-up, off the event loop; a failure only logs."""
    try:
        store.gc()
    except Exception:
        log.exception("cleaning the model store's leftovers failed")


async def serve(models_dir: Path | None = None, env: dict[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    shutdown = asyncio.Event()
    runtime = Runtime(ModelStore(models_dir or paths.models_dir()))
    # AOG sends bodies of up to 2 GiB (gRPC's default cap is 4 MiB, and a 4-image answer is
    # more); the servicer refuses bodies over max_request_size itself, with a clear answer.
    limit = 2**31 - 1
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0),
                                      ("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", limit)])
    servicer.add_to_server(servicer.ProviderServicer(runtime), server)
    go_plugin_pb2_grpc.add_GRPCControllerServicer_to_server(Controller(shutdown), server)
    go_plugin_pb2_grpc.add_GRPCStdioServicer_to_server(Stdio(shutdown), server)
    go_plugin_pb2_grpc.add_GRPCBrokerServicer_to_server(Broker(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = _bind(server, env)
    await server.start()
    await health_servicer.set("plugin", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    # The handshake line: the server already listens, and nothing was printed before it.
    sys.stdout.write(f"{CORE_PROTOCOL}|{APP_PROTOCOL}|tcp|127.0.0.1:{port}|grpc\n")
    sys.stdout.flush()
    log.info("serving protocol.ProviderService on 127.0.0.1:%d (models: %s)", port,
             runtime.store.root)

    loop = asyncio.get_running_loop()
    loop.run_in_executor(None, gc_quietly, runtime.store)  # leftovers of killed pulls
    # SIGTERM on POSIX; on Windows only GRPCController/Shutdown (TerminateProcess cannot be
    # caught, and Ctrl-C/Ctrl-Break are AOG's: ignored in main()).
    osutil.on_stop_signals(loop, shutdown.set, ("SIGTERM",))
    from ovms_plugin import settings
    settings.reload_on_sighup(loop)  # `kill -HUP` reads settings.yaml again at once
    # Import OpenVINO now, in the background, so the first real call does not pay for it.
    check = asyncio.create_task(engine_check.check())
    idle = asyncio.create_task(_unload_idle(runtime))
    supervisor = asyncio.create_task(runtime.supervise())
    await shutdown.wait()
    idle.cancel()
    supervisor.cancel()
    drain = _drain_seconds()
    log.info("shutting down: %d request(s) running, given up to %.1f s to finish",
             runtime.requests_in_flight(), drain)
    await health_servicer.set("plugin", health_pb2.HealthCheckResponse.NOT_SERVING)
    # AOG gives us 2 s in all after Shutdown: the drain, the final error messages (0.3 s at
    # most), then the workers (they hold no state worth saving) and the server.
    await runtime.drain(drain, SHUTDOWN_REASON, settle=0.3)
    runtime.kill_all()
    await asyncio.gather(runtime.unload_all(), server.stop(grace=0.3))
    check.cancel()
    return 0


async def _unload_idle(runtime: Runtime) -> None:
    """Unloads models idle for `idle_unload_seconds` (off by default: AOG unloads models
    after 5 idle minutes itself)."""
    from ovms_plugin import settings
    while True:
        try:
            seconds = settings.idle_unload_seconds()
        except settings.SettingsError as e:
            log.warning("%s", e)
            seconds = 0
        await asyncio.sleep(min(seconds / 4, 30) if seconds else 30)
        if seconds:
            await runtime.unload_idle(seconds)


def main(models_dir: Path | None = None) -> int:
    try:
        check_handshake_env(dict(os.environ))
    except HandshakeError as e:
        sys.stderr.write(f"{e}\n")
        return 1
    # Ctrl-C in AOG's terminal reaches the whole process group; AOG handles it for us.
    osutil.ignore_interrupts()
    from ovms_plugin.logs import setup_logging
    setup_logging()
    return asyncio.run(serve(models_dir))
