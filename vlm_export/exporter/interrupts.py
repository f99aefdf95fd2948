"""Ctrl-C, SIGTERM and SIGHUP end an export the same way: the staging folder is removed and the exit code says so.

`timeout`, `docker stop` and a dropped SSH session send SIGTERM / SIGHUP, whose default action kills the process
before any cleanup runs. While an export runs, all three raise `Interrupted` (a KeyboardInterrupt, so every
`except KeyboardInterrupt` / `finally` cleans up as for Ctrl-C). A library that swallows the exception (about one
SIGINT in 25 during tracing went unnoticed) cannot hide the signal: it is also recorded, and `raise_if_interrupted`
at each stage boundary raises it again.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

HANDLED = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s)

_received: list[int] = []


class Interrupted(KeyboardInterrupt):
    """A signal asked the export to stop."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _handle(signum: int, frame: FrameType | None) -> None:
    first = not _received
    _received.append(signum)
    if first:  # a second signal must not cut short the cleanup the first one started
        raise Interrupted(signum)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, SIGINT / SIGTERM / SIGHUP raise `Interrupted` (main thread only; a no-op elsewhere)."""
    _received.clear()
    try:
        previous = {signum: signal.signal(signum, _handle) for signum in HANDLED}
    except ValueError:  # not the main thread: leave the process's handlers alone
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received.clear()  # a later export in this process starts with no signal pending


def raise_if_interrupted() -> None:
    """Raise `Interrupted` if a signal arrived and was swallowed by the code it interrupted."""
    if _received:
        raise Interrupted(_received[0])
