"""The cockpit: napari-cspt2d's one dock widget (``napari -w napari-cspt2d``), the workflow as tabs.

Data (open a stack and tracks, or the sample) → Curate (fix picks, undo) → Parameters (pyp's, with units; the
project) → Run (reconstruct, refine; the map, the history, the FSC curves) → Validate (refined shifts worst first,
accept/reject). Every tab is handed the viewer's :class:`~napari_cspt2d._qt._owner.CockpitState` (document,
parameters, project, history) and sits in a scroll area, so no tab makes the main window taller than the screen.
When the cockpit opens, the numba kernels start warming in the background (:mod:`napari_cspt2d.warmup`).
"""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFrame, QScrollArea, QTabWidget, QVBoxLayout, QWidget

from ._curation import CurationWidget
from ._lifecycle import WindowCloseWatcher
from ._loader import TiltSeriesLoader
from ._owner import CockpitState, state_of
from ._warmup import warm_once
from .params_widget import ParametersWidget
from .run_widget import RunWidget
from .validation import ShiftValidation

__all__ = ["Cockpit", "TABS", "COCKPIT_WIDTH_PX"]

TABS = ("Data", "Curate", "Parameters", "Run", "Validate")
#: Width the cockpit asks for; it fits beside a canvas of at least half the window at 1366 px.
COCKPIT_WIDTH_PX = 430


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
        self.setMinimumWidth(COCKPIT_WIDTH_PX)
        self.data.loaded.connect(self._on_loaded)
        self.run.review_shown.connect(self.validate.show_entry)
        self.run.run_finished.connect(self._on_run_finished)
        self.warmer = warm_once()
        self._close_watcher = WindowCloseWatcher(self, self.close_session)

    def show_tab(self, name: str) -> None:
        """Bring tab ``name`` (one of :data:`TABS`) to the front."""
        self.tabs.setCurrentIndex(TABS.index(name))

    def _on_loaded(self, layers) -> None:
        if any(layer.metadata.get("cspt2d", {}).get("role") == "tracks" for layer in layers):
            self.show_tab("Curate")

    def _on_run_finished(self, state: str) -> None:
        if state == "done" and self.run.results and self.run.results[-1].review is not None:
            self.show_tab("Validate")

    def close_session(self) -> None:
        """The window closes: every tab stops (a run, the preview, autosave flushed, the map viewer freed)."""
        for tab in (self.curate, self.run, self.validate):
            tab.close_session()
        self.warmer.stop()
