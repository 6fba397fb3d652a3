"""The one place that knows the operating system: what differs between POSIX and Windows.

Importing this module imports nothing POSIX-only (no fcntl, resource, termios, pwd, grp); each
function imports what its platform needs when it is called, so the package imports on Windows.
(Named osutil, not platform, so that running a file of this folder as a script cannot shadow
the standard library's `platform`.)
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Holds an exclusive lock on the file `path` (created if missing; left in place on POSIX)
    for the `with` block, waiting as long as it takes for it. Serializes processes and the
    threads of one process alike: each call takes a lock of its own, so a `with` on a path
    another thread holds waits for it. Not reentrant: nesting two on one path in one thread
    is a bug (filelock raises RuntimeError rather than deadlock). The operating system drops
    the lock when its holder dies. Through `filelock`: flock(2) on POSIX (what this package
    used before), msvcrt.locking on Windows."""
    from filelock import FileLock  # imports fcntl on POSIX: only here, when a lock is taken

    # A fresh object per call: a FileLock object shared by callers is reentrant in a thread.
    with FileLock(os.fspath(path), timeout=-1):
        yield


def rss_bytes() -> int | None:
    """The physical memory this process holds now, in bytes (Linux: /proc; Windows: its
    working set); None where it cannot be read."""
    if sys.platform == "win32":
        return _memory_windows(peak=False)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError, AttributeError):
        return None


def peak_rss_bytes() -> int | None:
    """The most physical memory this process has held so far, in bytes; None where it cannot
    be read."""
    if sys.platform == "win32":
        return _memory_windows(peak=True)
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes there, KiB here


def _memory_windows(peak: bool) -> int | None:  # pragma: no cover (Windows)
    try:
        import psutil
    except ImportError:
        pass
    else:
        with contextlib.suppress(Exception):
            info = psutil.Process().memory_info()
            return int(info.peak_wset if peak else info.rss)
    import ctypes
    from ctypes import wintypes

    class ProcessMemoryCounters(ctypes.Structure):
        _fields_ = (("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD),
                    ("PeakWorkingSetSize", ctypes.c_size_t),
                    ("WorkingSetSize", ctypes.c_size_t),
                    ("QuotaPeakPagedPoolUsage", ctypes.c_size_t),
                    ("QuotaPagedPoolUsage", ctypes.c_size_t),
                    ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t),
                    ("QuotaNonPagedPoolUsage", ctypes.c_size_t),
                    ("PagefileUsage", ctypes.c_size_t), ("PeakPagefileUsage", ctypes.c_size_t))

    try:
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.GetCurrentProcess.restype = wintypes.HANDLE
        get_info = kernel32.K32GetProcessMemoryInfo  # Windows 7 and later
        get_info.argtypes = (wintypes.HANDLE, ctypes.POINTER(ProcessMemoryCounters),
                             wintypes.DWORD)
        get_info.restype = wintypes.BOOL
        counters = ProcessMemoryCounters()
        counters.cb = ctypes.sizeof(counters)
        if not get_info(kernel32.GetCurrentProcess(), ctypes.byref(counters), counters.cb):
            return None
        return int(counters.PeakWorkingSetSize if peak else counters.WorkingSetSize)
    except (OSError, AttributeError):
        return None


def set_parent_death_signal() -> bool:
    """Linux: asks the kernel to SIGKILL this process when the thread that started it ends
    (prctl PR_SET_PDEATHSIG). False where there is no such thing (then the caller needs its
    other watch: a socket or stdin reaching EOF)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import signal
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) == 0
    except (OSError, AttributeError):
        return False


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (a zombie counts as gone where that is known)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":  # pragma: no cover (Windows)
        import ctypes
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        alive = bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and \
            code.value == 259  # STILL_ACTIVE
        kernel32.CloseHandle(handle)
        return alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True  # no /proc (macOS): kill(0) said it exists


def own_group_kwargs() -> dict:
    """subprocess.Popen arguments that start a child in a process group of its own, so that
    kill_group() ends it with every process it started."""
    if sys.platform == "win32":  # pragma: no cover (Windows)
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def kill_group(proc: subprocess.Popen) -> None:
    """Kills a child started with own_group_kwargs() and what it started, then reaps it."""
    if proc.poll() is None or sys.platform != "win32":
        if sys.platform == "win32":  # pragma: no cover (Windows)
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)],
                           capture_output=True, check=False)
        else:
            import signal
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.kill()
    proc.wait()
