"""Warm the numba kernels in the background when the cockpit opens (once per process; see
:mod:`napari_cspt2d.recon.warmup`): a child process compiles them into numba's cache, then a worker thread loads
them."""

from __future__ import annotations

import sys

from napari.qt.threading import create_worker
from qtpy.QtCore import QObject, QProcess, Signal

__all__ = ["KernelWarmer", "warm_once"]


class KernelWarmer(QObject):
    """Signal ``ready()`` once the kernels are loaded in this process (``is_ready`` says so afterwards)."""

    ready = Signal()

    def __init__(self) -> None:
        super().__init__()
        self.is_ready = False
        self._worker = None
        self.process = QProcess(self)
        self.process.finished.connect(self._load_here)
        self.process.errorOccurred.connect(lambda *_: self._load_here())
        self.process.start(sys.executable, ["-m", "napari_cspt2d.recon.warmup"])

    def _load_here(self, *_) -> None:
        if self._worker is not None:
            return
        self._worker = create_worker(_warm_kernels, _start_thread=False, _ignore_errors=True)
        self._worker.finished.connect(self._done)
        self._worker.start()

    def _done(self) -> None:
        self.is_ready = True
        self.ready.emit()

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
