"""Debounced autosave of a :class:`TrackDocument` to a sidecar snapshot, and the recovery offer on reopen.

The snapshot (see :func:`napari_cspt2d.model.editing.autosave_path`) is written ``delay_ms`` after the last edit,
undo or redo (an ``.npz`` of 100k projections takes ~20 ms), removed when the tracks are saved or when undo
returns to the saved state, and written at once by :meth:`Autosaver.flush` (the curation widget calls it when the
napari window closes).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from qtpy.QtCore import QObject, QTimer, Signal

from ..model.editing import Change, TrackDocument, autosave_path, write_snapshot
from ._guard import report_errors

__all__ = ["Autosaver", "AUTOSAVE_DELAY_MS"]

AUTOSAVE_DELAY_MS = 1000


class Autosaver(QObject):
    """Writes ``document`` to the sidecar of ``key`` after each change (debounced). Signal ``saved(Path)``."""

    saved = Signal(object)

    def __init__(self, document: TrackDocument, key: str | os.PathLike[str], *,
                 delay_ms: int = AUTOSAVE_DELAY_MS, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.document = document
        self.key = os.fspath(key)
        self.path: Path = autosave_path(self.key)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(int(delay_ms))
        self._timer.timeout.connect(self.save_now)
        self._unsubscribe = document.subscribe(self._on_change)

    @property
    def pending(self) -> bool:
        return self._timer.isActive()

    def _on_change(self, change: Change) -> None:
        if change.kind == "saved" or (change.kind in ("undo", "redo") and not self.document.dirty):
            self._timer.stop()
            self.discard()
        elif change.kind in ("edit", "undo", "redo"):
            self._timer.start()

    @report_errors("Autosave")
    def save_now(self) -> None:
        """Write the snapshot now."""
        self._timer.stop()
        write_snapshot(self.path, self.document.tracks, source=self.key)
        self.saved.emit(self.path)

    def flush(self) -> None:
        """Write a pending snapshot now."""
        if self._timer.isActive():
            self.save_now()

    def discard(self) -> None:
        """Remove the snapshot (the tracks are saved, or the user declined recovery)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def set_key(self, key: str | os.PathLike[str]) -> None:
        """Follow a new source (the tracks were saved under another name): later snapshots go to its sidecar."""
        self.key = os.fspath(key)
        self.path = autosave_path(self.key)

    def close(self) -> None:
        """Flush and stop following the document."""
        self.flush()
        self._unsubscribe()
