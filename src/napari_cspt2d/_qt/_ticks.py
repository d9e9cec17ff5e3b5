"""Spread GUI-thread work over event-loop ticks: one queued piece per tick, in order.

A refinement step's results arrive as one signal; assigning all of them at once (map layer, FSC plot, history,
shift vectors, review table, gallery) froze the window for 0.3–0.8 s. Queued here, each piece runs in its own tick,
so repaints and input are handled between them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from qtpy.QtCore import QObject, QTimer

__all__ = ["TickQueue"]


class TickQueue(QObject):
    """Run queued callables one per event-loop tick, first in first out."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._pending: deque[Callable[[], object]] = deque()
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(0)
        self._timer.timeout.connect(self._run_one)

    def add(self, piece: Callable[[], object]) -> None:
        """Queue ``piece`` after everything already queued."""
        self._pending.append(piece)
        if not self._timer.isActive():
            self._timer.start()

    def clear(self) -> None:
        """Drop everything still queued."""
        self._pending.clear()
        self._timer.stop()

    def __len__(self) -> int:
        return len(self._pending)

    def _run_one(self) -> None:
        if not self._pending:
            return
        piece = self._pending.popleft()
        if self._pending:
            self._timer.start()
        piece()
