"""Warm the numba kernels in the background when the cockpit opens (once per process; see
:mod:`napari_cspt2d.recon.warmup`): a child process of low priority compiles them into numba's on-disk cache, piece
by piece (the reconstruction's kernels, then the refinement's), and a worker thread loads each piece from it as soon
as the child says it is there — or, while GUI work is staged (:mod:`._stages`: a series' layers being shown), once
that work is done, unless a run waits for the piece; a run started before its piece is loaded waits
(:func:`wait_for_kernels`).

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
from qtpy.QtCore import QObject, QProcess, QTimer, Signal

from ..errors import CsptCancelled
from . import _interpreter, _stages
from ._priority import lower_priority

__all__ = ["KERNELS_STAGE", "KernelWarmer", "wait_for_kernels", "warm_once"]

#: The pieces the kernels are compiled and loaded in, each including the ones before it (as
#: :data:`napari_cspt2d.recon.warmup.PIECES`; that module is not imported here: it loads numba and scipy).
PIECES = ("reconstruct", "refine")

#: The progress stage a run reports while it waits for the kernels (the Run tab words it).
KERNELS_STAGE = "kernels"

#: The child's scheduling niceness from its start, during its imports; once they are done it goes lower by
#: itself (:data:`napari_cspt2d.recon.warmup.CHILD_NICENESS`).
CHILD_NICENESS = 10
#: The child's command line (arguments of ``sys.executable``).
CHILD_ARGS = ("-m", "napari_cspt2d.recon.warmup")

#: While GUI work is staged (:mod:`._stages`: a series' layers being shown), a piece's loading waits, looking again
#: every this many ms, unless a run waits for it: the loading thread holds the interpreter lock most of its ~0.7 s,
#: and each OpenGL call of a paint gives the lock up and waits to get it back.
LOAD_RETRY_MS = 100
#: ... and once that work (or a load the cockpit says the user waits for: :meth:`KernelWarmer.defer_while`) is done,
#: the window must have been free of it this long: a piece's loading (~0.4 s of numba's Python) that started as a
#: sample finished opening ran into the next Open Sample's layers, and their repaints' OpenGL calls waited for the
#: interpreter lock (a 384 ms stall in a first session of ``benchmarks/gui.py``).
LOAD_IDLE_S = 1.0


class KernelWarmer(QObject):
    """Signal ``ready()`` once every kernel is loaded in this process (``is_ready`` says so afterwards); a worker
    thread can :meth:`wait` for a piece (:data:`~napari_cspt2d.recon.warmup.PIECES`). Each piece is loaded once the
    child has printed its name (it is then in numba's cache), or once the child has ended. ``args``: the child's
    command line (tests give another)."""

    ready = Signal()

    def __init__(self, args: Sequence[str] = CHILD_ARGS) -> None:
        super().__init__()
        self.is_ready = False
        self.child_ok: bool | None = None  # whether the child compiled the kernels (None: still running)
        self._loaded = {name: threading.Event() for name in PIECES}
        self._asked: list[str] = []  # the pieces to load, in order
        self._worker = None
        self._wanted = threading.Event()  # a run waits for a piece: it is loaded even while GUI work is staged
        self._deferrals: list[Callable[[], bool]] = []  # other work the loading waits for (defer_while)
        self._last_busy = -LOAD_IDLE_S  # (time.monotonic()) when the window last had work the loading waits for
        self._retry = QTimer(self)
        self._retry.setSingleShot(True)
        self._retry.setInterval(LOAD_RETRY_MS)
        self._retry.timeout.connect(self._next)
        self.process = QProcess(self)
        self.process.readyReadStandardOutput.connect(self._read_child)
        self.process.finished.connect(self._child_finished)
        self.process.errorOccurred.connect(lambda *_: self._load(PIECES[-1]))
        self.process.start(sys.executable, list(args))
        # low priority from its start: its imports (numba, scipy: ~1 s of a core) compete with opening the cockpit
        lower_priority(int(self.process.processId()), CHILD_NICENESS)

    def _read_child(self) -> None:
        text = bytes(self.process.readAllStandardOutput()).decode(errors="replace")
        for name in text.split():
            if name in PIECES:
                self._load(name)

    def _child_finished(self, code: int = 0, status=None) -> None:
        self._read_child()
        self.child_ok = code == 0 and status != QProcess.ExitStatus.CrashExit
        self._load(PIECES[-1])  # (compiled here if the child failed)

    def _load(self, piece: str) -> None:
        if piece not in self._asked:
            self._asked.append(piece)
            self._next()

    def defer_while(self, busy: Callable[[], bool]) -> None:
        """Load no piece while ``busy()`` says so (e.g. the cockpit's Data tab loads a series: its worker makes the
        layers, or the sample's tilts stream in), nor :data:`LOAD_IDLE_S` after, unless a run waits for it."""
        self._deferrals.append(busy)

    def stop_deferring(self, busy: Callable[[], bool]) -> None:
        """Forget ``busy`` (:meth:`defer_while`)."""
        if busy in self._deferrals:
            self._deferrals.remove(busy)

    def _window_busy(self) -> bool:
        """Whether the window has work the loading waits for now, or had it less than :data:`LOAD_IDLE_S` ago."""
        now = time.monotonic()
        if _stages.pending() or any(busy() for busy in self._deferrals):
            self._last_busy = now
        return now - self._last_busy < LOAD_IDLE_S

    def _next(self) -> None:
        """Load the next asked piece in a worker thread, one at a time (not while the window has staged GUI work or
        other work it waits for, nor soon after, unless a run waits: :data:`LOAD_RETRY_MS`, :data:`LOAD_IDLE_S`)."""
        if self._worker is not None:
            return
        todo = [name for name in self._asked if not self._loaded[name].is_set()]
        if not todo:
            return
        if not self._wanted.is_set() and self._window_busy():
            self._retry.start()
            return
        self._worker = create_worker(_warm_kernels, todo[0], _start_thread=False, _ignore_errors=True)
        self._worker.finished.connect(lambda: self._done(todo[0]))
        self._worker.start()

    def _done(self, piece: str) -> None:
        self._worker = None
        _interpreter.freeze_new()  # the kernels' objects live as long as the process: out of full collections
        for name in PIECES[:PIECES.index(piece) + 1]:  # (a piece includes the ones before it)
            self._loaded[name].set()
        if piece == PIECES[-1]:
            self.is_ready = True
            self.ready.emit()
        self._next()

    def loaded(self, piece: str = PIECES[-1]) -> bool:
        """Whether ``piece`` (and the pieces before it) are loaded in this process."""
        return self._loaded[piece].is_set()

    def wait(self, piece: str = PIECES[-1], timeout_s: float | None = None) -> bool:
        """Block (in a worker thread, never the GUI thread: it loads them) until ``piece`` is loaded; False if
        ``timeout_s`` passed first."""
        self._wanted.set()
        return self._loaded[piece].wait(timeout_s)

    def stop(self) -> None:
        """Kill the child process if it still runs (the window closes)."""
        self._retry.stop()
        if self.process.state() != QProcess.ProcessState.NotRunning:
            self.process.kill()
            self.process.waitForFinished(2000)


def _warm_kernels(piece: str) -> None:
    """Load the kernels (in the worker thread: their modules' imports, numba's and scipy's, stay off the GUI's)."""
    from ..recon.warmup import warm_kernels

    warm_kernels(piece)


_WARMER: KernelWarmer | None = None


def warm_once() -> KernelWarmer:
    """The process's :class:`KernelWarmer` (started on the first call)."""
    global _WARMER
    if _WARMER is None:
        _WARMER = KernelWarmer()
    return _WARMER


def wait_for_kernels(progress: Callable[[str, int, int], None], cancel: Callable[[], bool], piece: str = PIECES[-1],
                     warmer: KernelWarmer | None = None, poll_s: float = 0.25, limit_s: float = 600.0) -> float:
    """In a run's worker thread: wait until the cockpit's warm-up has loaded the kernels of ``piece`` ("reconstruct"
    for a reconstruction, "refine" for every kernel), reporting ``progress(KERNELS_STAGE, 0, 1)`` at once and then
    every ``poll_s``; raise :class:`CsptCancelled` if ``cancel()`` says so. Returns the seconds waited (0 without a
    warm-up, e.g. no cockpit, or once it is done). After ``limit_s`` the run goes on and compiles what is missing
    itself."""
    warmer = _WARMER if warmer is None else warmer
    if warmer is None or warmer.loaded(piece):
        return 0.0
    t0 = time.perf_counter()
    progress(KERNELS_STAGE, 0, 1)
    while not warmer.wait(piece, poll_s):
        if cancel():
            raise CsptCancelled("run cancelled while the kernels were prepared")
        if time.perf_counter() - t0 > limit_s:
            break
        progress(KERNELS_STAGE, 0, 1)
    return time.perf_counter() - t0
