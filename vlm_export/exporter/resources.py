"""Memory and disk the export needs, against what the machine has: decided before the work, logged during it."""

from __future__ import annotations

import logging
import os
import resource
import shutil
from pathlib import Path

from vlm_export.errors import ExportError

logger = logging.getLogger(__name__)

GB = 1e9


def available_memory() -> int:
    """Bytes of memory the kernel could give this process now (MemAvailable), or total RAM where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_rss() -> int:
    """Bytes: the largest resident set of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def log_memory(stage: str) -> None:
    """`--verbose`: resident memory after each stage."""
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("memory after %s: %.2f GB resident, %.2f GB peak", stage, current_rss() / GB, peak_rss() / GB)


def check_disk_space(folder: Path, needed: int, what: str) -> None:
    """Refuse to start when `folder`'s file system has less than `needed` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ExportError(
            f"{what} needs about {needed / GB:.1f} GB of disk in {folder}, which has {free / GB:.1f} GB free; free "
            "some space or choose an --output on another disk"
        )
