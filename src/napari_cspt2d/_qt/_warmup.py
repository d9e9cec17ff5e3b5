"""Warm the numba kernels in the background when the cockpit opens (once per process; see
:mod:`napari_cspt2d.recon.warmup`): a child process of low priority compiles them into numba's on-disk cache, then
a worker thread loads them from it; a run started before that waits (:func:`wait_for_kernels`).

Compiling is Python work (numba's typing and lowering) that holds the interpreter lock for 10-25 s on 2 cores: in the
window's process it froze the GUI thread for 0.3 s at a time. In the child it costs the window nothing but a core;
loading the compiled kernels from the cache afterwards takes ~0.7 s in the worker thread with the GUI thread's waits
for the lock under 40 ms. A Reconstruct (or the live preview) pressed before the kernels are loaded therefore waits
for them in its worker thread, showing "preparing the kernels" as its progress, instead of compiling them itself.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence

from napari.qt.threading import create_worker
from qtpy.QtCore import QObject, QProcess, Signal

from ..errors import CsptCancelled

__all__ = ["KERNELS_STAGE", "KernelWarmer", "wait_for_kernels", "warm_once"]

#: The progress stage a run reports while it waits for the kernels (the Run tab words it).
KERNELS_STAGE = "kernels"

#: The child's command line (arguments of ``sys.executable``).
CHILD_ARGS = ("-m", "napari_cspt2d.recon.warmup")


class KernelWarmer(QObject):
    """Signal ``ready()`` once the kernels are loaded in this process (``is_ready`` says so afterwards; a worker
    thread can :meth:`wait` for it). ``args``: the child's command line (tests give another)."""

    ready = Signal()

    def __init__(self, args: Sequence[str] = CHILD_ARGS) -> None:
        super().__init__()
        self.is_ready = False
        self.child_ok: bool | None = None  # whether the child compiled the kernels (None: still running)
        self._loaded = threading.Event()
        self._worker = None
        self.process = QProcess(self)
        self.process.finished.connect(self._child_finished)
        self.process.errorOccurred.connect(lambda *_: self._load_here())
        self.process.start(sys.executable, list(args))

    def _child_finished(self, code: int = 0, status=None) -> None:
        self.child_ok = code == 0 and status != QProcess.ExitStatus.CrashExit
        self._load_here()

    def _load_here(self, *_) -> None:
        if self._worker is not None:
            return
        self._worker = create_worker(_warm_kernels, _start_thread=False, _ignore_errors=True)
        self._worker.finished.connect(self._done)
        self._worker.start()

    def _done(self) -> None:
        self.is_ready = True
        self.ready.emit()  # (the cockpit freezes the kernels' objects out of full collections first)
        self._loaded.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block (in a worker thread, never the GUI thread: it loads them) until the kernels are loaded; False if
        ``timeout_s`` passed first."""
        return self._loaded.wait(timeout_s)

    def stop(self) -> None:
        """Kill the child process if it still runs (the window closes)."""
        if self.process.state() != QProcess.ProcessState.NotRunning:
            self.process.kill()
            self.process.waitForFinished(2000)


def _warm_kernels() -> None:
    """Load the kernels (in the worker thread: their modules' imports, numba's and scipy's, stay off the GUI's)."""
    from ..recon.warmup import warm_kernels

    warm_kernels()


_WARMER: KernelWarmer | None = None


def warm_once() -> KernelWarmer:
    """The process's :class:`KernelWarmer` (started on the first call)."""
    global _WARMER
    if _WARMER is None:
        _WARMER = KernelWarmer()
    return _WARMER


def wait_for_kernels(progress: Callable[[str, int, int], None], cancel: Callable[[], bool],
                     warmer: KernelWarmer | None = None, poll_s: float = 0.25, limit_s: float = 600.0) -> float:
    """In a run's worker thread: wait until the cockpit's warm-up has loaded the kernels, reporting
    ``progress(KERNELS_STAGE, 0, 1)`` at once and then every ``poll_s``; raise :class:`CsptCancelled` if ``cancel()``
    says so. Returns the seconds waited (0 without a warm-up, e.g. no cockpit, or once it is done). After
    ``limit_s`` the run goes on and compiles what is missing itself."""
    warmer = _WARMER if warmer is None else warmer
    if warmer is None or warmer._loaded.is_set():
        return 0.0
    t0 = time.perf_counter()
    progress(KERNELS_STAGE, 0, 1)
    while not warmer.wait(poll_s):
        if cancel():
            raise CsptCancelled("run cancelled while the kernels were prepared")
        if time.perf_counter() - t0 > limit_s:
            break
        progress(KERNELS_STAGE, 0, 1)
    return time.perf_counter() - t0
