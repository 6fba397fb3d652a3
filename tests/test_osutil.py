"""The platform module (ovms_plugin/osutil.py). Its POSIX branches run here; its Windows
branches (job objects, signals, locks, kill, directories) run against fakes of the OS calls,
so their arguments are checked though they cannot run on Linux. The engine channel's
loopback transport (Windows' default) runs here for real."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ovms_plugin import osutil, paths

# --- the engine channel ----------------------------------------------------------------------

CHILD = """
import os, sys
from ovms_plugin import osutil
args = sys.argv[1:]
fd = int(args[1]) if args[0] == "--fd" else None
sock = osutil.connect_engine_channel(fd, None if fd is not None else args[1])
token_left = osutil.TOKEN_ENV in os.environ
data = b""
while len(data) < 5:
    data += sock.recv(5 - len(data))
sock.sendall(data.upper() + (b"!" if token_left else b"."))
"""


async def _talk(channel: osutil.EngineChannel, *, before_child: Any = None) -> bytes:
    if before_child is not None:
        before_child()
    env = {**os.environ, **channel.env}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, *channel.child_args, env=env, **channel.popen_kwargs)
    channel.started()
    try:
        sock = await channel.connected(proc.wait(), timeout=60)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"hello")
        answer = await asyncio.wait_for(reader.readexactly(6), 60)
        writer.close()
        return answer
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


@pytest.mark.parametrize("transport", ["socketpair", "loopback"])
def test_channel_carries_bytes_both_ways(transport: str):
    channel = osutil.engine_channel(transport)
    assert channel.transport == transport
    # The token never goes on the command line; the child removes it from its environment.
    assert not any(osutil.TOKEN_ENV in a or len(a) >= 64 for a in channel.child_args)
    assert asyncio.run(_talk(channel)) == b"HELLO."


def test_loopback_drops_connections_without_the_token():
    channel = osutil.engine_channel("loopback")
    port = int(channel.child_args[1].rsplit(":", 1)[1])
    intruders: list[socket.socket] = []

    def intrude() -> None:
        wrong = socket.create_connection(("127.0.0.1", port))
        wrong.sendall(b"0" * 64)
        silent = socket.create_connection(("127.0.0.1", port))  # connects, says nothing
        intruders.extend([wrong, silent])

    started = time.monotonic()
    assert asyncio.run(_talk(channel, before_child=intrude)) == b"HELLO."
    # The silent one did not hold the worker up for its token timeout.
    assert time.monotonic() - started < osutil.TOKEN_SECONDS
    intruders[0].settimeout(5)
    assert intruders[0].recv(1) == b""  # closed on it
    for s in intruders:
        s.close()
    with pytest.raises(OSError):  # the listener is gone once the worker is connected
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_a_worker_that_exits_before_connecting_is_an_error_at_once():
    async def run() -> None:
        channel = osutil.engine_channel("loopback")
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "raise SystemExit(3)")
        channel.started()
        with pytest.raises(ConnectionError, match="exited before it connected"):
            await channel.connected(proc.wait(), timeout=60)

    started = time.monotonic()
    asyncio.run(run())
    assert time.monotonic() - started < 30


def test_transport_choice(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(osutil.TRANSPORT_ENV, raising=False)
    assert osutil.default_transport() == "socketpair"
    monkeypatch.setattr(osutil, "_is_windows", lambda: True)
    assert osutil.default_transport() == "loopback"  # no pass_fds on Windows
    monkeypatch.setenv(osutil.TRANSPORT_ENV, "socketpair")
    with pytest.raises(ValueError, match="needs POSIX"):
        osutil.default_transport()
    monkeypatch.setenv(osutil.TRANSPORT_ENV, "pipes")
    with pytest.raises(ValueError, match="socketpair, loopback"):
        osutil.default_transport()


def test_the_child_refuses_to_connect_without_a_token(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(osutil.TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match=osutil.TOKEN_ENV):
        osutil.connect_engine_channel(None, "127.0.0.1:9")


# --- Windows: the job object -----------------------------------------------------------------

class FakeKernel32:
    """Records the calls, checks the arguments a 64-bit Windows would read."""

    def __init__(self, fail: str = "") -> None:
        self.calls: list[tuple] = []
        self.fail = fail
        self.limit_flags: int | None = None

    def CreateJobObjectW(self, attrs: Any, name: Any) -> int:
        self.calls.append(("CreateJobObjectW", attrs, name))
        return 0 if self.fail == "create" else 0x44

    def SetInformationJobObject(self, job: int, cls: int, info: Any, size: int) -> int:
        struct = ctypes.cast(info, ctypes.POINTER(osutil.JobObjectExtendedLimitInformation))
        self.limit_flags = struct.contents.BasicLimitInformation.LimitFlags
        self.calls.append(("SetInformationJobObject", job, cls, size))
        return 0 if self.fail == "set" else 1

    def OpenProcess(self, access: int, inherit: bool, pid: int) -> int:
        self.calls.append(("OpenProcess", access, inherit, pid))
        return 0 if self.fail == "open" else 0x88

    def AssignProcessToJobObject(self, job: int, proc: int) -> int:
        self.calls.append(("AssignProcessToJobObject", job, proc))
        return 0 if self.fail == "assign" else 1

    def CloseHandle(self, handle: int) -> int:
        self.calls.append(("CloseHandle", handle))
        return 1


def test_job_structures_have_windows_x64_layout():
    # winnt.h on x64: JOBOBJECT_BASIC_LIMIT_INFORMATION is 64 bytes with LimitFlags at 16,
    # IO_COUNTERS 48, JOBOBJECT_EXTENDED_LIMIT_INFORMATION 144.
    assert ctypes.sizeof(osutil.JobObjectBasicLimitInformation) == 64
    assert osutil.JobObjectBasicLimitInformation.LimitFlags.offset == 16
    assert ctypes.sizeof(osutil.IoCounters) == 48
    assert ctypes.sizeof(osutil.JobObjectExtendedLimitInformation) == 144


def test_children_join_one_kill_on_close_job(monkeypatch: pytest.MonkeyPatch):
    k = FakeKernel32()
    monkeypatch.setattr(osutil, "_is_windows", lambda: True)
    monkeypatch.setattr(osutil, "_kernel32", lambda: k)
    monkeypatch.setattr(osutil, "_job", None)
    assert osutil.tie_to_plugin(1234) and osutil.tie_to_plugin(5678)
    assert k.calls == [
        ("CreateJobObjectW", None, None),  # one job, made on first use
        ("SetInformationJobObject", 0x44, 9, 144),  # JobObjectExtendedLimitInformation
        ("OpenProcess", 0x0101, False, 1234),  # PROCESS_SET_QUOTA | PROCESS_TERMINATE
        ("AssignProcessToJobObject", 0x44, 0x88), ("CloseHandle", 0x88),
        ("OpenProcess", 0x0101, False, 5678),
        ("AssignProcessToJobObject", 0x44, 0x88), ("CloseHandle", 0x88)]
    assert k.limit_flags == 0x2000  # JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE


@pytest.mark.parametrize("fail", ["create", "set", "open", "assign"])
def test_job_failures_are_errors_and_leak_no_handle(monkeypatch: pytest.MonkeyPatch, fail: str):
    k = FakeKernel32(fail)
    monkeypatch.setattr(osutil, "_is_windows", lambda: True)
    monkeypatch.setattr(osutil, "_kernel32", lambda: k)
    monkeypatch.setattr(osutil, "_job", None)
    with pytest.raises(OSError, match="failed"):
        osutil.tie_to_plugin(42)
    opened = [c for c in k.calls if c[0] in ("OpenProcess",) and fail != "open"]
    closed = [c for c in k.calls if c == ("CloseHandle", 0x88)]
    assert len(closed) == len(opened)
    if fail == "set":
        assert ("CloseHandle", 0x44) in k.calls


def test_tie_to_plugin_is_for_windows_only():
    assert osutil.tie_to_plugin(os.getpid()) is False  # Linux: the child's own death signal


# --- Windows: processes, signals, locks -------------------------------------------------------

def test_windows_children_get_no_console_window_and_a_group(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(osutil, "_is_windows", lambda: True)
    assert osutil.child_popen_kwargs() == {"creationflags": 0x08000000}
    assert osutil.own_group_kwargs() == {"creationflags": 0x08000200}


def test_windows_kill_group_ends_the_tree(monkeypatch: pytest.MonkeyPatch):
    runs: list[tuple] = []
    monkeypatch.setattr(osutil, "_is_windows", lambda: True)
    monkeypatch.setattr(osutil.subprocess, "run", lambda *a, **k: runs.append((a, k)))

    class Proc:
        pid = 4321
        killed = waited = False

        def poll(self) -> int | None:
            return None

        def kill(self) -> None:
            self.killed = True

        def wait(self) -> int:
            self.waited = True
            return 1

    proc = Proc()
    osutil.kill_group(proc)  # type: ignore[arg-type]
    (args, kwargs), = runs
    assert args == (["taskkill", "/F", "/T", "/PID", "4321"],)
    assert kwargs["creationflags"] == 0x08000000 and kwargs["check"] is False
    assert proc.killed and proc.waited


class FakeSignal:
    SIGINT, SIGTERM, SIGBREAK = 2, 15, 21
    SIG_IGN, SIG_DFL = "ign", "dfl"

    def __init__(self) -> None:
        self.handlers: dict[int, Any] = {}

    def signal(self, num: int, handler: Any) -> None:
        self.handlers[num] = handler


def test_windows_stop_signals_reach_the_loop(monkeypatch: pytest.MonkeyPatch):
    fake = FakeSignal()
    monkeypatch.setattr(osutil, "_is_windows", lambda: True)
    monkeypatch.setattr(osutil, "_signal_module", lambda: fake)

    async def run() -> list[str]:
        loop = asyncio.get_running_loop()
        seen: list[str] = []
        wired = osutil.on_stop_signals(loop, lambda: seen.append("stop"))
        assert wired == [2, 21]  # Ctrl-C and Ctrl-Break
        fake.handlers[21](21, None)  # as Python runs a handler: in the main thread
        await asyncio.sleep(0.05)
        assert osutil.on_reload_signal(loop, lambda: None) is False  # no SIGHUP there
        osutil.clear_signals(loop, wired)
        return seen

    assert asyncio.run(run()) == ["stop"]
    assert fake.handlers == {2: "dfl", 21: "dfl"}


def test_windows_ignores_ctrl_c_and_ctrl_break(monkeypatch: pytest.MonkeyPatch):
    fake = FakeSignal()
    monkeypatch.setattr(osutil, "_signal_module", lambda: fake)
    osutil.ignore_interrupts()
    assert fake.handlers == {2: "ign", 21: "ign"}


def test_posix_stop_signals_use_the_loop():
    async def run() -> None:
        loop = asyncio.get_running_loop()
        got = asyncio.Event()
        wired = osutil.on_stop_signals(loop, got.set, ("SIGUSR1",))
        assert wired == [signal.SIGUSR1]
        os.kill(os.getpid(), signal.SIGUSR1)
        await asyncio.wait_for(got.wait(), 5)
        osutil.clear_signals(loop, wired)

    asyncio.run(run())


def test_windows_file_lock_takes_filelocks_windows_lock(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path):
    import filelock
    made: list[tuple] = []

    class FakeWindowsLock:
        def __init__(self, path: str, timeout: float) -> None:
            made.append(("new", path, timeout))

        def __enter__(self) -> None:
            made.append(("acquire",))

        def __exit__(self, *exc: Any) -> None:
            made.append(("release",))

    monkeypatch.setattr(osutil, "_is_windows", lambda: True)
    monkeypatch.setattr(filelock, "WindowsFileLock", FakeWindowsLock)
    with osutil.file_lock(tmp_path / "x.lock"):
        made.append(("inside",))
    # Blocking (timeout -1), a fresh lock object per call (not reentrant across threads).
    assert made == [("new", str(tmp_path / "x.lock"), -1), ("acquire",), ("inside",),
                    ("release",)]


# --- memory and processes (psutil, run here) ---------------------------------------------------

def test_memory_figures():
    total, free = osutil.physical_memory_bytes(), osutil.available_memory_bytes()
    assert 0 < free <= total
    assert 10 * 2**20 < (osutil.rss_bytes() or 0) < total
    assert osutil.rss_bytes(2**22 + 12345) is None  # no such process


def test_proc_state_sees_cpu_and_stops():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        first = osutil.proc_state(busy.pid)
        time.sleep(0.5)
        second = osutil.proc_state(busy.pid)
        assert first and second and second.cpu_seconds > first.cpu_seconds
        assert not second.stopped
        os.kill(busy.pid, signal.SIGSTOP)
        time.sleep(0.2)
        state = osutil.proc_state(busy.pid)
        assert state and state.stopped
        os.kill(busy.pid, signal.SIGCONT)
    finally:
        busy.kill()
        busy.wait()
    assert osutil.proc_state(busy.pid) is None and not osutil.pid_alive(busy.pid)


def test_a_zombie_is_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while osutil.pid_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not osutil.pid_alive(child.pid)  # exited, not yet reaped
    child.wait()


# --- directories and names ---------------------------------------------------------------------

WIN_ENV = {"APPDATA": r"C:\Users\me\AppData\Roaming", "LOCALAPPDATA": r"C:\Users\me\AppData\Local"}


def test_windows_directories(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(osutil, "_is_windows", lambda: True)
    for key, value in WIN_ENV.items():
        monkeypatch.setenv(key, value)
    for key in ("AOG_DATA_DIR", "OVMS_PLUGIN_HOME", "OVMS_PLUGIN_MODELS"):
        monkeypatch.delenv(key, raising=False)
    roaming, local = Path(WIN_ENV["APPDATA"]), Path(WIN_ENV["LOCALAPPDATA"])
    assert paths.aog_data_dir() == roaming / "AOG"  # as AOG computes it
    assert paths.default_plugins_dir() == roaming / "AOG" / "plugins"
    assert paths.settings_file() == roaming / "AOG" / "engine" / "ovms-plugin" / "settings.yaml"
    # Weights stay out of the roaming profile.
    assert paths.models_dir() == local / "AOG" / "engine" / "ovms-plugin" / "models"
    assert paths.cache_dir() == local / "ovms-plugin"
    monkeypatch.setenv("OVMS_PLUGIN_HOME", "/elsewhere")
    assert paths.models_dir() == Path("/elsewhere/models")


def test_macos_and_linux_directories(monkeypatch: pytest.MonkeyPatch):
    for key in ("AOG_DATA_DIR", "OVMS_PLUGIN_HOME", "OVMS_PLUGIN_MODELS", "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    assert paths.aog_data_dir() == Path("/var/lib/aog")
    assert paths.models_dir() == Path("/var/lib/aog/engine/ovms-plugin/models")
    monkeypatch.setattr(osutil, "MACOS", True)
    support = Path.home() / "Library" / "Application Support" / "AOG"
    assert paths.aog_data_dir() == support
    assert paths.models_dir() == support / "engine" / "ovms-plugin" / "models"
    assert paths.cache_dir() == Path.home() / "Library" / "Caches" / "ovms-plugin"


@pytest.mark.parametrize("name", ["CON", "con.txt", "Nul", "COM1", "lpt9.bin", "COM¹",
                                  "CONIN$", "a:b", "a?b", "a*b", 'a"b', "a<b", "a|b", "x.",
                                  "x ", "tab\there"])
def test_names_windows_refuses(name: str):
    assert osutil.windows_name_problem(name)


@pytest.mark.parametrize("name", ["model.bin", "CONSOLE", "com10", "config.json", "x.y",
                                  "nul_model", "tokenizer.model"])
def test_names_windows_takes(name: str):
    assert osutil.windows_name_problem(name) is None


def test_aog_platform_names(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(osutil._platform, "machine", lambda: "AMD64")
    monkeypatch.setattr(osutil, "_is_windows", lambda: True)
    assert osutil.aog_platform() == "windows_amd64"
    monkeypatch.setattr(osutil, "_is_windows", lambda: False)
    monkeypatch.setattr(osutil._platform, "machine", lambda: "arm64")
    monkeypatch.setattr(osutil.sys, "platform", "darwin")
    assert osutil.aog_platform() == "darwin_arm64"


def test_only_the_platform_module_knows_the_system():
    """What differs between Linux, macOS and Windows is asked of osutil, nowhere else."""
    package = Path(osutil.__file__).parent
    markers = ("sys.platform", "os.name ==", "/proc/", '"/proc', "os.sysconf", "sysconf(",
               "add_signal_handler", "pass_fds", "killpg", "prctl", "signal.SIGKILL",
               "signal.SIGTERM", '"LOCALAPPDATA"', '"APPDATA"')
    offenders = [f"{path.relative_to(package.parent)}:{n}: {line.strip()}"
                 for path in sorted(package.rglob("*.py")) if path.name != "osutil.py"
                 and "proto" not in path.parts
                 for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if any(m in line for m in markers)]
    assert not offenders, "\n".join(offenders)
