"""A one-line description of the machine, for benchmark results."""

from __future__ import annotations

import os
import platform

from ovms_plugin import osutil


def machine_description() -> str:
    mem = osutil.physical_memory_bytes() / 2**30
    return (f"{osutil.cpu_name()}, {os.cpu_count()} cores, {mem:.0f} GiB, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")
