"""A progress bar that never paints the window synchronously.

Qt's ``QProgressBar.setValue`` (and ``setRange``) call ``QWidget::repaint()``: the whole top-level window is painted
and flushed before the call returns. The napari window holds OpenGL canvases, so that flush composes the window
through OpenGL (``QRhi::endFrame``), and PyQt keeps the interpreter lock (GIL) for the whole C++ call. Under software
OpenGL with a run busy on the other core, one such flush made a 0.5 s stall of the cockpit's Refine (py-spy
``--native --gil``: the GUI thread holding the GIL in ``swrast_dri.so``, inside ``QProgressBar::setValue``; README
"The cockpit's loop"). :class:`DeferredProgressBar` turns these into ``update()``: the new value is painted with the
window's next frame, once however many values came before it.
"""

from __future__ import annotations

from qtpy.QtWidgets import QProgressBar

__all__ = ["DeferredProgressBar"]


class DeferredProgressBar(QProgressBar):
    """A ``QProgressBar`` whose ``setValue`` and ``setRange`` schedule a paint instead of painting at once."""

    def setValue(self, value: int) -> None:  # noqa: N802 (Qt's name)
        self.setUpdatesEnabled(False)  # repaint() does nothing while updates are off ...
        try:
            super().setValue(value)
        finally:
            self.setUpdatesEnabled(True)  # ... and turning them on schedules update()

    def setRange(self, minimum: int, maximum: int) -> None:  # noqa: N802 (Qt's name)
        self.setUpdatesEnabled(False)
        try:
            super().setRange(minimum, maximum)
        finally:
            self.setUpdatesEnabled(True)
