"""The one place that knows the operating system: what differs between Linux, macOS and
Windows.

- children that die with the plugin (`child_popen_kwargs`, `tie_to_plugin`,
  `set_parent_death_signal`, process groups);
- the engine workers' channel (`engine_channel` / `connect_engine_channel`);
- file locks (`file_lock`);
- memory and process state (`physical_memory_bytes`, `available_memory_bytes`, `rss_bytes`,
  `proc_state`, `pid_alive`);
- signals (`on_stop_signals`, `on_reload_signal`, `ignore_interrupts`);
- directories (`aog_data_dir`, `local_data_dir`, `cache_base_dir`), reserved file names and
  AOG's platform name.

Importing this module imports nothing POSIX-only (no fcntl, resource, termios, pwd, grp);
each function imports what its platform needs when it is called, so the package imports on
Windows. The Windows branches take the OS calls through `_kernel32()` and `_signal_module()`,
so that tests on Linux can check their arguments against fakes. (Named osutil, not platform,
so that running a file of this folder as a script cannot shadow the standard library's
`platform`.)
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hmac
import os
import platform as _platform
import re
import secrets
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WINDOWS = sys.platform == "win32"
MACOS = sys.platform == "darwin"

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _is_windows() -> bool:
    return WINDOWS


# --- file locks -------------------------------------------------------------------------------

@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Holds an exclusive lock on the file `path` (created if missing; left in place on POSIX)
    for the `with` block, waiting as long as it takes for it. Serializes processes and the
    threads of one process alike: each call takes a lock of its own, so a `with` on a path
    another thread holds waits for it. Not reentrant: nesting two on one path in one thread
    is a bug (filelock raises RuntimeError rather than deadlock). The operating system drops
    the lock when its holder dies. Through `filelock`: flock(2) on POSIX, msvcrt.locking on
    Windows."""
    import filelock  # imports fcntl on POSIX: only here, when a lock is taken

    lock_class = filelock.WindowsFileLock if _is_windows() else filelock.FileLock
    # A fresh object per call: a lock object shared by callers is reentrant in a thread.
    with lock_class(os.fspath(path), timeout=-1):
        yield


# --- memory and process state (psutil on every system) -----------------------------------------

def physical_memory_bytes() -> int:
    import psutil
    return int(psutil.virtual_memory().total)


def available_memory_bytes() -> int:
    """Memory the OS could give us now without swapping (Linux's MemAvailable, Windows'
    available physical memory, macOS's free + inactive)."""
    import psutil
    return int(psutil.virtual_memory().available)


def rss_bytes(pid: int | None = None) -> int | None:
    """The physical memory a process (this one by default) holds now, in bytes (its working
    set on Windows); None where it cannot be read or the process is gone."""
    import psutil
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.Error, OSError):
        return None


def peak_rss_bytes() -> int | None:
    """The most physical memory this process has held so far, in bytes; None where it cannot
    be read."""
    if _is_windows():
        import psutil
        try:
            return int(psutil.Process().memory_info().peak_wset)
        except (psutil.Error, OSError, AttributeError):
            return None
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if MACOS else int(peak) * 1024  # bytes there, KiB on Linux


@dataclass(frozen=True)
class ProcState:
    stopped: bool  # suspended (SIGSTOP, a debugger): it cannot make progress
    cpu_seconds: float  # user + system time of all its threads so far


def proc_state(pid: int) -> ProcState | None:
    """Whether a process is stopped and the CPU time it has used; None when it is gone or
    cannot be read."""
    import psutil
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            times = p.cpu_times()
            status = p.status()
    except (psutil.Error, OSError):
        return None
    return ProcState(status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP),
                     float(times.user + times.system))


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (a zombie counts as gone)."""
    if pid <= 0:
        return False
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except (psutil.Error, OSError):
        return True  # someone else's process: it exists


def cpu_name() -> str:
    """The CPU's marketing name where the system says it (Linux /proc/cpuinfo, macOS sysctl,
    Windows' processor string), else the architecture."""
    name = _platform.processor() or _platform.machine()
    if MACOS:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                 capture_output=True, text=True, timeout=5, check=False)
            name = out.stdout.strip() or name
    elif not _is_windows():
        with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    return name


# --- children that die with the plugin ---------------------------------------------------------

# Windows process-creation flags (winbase.h): no console window for a child of a process that
# has none (AOG runs plugins without one), and a process group of its own.
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000


def child_popen_kwargs() -> dict[str, Any]:
    """subprocess / asyncio arguments for a helper process (engine worker, prompt helper):
    on Windows, no console window flashing up."""
    return {"creationflags": CREATE_NO_WINDOW} if _is_windows() else {}


def set_parent_death_signal() -> bool:
    """Linux: asks the kernel to SIGKILL this process when the thread that started it ends
    (prctl PR_SET_PDEATHSIG). False where there is no such thing (macOS, Windows): there the
    socket or stdin watch ends the child, and on Windows the plugin's job object
    (tie_to_plugin)."""
    if not sys.platform.startswith("linux"):
        return False
    import signal
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) == 0
    except (OSError, AttributeError):
        return False


def own_group_kwargs() -> dict[str, Any]:
    """subprocess.Popen arguments that start a child in a process group of its own, so that
    kill_group() ends it with every process it started."""
    if _is_windows():
        return {"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW}
    return {"start_new_session": True}


def kill_group(proc: subprocess.Popen) -> None:
    """Kills a child started with own_group_kwargs() and what it started, then reaps it."""
    if _is_windows():
        if proc.poll() is None:  # the tree, while its root's id still names it
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)],
                           capture_output=True, check=False, **child_popen_kwargs())
    else:
        import signal
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group outlives a dead leader
    with contextlib.suppress(Exception):
        proc.kill()
    proc.wait()


# Job objects (winnt.h). The structures use fixed-width fields, so that their layout on a
# 64-bit Linux (where the tests build them) is the one 64-bit Windows reads: ctypes.wintypes
# makes DWORD an 8-byte c_ulong on Linux.
JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x00002000
JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS = 9  # JobObjectExtendedLimitInformation
PROCESS_TERMINATE = 0x0001
PROCESS_SET_QUOTA = 0x0100


class JobObjectBasicLimitInformation(ctypes.Structure):
    _fields_ = (("PerProcessUserTimeLimit", ctypes.c_int64),
                ("PerJobUserTimeLimit", ctypes.c_int64),
                ("LimitFlags", ctypes.c_uint32),
                ("MinimumWorkingSetSize", ctypes.c_size_t),
                ("MaximumWorkingSetSize", ctypes.c_size_t),
                ("ActiveProcessLimit", ctypes.c_uint32),
                ("Affinity", ctypes.c_size_t),
                ("PriorityClass", ctypes.c_uint32),
                ("SchedulingClass", ctypes.c_uint32))


class IoCounters(ctypes.Structure):
    _fields_ = tuple((name, ctypes.c_uint64) for name in (
        "ReadOperationCount", "WriteOperationCount", "OtherOperationCount",
        "ReadTransferCount", "WriteTransferCount", "OtherTransferCount"))


class JobObjectExtendedLimitInformation(ctypes.Structure):
    _fields_ = (("BasicLimitInformation", JobObjectBasicLimitInformation),
                ("IoInfo", IoCounters),
                ("ProcessMemoryLimit", ctypes.c_size_t),
                ("JobMemoryLimit", ctypes.c_size_t),
                ("PeakProcessMemoryUsed", ctypes.c_size_t),
                ("PeakJobMemoryUsed", ctypes.c_size_t))


def _kernel32() -> Any:  # pragma: no cover (Windows; tests replace it)
    from ctypes import wintypes
    k = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    k.CreateJobObjectW.argtypes = (ctypes.c_void_p, wintypes.LPCWSTR)
    k.CreateJobObjectW.restype = wintypes.HANDLE
    k.SetInformationJobObject.argtypes = (wintypes.HANDLE, ctypes.c_int, ctypes.c_void_p,
                                          wintypes.DWORD)
    k.SetInformationJobObject.restype = wintypes.BOOL
    k.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
    k.OpenProcess.restype = wintypes.HANDLE
    k.AssignProcessToJobObject.argtypes = (wintypes.HANDLE, wintypes.HANDLE)
    k.AssignProcessToJobObject.restype = wintypes.BOOL
    k.CloseHandle.argtypes = (wintypes.HANDLE,)
    k.CloseHandle.restype = wintypes.BOOL
    return k


def _last_error() -> int:
    get = getattr(ctypes, "get_last_error", None)
    return int(get()) if get else 0


class KillOnCloseJob:
    """A Windows job object that kills every process in it when its last handle closes: when
    the plugin exits, however it exits (TerminateProcess included), the system closes the
    handle and ends the workers and conversions assigned to it, and their children."""

    def __init__(self, kernel32: Any) -> None:
        self.k = kernel32
        self.handle = kernel32.CreateJobObjectW(None, None)
        if not self.handle:
            raise OSError(_last_error(), "CreateJobObjectW failed")
        info = JobObjectExtendedLimitInformation()
        info.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
        if not kernel32.SetInformationJobObject(
                self.handle, JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS, ctypes.byref(info),
                ctypes.sizeof(info)):
            err = _last_error()
            kernel32.CloseHandle(self.handle)
            raise OSError(err, "SetInformationJobObject failed")

    def add(self, pid: int) -> None:
        proc = self.k.OpenProcess(PROCESS_SET_QUOTA | PROCESS_TERMINATE, False, pid)
        if not proc:
            raise OSError(_last_error(), f"OpenProcess({pid}) failed")
        try:
            if not self.k.AssignProcessToJobObject(self.handle, proc):
                raise OSError(_last_error(), f"AssignProcessToJobObject({pid}) failed")
        finally:
            self.k.CloseHandle(proc)


_job: KillOnCloseJob | None = None


def tie_to_plugin(pid: int) -> bool:
    """Makes a child started by this process die with it, however this process ends; True
    when done here. Windows: the child joins this process's kill-on-close job object (made
    on first use; a job nested in one AOG or the launcher made is fine on Windows 8 and
    later). Elsewhere False: the child asks for it itself (set_parent_death_signal on Linux)
    and watches its channel to the plugin for EOF (every system)."""
    global _job
    if not _is_windows():
        return False
    if _job is None:
        _job = KillOnCloseJob(_kernel32())
    _job.add(pid)
    return True


# --- the engine workers' channel ---------------------------------------------------------------

TOKEN_ENV = "OVMS_PLUGIN_ENGINE_TOKEN"
TRANSPORT_ENV = "OVMS_PLUGIN_ENGINE_TRANSPORT"
TRANSPORTS = ("socketpair", "loopback")
_TOKEN_BYTES = 32
TOKEN_SECONDS = 10.0  # a connection must show the token this soon


def default_transport() -> str:
    """socketpair (an inherited descriptor) on POSIX; loopback TCP with a one-time token on
    Windows, where a descriptor cannot be passed by number (subprocess has no pass_fds
    there). OVMS_PLUGIN_ENGINE_TRANSPORT chooses (the tests run loopback on Linux)."""
    chosen = os.environ.get(TRANSPORT_ENV, "").strip().lower()
    if chosen:
        if chosen not in TRANSPORTS:
            raise ValueError(f"{TRANSPORT_ENV}={chosen!r}: use one of {', '.join(TRANSPORTS)}")
        if chosen == "socketpair" and _is_windows():
            raise ValueError(f"{TRANSPORT_ENV}=socketpair needs POSIX; use loopback")
        return chosen
    return "loopback" if _is_windows() else "socketpair"


@dataclass
class EngineChannel:
    """The plugin's end of a channel to one child: start the child with `child_args` added
    to its command line, `popen_kwargs` and `env`, call `started()`, then `connected()`
    gives the stream socket."""

    transport: str
    child_args: list[str]
    popen_kwargs: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    _sock: socket.socket | None = None  # socketpair: the plugin's end
    _child: socket.socket | None = None  # socketpair: the child's end, until it has it
    _listener: socket.socket | None = None  # loopback
    _token: bytes = b""

    def started(self) -> None:
        """The child runs (or failed to start): the plugin's copy of its end goes."""
        if self._child is not None:
            self._child.close()
            self._child = None

    async def connected(self, child_exit: Awaitable[Any], timeout: float = 120.0
                        ) -> socket.socket:
        """The connected socket (non-blocking). Raises ConnectionError when the child exits
        first or does not connect within `timeout` seconds."""
        if self._sock is not None:
            if asyncio.iscoroutine(child_exit):
                child_exit.close()  # nothing to wait for: the socket is connected already
            sock, self._sock = self._sock, None
            sock.setblocking(False)
            return sock
        assert self._listener is not None
        accept = asyncio.ensure_future(self._accept(timeout))
        exited = asyncio.ensure_future(child_exit)
        try:
            done, _ = await asyncio.wait({accept, exited}, return_when=asyncio.FIRST_COMPLETED)
            if accept in done:
                return accept.result()
            raise ConnectionError("the engine worker exited before it connected")
        finally:
            for task in (accept, exited):
                if not task.done():
                    task.cancel()
            self.close()

    async def _accept(self, timeout: float) -> socket.socket:
        """The first connection to the loopback listener that proves it has the token.
        Others (another local process found the port) are closed; each is checked on its
        own, so one that connects and stays silent delays nobody."""
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        winner: asyncio.Future[socket.socket] = loop.create_future()
        checks: set[asyncio.Future] = set()

        async def check(conn: socket.socket) -> None:
            ok = False
            try:
                got = await asyncio.wait_for(_recv_exactly(loop, conn, len(self._token)),
                                             TOKEN_SECONDS)
                ok = hmac.compare_digest(got, self._token) and not winner.done()
            except (TimeoutError, OSError):
                pass
            finally:
                if ok:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    winner.set_result(conn)
                else:
                    conn.close()

        async def accept() -> None:
            assert self._listener is not None
            while True:
                conn, _ = await loop.sock_accept(self._listener)
                conn.setblocking(False)
                task = asyncio.ensure_future(check(conn))
                checks.add(task)
                task.add_done_callback(checks.discard)

        acceptor = asyncio.ensure_future(accept())
        try:
            return await asyncio.wait_for(winner, timeout)
        except TimeoutError:
            raise ConnectionError(f"the engine worker did not connect within {timeout:.0f} s"
                                  ) from None
        finally:
            acceptor.cancel()
            for task in list(checks):
                task.cancel()

    def close(self) -> None:
        for s in (self._sock, self._child, self._listener):
            if s is not None:
                s.close()
        self._sock = self._child = self._listener = None


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            raise ConnectionError("closed before the token")
        data += chunk
    return data


def engine_channel(transport: str | None = None) -> EngineChannel:
    """A new channel for one child process (see EngineChannel)."""
    transport = transport or default_transport()
    if transport == "socketpair":
        parent, child = socket.socketpair()
        return EngineChannel("socketpair", ["--fd", str(child.fileno())],
                             {"pass_fds": (child.fileno(),)}, {}, _sock=parent, _child=child)
    if transport != "loopback":
        raise ValueError(f"unknown engine transport {transport!r}")
    listener = socket.create_server(("127.0.0.1", 0), backlog=8)
    listener.setblocking(False)
    token = secrets.token_hex(_TOKEN_BYTES)
    port = listener.getsockname()[1]
    # The token travels in the child's environment, which only its user (and
    # administrators) can read; never on its command line.
    return EngineChannel("loopback", ["--connect", f"127.0.0.1:{port}"], {},
                         {TOKEN_ENV: token}, _listener=listener, _token=token.encode())


def connect_engine_channel(fd: int | None = None, address: str | None = None) -> socket.socket:
    """The child's end of an EngineChannel, from its `--fd` or `--connect` argument (a
    blocking socket)."""
    if fd is not None:
        return socket.socket(fileno=fd)
    if not address:
        raise ValueError("neither --fd nor --connect given")
    host, _, port = address.rpartition(":")
    token = os.environ.pop(TOKEN_ENV, "")
    if not token:
        raise ValueError(f"--connect needs the token in {TOKEN_ENV}")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(token.encode())
    return sock


# --- signals ------------------------------------------------------------------------------------

def _signal_module() -> Any:
    import signal
    return signal


def stop_signal_names() -> tuple[str, ...]:
    """The signals that ask the server to stop: SIGTERM and SIGINT (Ctrl-C) on POSIX; on
    Windows Ctrl-C (SIGINT) and Ctrl-Break (SIGBREAK), as TerminateProcess cannot be
    caught (AOG stops plugins through GRPCController/Shutdown there too)."""
    return ("SIGINT", "SIGBREAK") if _is_windows() else ("SIGTERM", "SIGINT")


def on_stop_signals(loop: asyncio.AbstractEventLoop, callback: Callable[[], Any],
                    names: tuple[str, ...] | None = None) -> list[int]:
    """Calls `callback` on `loop` whenever one of the signals arrives (replacing what a
    previous call wired); returns the signals wired (none outside the main thread)."""
    sig = _signal_module()
    wired = []
    for name in names or stop_signal_names():
        num = getattr(sig, name, None)
        if num is None:
            continue
        try:
            if _is_windows():
                # The proactor loop has no add_signal_handler; a Python handler runs in the
                # main thread and hands over to the loop, which the signal wakes.
                sig.signal(num, lambda _s, _f: loop.call_soon_threadsafe(callback))
            else:
                loop.add_signal_handler(num, callback)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            continue
        wired.append(num)
    return wired


def clear_signals(loop: asyncio.AbstractEventLoop, wired: list[int]) -> None:
    """Undoes on_stop_signals / on_reload_signal: the defaults again."""
    sig = _signal_module()
    for num in wired:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            if _is_windows():
                sig.signal(num, sig.SIG_DFL)
            else:
                loop.remove_signal_handler(num)


def on_reload_signal(loop: asyncio.AbstractEventLoop, callback: Callable[[], Any]) -> bool:
    """SIGHUP calls `callback` on `loop` where there is such a signal (not on Windows, where
    settings changes are picked up from the file's time stamp); returns whether it did."""
    if _is_windows():
        return False
    return bool(on_stop_signals(loop, callback, ("SIGHUP",)))


def ignore_interrupts() -> None:
    """Ctrl-C (and Ctrl-Break on Windows) in the terminal AOG runs in reaches every process
    attached to it; AOG handles them for its plugins and their children."""
    sig = _signal_module()
    for name in ("SIGINT", "SIGBREAK"):
        num = getattr(sig, name, None)
        if num is not None:
            with contextlib.suppress(ValueError, OSError):
                sig.signal(num, sig.SIG_IGN)


# --- directories and names ----------------------------------------------------------------------

def aog_data_dir() -> Path:
    """AOG's data directory as AOG computes it: /var/lib/aog on Linux,
    ~/Library/Application Support/AOG on macOS, %APPDATA%\\AOG on Windows (its plugins are
    in <that>/plugins)."""
    if MACOS:
        return Path.home() / "Library" / "Application Support" / "AOG"
    if _is_windows():
        return Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming") / "AOG"
    return Path("/var/lib/aog")


def local_data_dir() -> Path | None:
    """Windows: %LOCALAPPDATA%\\AOG, where large data (models) goes: %APPDATA% roams with
    the user's profile, and gigabytes of weights must not. None elsewhere (AOG's data
    directory is local there)."""
    if not _is_windows():
        return None
    return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "AOG"


def cache_base_dir() -> Path:
    """The user's cache folder: %LOCALAPPDATA% on Windows, ~/Library/Caches on macOS,
    $XDG_CACHE_HOME or ~/.cache elsewhere."""
    if _is_windows():
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    if MACOS:
        return Path.home() / "Library" / "Caches"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


# Names Windows reserves for devices, whatever the extension ("CON", "nul.txt", "COM1"), and
# characters it refuses in names (":" would name an NTFS alternate data stream). Refused on
# every system: a model store, or a listing from a Hub, may meet Windows.
_RESERVED = re.compile(r"^(CON|PRN|AUX|NUL|CONIN\$|CONOUT\$|COM[0-9¹²³]|LPT[0-9¹²³])(\..*)?$",
                       re.IGNORECASE)
_WINDOWS_BAD_CHARS = set('<>:"|?*\\/') | {chr(c) for c in range(32)}


def windows_name_problem(part: str) -> str | None:
    """Why Windows would refuse or change `part` as one file or folder name, or None: a
    device name, a character it does not allow, or a trailing dot or space (which it
    strips, so two names would meet)."""
    if _RESERVED.match(part.rstrip(" ")):
        return f"{part!r} is a device name on Windows"
    if bad := sorted(set(part) & _WINDOWS_BAD_CHARS):
        return f"{part!r} has characters Windows does not allow in names ({''.join(bad)!r})"
    if part.endswith((".", " ")):
        return f"{part!r} ends with a dot or a space, which Windows strips"
    return None


def aog_platform() -> str:
    """AOG's <goos>_<goarch> name for this machine, e.g. linux_amd64, windows_amd64."""
    goos = "windows" if _is_windows() or sys.platform == "cygwin" else sys.platform
    machine = _platform.machine().lower()
    goarch = {"x86_64": "amd64", "amd64": "amd64", "x64": "amd64",
              "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)
    return f"{goos}_{goarch}"
