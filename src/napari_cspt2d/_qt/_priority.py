"""Lower the scheduling priority of a background thread or child process (Linux: ``setpriority`` takes a thread's
id; a process's id names its main thread, whose threads started later inherit it). The GUI thread shares 2 cores
with them when the cockpit opens (the kernels' child importing numba and scipy): at a lower priority they take what
the GUI thread leaves. Elsewhere (or refused) nothing changes. Not for work the user soon waits for (the GL warm-up's
thread): under other processes' load a lowered thread gets ~10% of a core."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

__all__ = ["lower_priority", "lower_thread_priority", "thread_priority_lowered"]


def lower_priority(native_id: int, niceness: int) -> bool:
    """Raise the niceness of the thread or process ``native_id`` to at least ``niceness``; True if it is set."""
    if niceness <= 0 or native_id <= 0 or not hasattr(os, "setpriority"):
        return False
    try:
        current = os.getpriority(os.PRIO_PROCESS, native_id)
        if current < niceness:
            os.setpriority(os.PRIO_PROCESS, native_id, niceness)
    except OSError:
        return False
    return True


def lower_thread_priority(niceness: int) -> bool:
    """:func:`lower_priority` of the calling thread (and the threads it starts afterwards)."""
    return lower_priority(threading.get_native_id(), niceness)


@contextlib.contextmanager
def thread_priority_lowered(niceness: int) -> Iterator[bool]:
    """The calling thread (and the threads it starts meanwhile) at :func:`lower_thread_priority` inside the block,
    at its former niceness again afterwards where the system allows it (a pooled thread serves other work later;
    an unprivileged process may not raise a priority back on Linux: the thread then stays lower). Yields whether
    it was lowered."""
    native_id = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, native_id) if hasattr(os, "getpriority") else None
    lowered = lower_thread_priority(niceness)
    try:
        yield lowered
    finally:
        if lowered and before is not None:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, native_id, before)
