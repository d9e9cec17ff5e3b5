"""Live preview: a quick reconstruction (binned, no refinement) refreshed a few seconds after the tracks stop changing.

:class:`LivePreview` follows the curation document: every edit, undo or redo restarts a single-shot timer; when it
fires, the preview job runs in a worker thread on a snapshot of the tracks (a preview still running is cancelled
first, and none starts while a full run is busy: it waits for the run to end). The job and the display are given by
the owner (the Run widget), so the scheduling here knows nothing about reconstruction.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from napari.qt.threading import create_worker
from napari.utils.notifications import show_warning
from qtpy.QtCore import QObject, QTimer, Signal

from ..errors import CsptCancelled, CsptError
from ..model.editing import Change, TrackDocument

__all__ = ["LivePreview", "PREVIEW_DELAY_MS"]

PREVIEW_DELAY_MS = 2500


def _call_guarded(job: Callable[..., Any], *args: Any) -> tuple[Any, BaseException | None]:
    """``(job(*args), None)`` or ``(None, exception)``: the worker never raises into napari."""
    try:
        return job(*args), None
    except BaseException as exc:  # noqa: BLE001 - reported by the owner
        return None, exc


class LivePreview(QObject):
    """Debounced preview runs. ``get_session()`` gives a run snapshot (with ``.document``), ``job(session, cancel)``
    computes the preview in a worker, ``show(result)`` displays it (GUI thread), ``is_busy()`` says a full run is in
    progress. Signal ``refreshed(object)`` carries each result."""

    refreshed = Signal(object)

    def __init__(self, get_session: Callable[[], Any], job: Callable[[Any, Callable[[], bool]], Any],
                 show: Callable[[Any], None], *, is_busy: Callable[[], bool], delay_ms: int = PREVIEW_DELAY_MS,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._get_session, self._job, self._show, self._is_busy = get_session, job, show, is_busy
        self.delay_ms = int(delay_ms)
        self.enabled = False
        self.worker = None
        self._cancel: threading.Event | None = None
        self._document: TrackDocument | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(self.delay_ms)
        self._timer.timeout.connect(self.refresh)

    @property
    def pending(self) -> bool:
        """True while a refresh is scheduled."""
        return self._timer.isActive()

    @property
    def running(self) -> bool:
        return self.worker is not None

    def set_enabled(self, on: bool) -> None:
        """Start (a first preview soon) or stop following the tracks."""
        self.enabled = bool(on)
        if on:
            self._timer.start()
        else:
            self._timer.stop()
            self._follow(None)
            self.cancel()

    def _follow(self, document: TrackDocument | None) -> None:
        if document is self._document:
            return
        if self._unsubscribe is not None:
            self._unsubscribe()
        self._document, self._unsubscribe = document, None
        if document is not None:
            self._unsubscribe = document.subscribe(self._on_change)

    def _on_change(self, change: Change) -> None:
        if self.enabled and change.kind in ("edit", "undo", "redo"):
            self._timer.start()

    def refresh(self) -> None:
        """Start a preview now (or after the full run in progress ends)."""
        self._timer.stop()
        if not self.enabled:
            return
        if self._is_busy():
            self._timer.start()
            return
        try:
            s = self._get_session()
        except CsptError as exc:
            show_warning(f"Live preview: {exc}")
            return
        self._follow(s.document)
        self.cancel()
        cancel = threading.Event()
        worker = create_worker(_call_guarded, self._job, s, cancel.is_set, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda value, w=worker: self._on_returned(w, value))
        worker.finished.connect(lambda w=worker: self._on_finished(w))
        self.worker, self._cancel = worker, cancel
        worker.start()

    def _on_returned(self, worker, value: tuple[Any, BaseException | None]) -> None:
        result, exc = value
        if worker is not self.worker or not self.enabled:
            return  # superseded or switched off
        if exc is None:
            self._show(result)
            self.refreshed.emit(result)
        elif isinstance(exc, CsptCancelled):
            return
        elif isinstance(exc, CsptError):
            show_warning(f"Live preview: {exc}")
        else:
            show_warning(f"Live preview failed: {type(exc).__name__}: {exc}")

    def _on_finished(self, worker) -> None:
        if worker is self.worker:
            self.worker, self._cancel = None, None

    def cancel(self) -> None:
        """Stop a preview in progress (its result is dropped)."""
        if self._cancel is not None:
            self._cancel.set()
        self.worker, self._cancel = None, None

    def close(self) -> None:
        self.set_enabled(False)
