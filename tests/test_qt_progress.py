"""The cockpit's progress bars (Run and Data tabs) paint with the window's next frame, never synchronously (README
"The cockpit's loop": a synchronous repaint flushed the whole OpenGL window while holding the GIL)."""

from __future__ import annotations

import pytest

pytest.importorskip("qtpy")
pytestmark = pytest.mark.gui

from qtpy.QtCore import QEvent, QObject  # noqa: E402
from qtpy.QtWidgets import QProgressBar, QVBoxLayout, QWidget  # noqa: E402

from napari_cspt2d._qt._progress import DeferredProgressBar  # noqa: E402


class _PaintCounter(QObject):
    def __init__(self) -> None:
        super().__init__()
        self.paints = 0

    def eventFilter(self, watched, event):  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Type.Paint:
            self.paints += 1
        return False


@pytest.mark.parametrize("bar_type", [QProgressBar, DeferredProgressBar])
def test_a_new_value_is_painted_later_not_inside_set_value(qtbot, bar_type):
    window = QWidget()
    qtbot.addWidget(window)
    bar = bar_type()
    QVBoxLayout(window).addWidget(bar)
    window.show()
    qtbot.waitExposed(window)
    qtbot.wait(100)  # the first frame painted: nothing pending
    counter = _PaintCounter()
    bar.installEventFilter(counter)
    bar.setRange(0, 10)
    bar.setValue(5)
    assert bar.value() == 5 and bar.maximum() == 10
    if bar_type is QProgressBar:
        assert counter.paints >= 1  # Qt's own bar paints inside setValue: what DeferredProgressBar avoids
        return
    assert counter.paints == 0
    qtbot.waitUntil(lambda: counter.paints >= 1, timeout=5000)  # painted with the next frame
    assert bar.text() == "50%"
