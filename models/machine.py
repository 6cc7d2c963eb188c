"""Where a figure was measured: recorded beside every timing that hegate writes down."""

from __future__ import annotations

import os
import platform


def machine_description() -> str:
    """CPU model, core count and platform, e.g. ``AMD EPYC 7B13, 2 cores, Linux x86_64``."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"
