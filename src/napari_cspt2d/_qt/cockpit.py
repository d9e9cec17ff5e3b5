"""The cockpit: napari-cspt2d's one dock widget (``napari -w napari-cspt2d``), the workflow as tabs.

Data (open a stack and tracks, or the sample) → Curate (fix picks, undo) → Parameters (pyp's, with units; the
project) → Run (reconstruct, refine; the map, the history, the FSC curves) → Validate (refined shifts worst first,
accept/reject). Every tab is handed the viewer's :class:`~napari_cspt2d._qt._owner.CockpitState` (document,
parameters, project, history) and sits in a scroll area, so no tab makes the main window taller than the screen.
When the cockpit opens, the numba kernels start warming in the background (:mod:`napari_cspt2d.recon.warmup`).
While it is open, the interpreter is tuned so that background threads do not freeze the GUI thread (shorter switch
interval, long-lived objects frozen out of full garbage collections: :mod:`._interpreter`).
"""

from __future__ import annotations

from qtpy.QtCore import QEvent, QObject, QSize, Qt, QTimer
from qtpy.QtWidgets import QDockWidget, QFrame, QMainWindow, QScrollArea, QTabWidget, QVBoxLayout, QWidget

from . import _interpreter
from ._curation import CurationWidget
from ._lifecycle import WindowCloseWatcher
from ._loader import TiltSeriesLoader
from ._owner import CockpitState, state_of
from ._warmup import warm_once
from .params_widget import ParametersWidget
from .run_widget import RunWidget
from .validation import ShiftValidation

__all__ = ["MIN_WIDTH_PX", "PREFERRED_WIDTH_PX", "TABS", "Cockpit"]

TABS = ("Data", "Curate", "Parameters", "Run", "Validate")
#: The cockpit's narrowest width: beside napari's layer docks (320 px) it leaves half of a 1366 px window to the canvas.
MIN_WIDTH_PX = 320
#: The width it takes when the window has room (the canvas keeps at least half the window).
PREFERRED_WIDTH_PX = 480
_MARGIN_PX = 32  # dock separators and frames
FIT_DELAY_MS = 100  # the docks are laid out by then (else tried again)
#: napari's layer docks grow to this width once a Points layer's controls show.
LAYER_DOCKS_PX = 320


def _scrolled(widget: QWidget) -> QScrollArea:
    """``widget`` in a vertical scroll area: its height never forces the window's."""
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setWidget(widget)
    return area


class Cockpit(QWidget):
    """The main dock widget (see the module docstring). Tabs: ``data``, ``curate``, ``parameters``, ``run``,
    ``validate``; ``state`` is the viewer's :class:`CockpitState`."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self._window: QMainWindow | None = None
        self.viewer = napari_viewer
        self.state: CockpitState = state_of(napari_viewer)
        self.data = TiltSeriesLoader(napari_viewer)
        self.curate = CurationWidget(napari_viewer, self.state)
        self.parameters = ParametersWidget(napari_viewer, self.state)
        self.run = RunWidget(napari_viewer, self.state)
        self.validate = ShiftValidation(napari_viewer, self.state)
        self.tabs = QTabWidget()
        self.tabs.setUsesScrollButtons(False)
        self.tabs.setDocumentMode(True)
        for name, widget in zip(TABS, (self.data, self.curate, self.parameters, self.run, self.validate)):
            # the parameter form scrolls by itself (its project buttons and messages stay in view)
            self.tabs.addTab(widget if widget is self.parameters else _scrolled(widget), name)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.tabs)
        self.setMinimumWidth(MIN_WIDTH_PX)
        self._fit_attempts = 5
        self._fit_timer = QTimer(self)
        self._fit_timer.setSingleShot(True)
        self._fit_timer.timeout.connect(lambda: self.fit_width(self._fit_attempts))
        self.data.loaded.connect(self._on_loaded)
        self.run.review_shown.connect(self.validate.show_entry)
        self.run.run_finished.connect(self._on_run_finished)
        self.warmer = warm_once()
        self._holds_interpreter = True
        _interpreter.hold()
        self.warmer.ready.connect(_interpreter.freeze_new)  # the kernels' objects live as long as the process
        self._close_watcher = WindowCloseWatcher(self, self.close_session)

    def sizeHint(self) -> QSize:
        return QSize(PREFERRED_WIDTH_PX, super().sizeHint().height())

    # ------------------------------------------------------------------ fitting the window
    def _dock(self) -> QDockWidget | None:
        parent = self.parentWidget()
        while parent is not None and not isinstance(parent, QDockWidget):
            parent = parent.parentWidget()
        return parent

    def fit_width(self, attempts: int = 5) -> None:
        """Give the cockpit the width that leaves the canvas at least half of the window (between
        :data:`MIN_WIDTH_PX` and :data:`PREFERRED_WIDTH_PX`), when it is docked on the side."""
        dock, window = self._dock(), self._window
        if dock is None or window is None or dock.isFloating():
            return
        area = window.dockWidgetArea(dock)
        if area not in (Qt.DockWidgetArea.RightDockWidgetArea, Qt.DockWidgetArea.LeftDockWidgetArea):
            return
        other = (Qt.DockWidgetArea.LeftDockWidgetArea if area == Qt.DockWidgetArea.RightDockWidgetArea
                 else Qt.DockWidgetArea.RightDockWidgetArea)
        beside = max((max(d.width(), LAYER_DOCKS_PX) for d in window.findChildren(QDockWidget)
                      if d.isVisible() and not d.isFloating() and window.dockWidgetArea(d) == other), default=0)
        room = window.width() - window.width() // 2 - beside - _MARGIN_PX
        target = max(MIN_WIDTH_PX, min(PREFERRED_WIDTH_PX, room))
        if abs(dock.width() - target) > 2:
            window.resizeDocks([dock], [target], Qt.Orientation.Horizontal)
            if attempts > 1:  # a window still being laid out may ignore it: look again
                self._fit_later(attempts - 1)

    def _fit_later(self, attempts: int = 5) -> None:
        """:meth:`fit_width` after :data:`FIT_DELAY_MS` (the timer is the cockpit's child: it dies with it)."""
        self._fit_attempts = attempts
        self._fit_timer.start(FIT_DELAY_MS)

    def showEvent(self, event) -> None:
        super().showEvent(event)
        window = self.window()
        if isinstance(window, QMainWindow) and window is not self._window:
            self._window = window
            window.installEventFilter(self)
        self._fit_later()  # once the docks are laid out

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:
        window = getattr(self, "_window", None)  # None while the widget is being torn down
        if window is not None and obj is window and event.type() == QEvent.Type.Resize:
            self._fit_later()
        return False

    def show_tab(self, name: str) -> None:
        """Bring tab ``name`` (one of :data:`TABS`) to the front."""
        self.tabs.setCurrentIndex(TABS.index(name))

    def _on_loaded(self, layers) -> None:
        roles = {layer.metadata.get("cspt2d", {}).get("role"): layer for layer in layers}
        if "tracks" in roles:
            self.show_tab("Curate")
        if "tiltseries" in roles:  # the refined-shifts layer, empty and hidden, in a turn of its own
            pixel_A = float(roles["tiltseries"].metadata["cspt2d"]["pixel_A"])
            QTimer.singleShot(0, lambda: self.validate.prepare_layer(pixel_A))

    def _on_run_finished(self, state: str) -> None:
        if state == "done" and self.run.results and self.run.results[-1].review is not None:
            self.show_tab("Validate")

    def close_session(self) -> None:
        """The window closes: every tab stops (a run, the preview, autosave flushed, the map viewer freed)."""
        for tab in (self.curate, self.run, self.validate):
            tab.close_session()
        self._fit_timer.stop()
        if self._window is not None:
            self._window.removeEventFilter(self)
            self._window = None
        self.warmer.stop()
        if self._holds_interpreter:
            self._holds_interpreter = False
            _interpreter.release()
