"""Results inside the cockpit: the map in a viewer docked in the Run tab, the FSC curves of every map, the history.

Why a viewer of its own, docked (never floating): the tilt-series viewer's dimensions are ``(tilt, y, x)``; a 3D map
added to it would share the first slider and its 3D rendering would switch the tilt series to 3D too. The docked
viewer (a napari ``ViewerModel`` with its ``QtViewer``, as napari's ``multiple_viewer_widget`` example does) keeps its
own dims and camera, so switching between the tilt series and the map is only a look to the side. Its ``map`` layer is
made once and updated in place with arrays, contrast limits and iso level prepared off the GUI thread
(:func:`napari_cspt2d.runs.map_display`).

The FSC plot accumulates: every map of the session keeps its curve, named in the legend (``run 2 · it 3``); the
latest is drawn in colour with its 0.143 resolution marked, earlier ones fade. Only the new line is added per map.
"""

from __future__ import annotations

import contextlib

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import QAbstractItemView, QLabel, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

from ..runs import FSC_THRESHOLD, MapDisplay

__all__ = ["FscPlot", "MapPanel", "HistoryTable", "FSC_THRESHOLD"]

MAP_AXES = ("z", "y", "x")
#: Initial 3D view of a map (napari camera angles, degrees): tilted so that its depth shows.
MAP_VIEW_ANGLES = (20.0, 30.0, 140.0)
MAP_HEIGHT_PX = 280
#: Zoom over napari's fit-the-box view (a particle fills about half of its box).
MAP_ZOOM = 1.8
_BG, _FG = "#262930", "#d6d6d6"  # napari's dark theme
_LATEST = "#4fc3f7"


class FscPlot(QWidget):
    """FSC curves of every map of the session, with a legend; the latest in colour with its 0.143 resolution."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.curves: list[tuple[str, np.ndarray, np.ndarray, float]] = []
        self._lines: list = []
        self.figure = Figure(figsize=(3.6, 2.4), dpi=100, facecolor=_BG)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.axes = self.figure.add_subplot(1, 1, 1)
        self.label = QLabel("No map yet.")
        self.label.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas, 1)
        layout.addWidget(self.label)
        self.canvas.setMinimumHeight(200)
        self._setup_axes()

    def _setup_axes(self) -> None:
        ax = self.axes
        ax.set_facecolor(_BG)
        for spine in ax.spines.values():
            spine.set_color(_FG)
        ax.tick_params(colors=_FG, labelsize=7)
        ax.axhline(FSC_THRESHOLD, color="#888888", ls="--", lw=1)
        ax.axhline(0.0, color="#555555", lw=0.8)
        ax.set_ylim(-0.1, 1.05)
        ax.set_xlabel("spatial frequency (1/Å)", color=_FG, fontsize=8)
        ax.set_ylabel("FSC", color=_FG, fontsize=8)
        self._marker = ax.axvline(0.0, color="#ff8a65", lw=1.2, visible=False)
        self._note = ax.annotate("", (0.0, FSC_THRESHOLD), xytext=(6, 8), textcoords="offset points",
                                 color="#ff8a65", fontsize=8)
        self.figure.tight_layout()

    def add_curve(self, frequency_A_inv: np.ndarray, fsc: np.ndarray, resolution_A: float, label: str) -> None:
        """Add one map's curve (prepared in the worker) named ``label``; earlier curves fade."""
        self.curves.append((label, frequency_A_inv, fsc, resolution_A))
        for i, line in enumerate(self._lines):
            line.set_color("#8a8a8a")
            line.set_linewidth(1.0)
            line.set_alpha(0.3 + 0.5 * (i + 1) / (len(self._lines) + 1))
        (line,) = self.axes.plot(frequency_A_inv, fsc, lw=2.0, color=_LATEST, label=label)
        self._lines.append(line)
        self.highlight(len(self.curves) - 1)

    def highlight(self, index: int) -> None:
        """Mark curve ``index`` (its 0.143 resolution) and say it under the plot."""
        label, freq, _, res = self.curves[index]
        for i, line in enumerate(self._lines):
            line.set_zorder(3 if i == index else 2)
        self._marker.set_xdata([1.0 / res, 1.0 / res])
        self._marker.set_visible(True)
        self._note.xy = (1.0 / res, FSC_THRESHOLD)
        self._note.set_text(f"{res:.1f} Å")
        self.axes.set_xlim(0, max(float(c[1][-1]) for c in self.curves))
        self.axes.legend(loc="upper right", fontsize=7, facecolor=_BG, edgecolor="#555555", labelcolor=_FG)
        self.label.setText(f"{label}: {res:.2f} Å at FSC {FSC_THRESHOLD}; {len(self.curves)} map(s) this session")
        self.canvas.draw_idle()

    @property
    def resolution_A(self) -> float | None:
        """Resolution at FSC 0.143 of the latest curve (Å), None without curves."""
        return self.curves[-1][3] if self.curves else None


class MapPanel(QWidget):
    """A napari viewer docked in the cockpit showing the ``map`` layer (see the module docstring)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from napari.components import ViewerModel
        from napari.qt import QtViewer

        self.model = ViewerModel(title="napari-cspt2d map", ndisplay=3)
        self.qt_viewer = QtViewer(self.model)
        self.title = QLabel("No map yet: Reconstruct or Refine.")
        self.title.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.title)
        frame = QWidget()  # fixes the viewer's height (napari resets the QtViewer's own limits)
        frame.setFixedHeight(MAP_HEIGHT_PX)
        inner = QVBoxLayout(frame)
        inner.setContentsMargins(0, 0, 0, 0)
        inner.addWidget(self.qt_viewer)
        layout.addWidget(frame)
        self.layer = None
        self.shown: MapDisplay | None = None

    def show_map(self, display: MapDisplay, title: str) -> None:
        """Assign ``display`` (prepared off the GUI thread) to the map layer, made on the first map only."""
        scale = (display.voxel_A,) * 3
        if self.layer is None:
            self.layer = self.model.add_image(display.volume, name="map", scale=scale, axis_labels=MAP_AXES,
                                              colormap="bop orange", rendering="iso",
                                              contrast_limits=display.contrast_limits,
                                              iso_threshold=display.iso_level, metadata={"cspt2d": {"role": "map"}})
            self.model.reset_view()
            self.model.camera.angles = MAP_VIEW_ANGLES
            self.model.camera.zoom *= MAP_ZOOM
        else:
            layer = self.layer
            if tuple(layer.scale) != scale:
                layer.scale = scale
            layer.data = display.volume
            layer.contrast_limits_range = display.contrast_limits
            layer.contrast_limits = display.contrast_limits
            layer.iso_threshold = display.iso_level
            if layer.data.shape != self.shown.volume.shape or self.shown.voxel_A != display.voxel_A:
                self.model.reset_view()
        self.shown = display
        self.title.setText(title)

    def close_viewer(self) -> None:
        """Free the docked viewer (called when the napari window closes)."""
        qt_viewer, model, self.qt_viewer, self.model, self.layer = self.qt_viewer, self.model, None, None, None
        if qt_viewer is None:
            return
        with contextlib.suppress(RuntimeError, AttributeError):
            model.layers.clear()
            qt_viewer.close()
            qt_viewer.deleteLater()


class HistoryTable(QTableWidget):
    """Every finished map of the session: run, iteration, resolution at FSC 0.143. Signal ``entry_chosen(int)``
    with the history index of a row clicked."""

    entry_chosen = Signal(int)
    HEADERS = ("Run", "Iteration", "FSC 0.143 (Å)", "Kind")

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(0, len(self.HEADERS), parent)
        self.setHorizontalHeaderLabels(self.HEADERS)
        self.verticalHeader().hide()
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.horizontalHeader().setStretchLastSection(True)
        self.setMinimumHeight(110)
        self.cellClicked.connect(lambda row, _col: self.entry_chosen.emit(row))

    def add_row(self, run: int, iteration: int, resolution_A: float, kind: str) -> None:
        row = self.rowCount()
        self.insertRow(row)
        for col, text in enumerate((str(run), str(iteration), f"{resolution_A:.2f}", kind)):
            item = QTableWidgetItem(text)
            item.setTextAlignment(int(Qt.AlignmentFlag.AlignCenter))
            self.setItem(row, col, item)
        self.resizeColumnsToContents()
        self.scrollToBottom()

    def set_kind(self, row: int, kind: str) -> None:
        self.item(row, 3).setText(kind)

    def mark_current(self, row: int) -> None:
        self.blockSignals(True)
        self.selectRow(row)
        self.blockSignals(False)
