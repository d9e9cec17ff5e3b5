"""Lower the scheduling priority of a background thread or child process (Linux: ``setpriority`` takes a thread's
id; a process's id names its main thread, whose threads started later inherit it). The GUI thread shares 2 cores
with them when the cockpit opens (the kernels' child importing numba and scipy): at a lower priority they take what
the GUI thread leaves. Elsewhere (or refused) nothing changes. Not for work the user soon waits for (the GL warm-up's
thread): under other processes' load a lowered thread gets ~10% of a core."""

from __future__ import annotations

import os
import threading

__all__ = ["lower_priority", "lower_thread_priority"]


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
