"""GUI work in stages: each queued step runs in a turn of the event loop of its own, after the steps queued before
it, once the window is idle again (the repaint the previous step asked for is done).

Adding a layer to napari costs 40–150 ms of GUI-thread work in software OpenGL (its controls, its visual, the layer
list) and its first repaint as much again. Several layers added in one turn, or in zero-delay calls that Qt runs
back to back with the repaints they ask for, freeze the window for the sum. Queued here, one layer per step, the
window answers between them. A step is run from a short single-shot timer: Qt runs timers only once the posted
events (repaints, queued calls) are done, so a step never shares a turn with the previous one or its repaint.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from qtpy.QtCore import QTimer

__all__ = ["STAGE_DELAY_MS", "in_own_turn", "pending"]

#: The pause before each step (a timer: the repaint of the step before, itself run from a 5 ms timer, and any timer
#: that came due meanwhile run first).
STAGE_DELAY_MS = 20

_LOG = logging.getLogger(__name__)
_QUEUE: deque[Callable[[], object]] = deque()
_SCHEDULED = [False]


def in_own_turn(step: Callable[[], object], *, first: bool = False) -> None:
    """Run ``step()`` in a turn of the event loop of its own, after every step queued before it, or before them
    with ``first`` (the next stage of work the user waits for, e.g. the layers of a load being shown). GUI thread
    only. An exception in a step is logged; the steps after it still run."""
    if first:
        _QUEUE.appendleft(step)
    else:
        _QUEUE.append(step)
    if not _SCHEDULED[0]:
        _schedule()


def pending() -> int:
    """How many steps wait."""
    return len(_QUEUE)


def _schedule() -> None:
    _SCHEDULED[0] = True
    QTimer.singleShot(STAGE_DELAY_MS, _run_next)


def _run_next() -> None:
    _SCHEDULED[0] = False
    if not _QUEUE:
        return
    step = _QUEUE.popleft()
    try:
        step()
    except Exception:  # noqa: BLE001 - one step's failure must not stop the others (callers report their own)
        _LOG.exception("a staged GUI step failed")
    finally:
        if _QUEUE and not _SCHEDULED[0]:
            _schedule()
