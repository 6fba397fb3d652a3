"""Child processes that must die with their parent (engine workers, conversion jobs).
AOG kills only the plugin; anything it leaves running would hold memory, or worse, the
plugin's pipes."""

from __future__ import annotations

import os
import threading

from ovms_plugin.osutil import set_parent_death_signal


def die_with_parent(parent_pid: int) -> None:
    """Linux parent-death signal, plus an exit if the parent is already gone. Elsewhere the
    caller's other watch (socket or stdin EOF) still ends us."""
    set_parent_death_signal()
    if os.getppid() != parent_pid:
        os._exit(1)


def exit_on_stdin_eof() -> None:
    """Exits when stdin (a pipe from the parent) closes: the parent died or gave up. For
    children started from threads, where the parent-death signal would fire when that
    thread ends rather than the process."""

    def watch() -> None:
        try:  # the raw fd: a buffered reader's lock would block interpreter shutdown
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()
