"""The window's Python interpreter, tuned while a cockpit is open so that background threads do not freeze the GUI
thread (:func:`hold` when a cockpit opens, :func:`release` when its window closes: undone when the last one closes).

The run (local backend), the FSC plots and the gallery work in threads of the napari process, and every thread needs
the interpreter lock (GIL) to run Python:

* **Switch interval.** The GUI thread releases the lock for every OpenGL call of a paint (hundreds, through PyOpenGL)
  and for every wait of the event loop; taking it back from a thread running Python waits for that thread's next
  forced switch, ``sys.getswitchinterval()`` (5 ms by default). With one busy thread, 200 calls of 50 µs took 1.24 s
  at 5 ms, 0.35 s at 1 ms, 0.23 s at 0.5 ms instead of 0.02 s alone (measured again in session 7: 248 ms at 1 ms,
  142 ms at 0.5 ms, 83 ms at 0.2 ms, with two busy threads' throughput unchanged within noise): a paint that takes
  20 ms when idle took 0.2 s during a Refine. :data:`SWITCH_INTERVAL_S` is used while the cockpit is open.
* **Full garbage collections.** A full collection walks every tracked object holding the lock; with napari, the Qt
  wrappers, numba and the cockpit loaded (~300,000 objects) that is 0.45–0.8 s, triggered by whichever thread
  allocates (often the run's worker), several times per Refine. What exists when the cockpit opens — and the kernels'
  ~50,000 objects once the warm-up has loaded them (:func:`freeze_new`) — lives as long as the window:
  it is frozen out of collections (:func:`gc.freeze`). Frozen objects are never collected, so they are unfrozen when
  the window closes (its viewer can then be freed).
* **Fewer full collections.** Python runs a full collection after every 10 collections of the middle generation,
  unless the objects waiting for one are under a quarter of the long-lived ones — and frozen objects do not count as
  long-lived, so with the window's objects frozen nearly every tenth one was full: two or three while a series opens,
  30–42 ms each in the middle of a layer being added. :data:`FULL_COLLECTION_AFTER` middle-generation collections
  are waited for instead (cyclic garbage that survived two collections is freed later, not never).
"""

from __future__ import annotations

import gc
import sys

__all__ = ["FULL_COLLECTION_AFTER", "SWITCH_INTERVAL_S", "freeze_new", "hold", "holders", "release"]

#: The interpreter's switch interval while a cockpit is open (s).
SWITCH_INTERVAL_S = 0.00025
#: How many collections of the middle generation come before a full one while a cockpit is open (Python's: 10).
FULL_COLLECTION_AFTER = 100

_holders = 0
_interval = sys.getswitchinterval()
_thresholds = gc.get_threshold()


def hold() -> None:
    """A cockpit opens: on the first, shorter switch interval, the existing objects frozen and full collections
    rarer."""
    global _holders, _interval, _thresholds
    if _holders == 0:
        _interval = sys.getswitchinterval()
        sys.setswitchinterval(min(_interval, SWITCH_INTERVAL_S))
        gc.freeze()
        _thresholds = gc.get_threshold()
        gc.set_threshold(*_thresholds[:2], max(_thresholds[2], FULL_COLLECTION_AFTER))
    _holders += 1


def release() -> None:
    """A cockpit's window closes: after the last, the switch interval and the collections restored and every object
    collectable."""
    global _holders
    if _holders == 0:
        return
    _holders -= 1
    if _holders == 0:
        sys.setswitchinterval(_interval)
        gc.set_threshold(*_thresholds)
        gc.unfreeze()


def freeze_new() -> None:
    """Freeze the objects made since (e.g. the loaded kernels) while a cockpit is open."""
    if _holders:
        gc.freeze()


def holders() -> int:
    """How many cockpits hold the tuning."""
    return _holders
