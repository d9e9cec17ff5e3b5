"""Dock widgets that must act when the napari window closes (flush an autosave, stop a run, unbind keys)."""

from __future__ import annotations

from collections.abc import Callable

from qtpy.QtCore import QEvent, QObject
from qtpy.QtWidgets import QWidget

__all__ = ["WindowCloseWatcher"]


class WindowCloseWatcher(QObject):
    """Calls ``callback()`` once when the top-level window that holds ``widget`` (the napari main window, once the
    widget is docked) receives its close event. A child of ``widget``: it goes away with it."""

    def __init__(self, widget: QWidget, callback: Callable[[], None]) -> None:
        super().__init__(widget)
        self._widget = widget
        self._callback = callback
        self._window: QWidget | None = None
        widget.installEventFilter(self)  # its first Show tells which window it was docked into

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt API
        kind = event.type()
        if kind == QEvent.Type.Show and obj is self._widget:
            window = self._widget.window()
            if window is not self._widget and window is not self._window:
                if self._window is not None:
                    self._window.removeEventFilter(self)
                window.installEventFilter(self)
                self._window = window
        elif kind == QEvent.Type.Close and self._window is not None and obj is self._window:
            self._window.removeEventFilter(self)
            self._window = None
            self._callback()
        return False
