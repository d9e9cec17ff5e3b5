"""Results inside the cockpit: the map in a viewer docked in the Run tab, the FSC curves of every map, the history.

Why a viewer of its own, docked (never floating): the tilt-series viewer's dimensions are ``(tilt, y, x)``; a 3D map
added to it would share the first slider and its 3D rendering would switch the tilt series to 3D too. The docked
viewer (a napari ``ViewerModel`` with its ``QtViewer``, as napari's ``multiple_viewer_widget`` example does) keeps its
own dims and camera, so switching between the tilt series and the map is only a look to the side. Its ``map`` layer is
made once and updated in place with arrays, contrast limits and iso level prepared off the GUI thread
(:func:`napari_cspt2d.runs.map_display`), assigned with one refresh and one thumbnail
(:func:`._layer_update.one_refresh`).

The FSC plot accumulates: every map of the session keeps its curve, named in the legend (``run 2 · it 3``); the
latest is drawn in colour with its 0.143 resolution marked, earlier ones fade. It is drawn in a process of its own
(:func:`napari_cspt2d.fsc_plot.render_fsc_plot_apart`, waited for by a worker thread) and shown as an image.
"""

from __future__ import annotations

import contextlib

import numpy as np
from napari.qt.threading import create_worker
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import QAbstractItemView, QLabel, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

from ..fsc_plot import FSC_THRESHOLD, FscEntry, render_fsc_plot_apart
from ..runs import MapDisplay
from ._layer_update import one_refresh

__all__ = ["FSC_THRESHOLD", "FscPlot", "HistoryTable", "MapPanel"]

MAP_AXES = ("z", "y", "x")
#: Initial 3D view of a map (napari camera angles, degrees): tilted so that its depth shows.
MAP_VIEW_ANGLES = (20.0, 30.0, 140.0)
MAP_HEIGHT_PX = 280
#: Zoom over napari's fit-the-box view (a particle fills about half of its box).
MAP_ZOOM = 1.8


class FscPlot(QWidget):
    """FSC curves of every map of the session, with a legend; the highlighted one in colour with its 0.143
    resolution. The plot is drawn in another process (:func:`napari_cspt2d.fsc_plot.render_fsc_plot_apart`); the GUI
    thread only shows the finished pixels (a newer request supersedes one still drawing)."""

    SIZE_PX = (360, 240)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.entries: list[FscEntry] = []
        self.highlighted: int | None = None
        self.legend_labels: list[str] = []  # the labels of the image shown
        self._request = 0
        self._drawn: tuple[int, int] | None = None  # (highlighted, number of curves) of the latest drawing
        self._buffer = None
        self.image = QLabel()
        self.image.setFixedSize(*self.SIZE_PX)
        self.label = QLabel("No map yet.")
        self.label.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.image)
        layout.addWidget(self.label)

    @property
    def curves(self) -> list[FscEntry]:
        return self.entries

    def add_curve(self, frequency_A_inv: np.ndarray, fsc: np.ndarray, resolution_A: float, label: str) -> None:
        """Add one map's curve (prepared in the worker) named ``label`` and show it highlighted."""
        self.entries.append(FscEntry(label, frequency_A_inv, fsc, resolution_A))
        self.highlight(len(self.entries) - 1)

    def highlight(self, index: int) -> None:
        """Mark curve ``index`` (its 0.143 resolution), say it under the plot, redraw in a worker."""
        entry = self.entries[index]
        self.label.setText(f"{entry.label}: {entry.resolution_A:.2f} Å at FSC {FSC_THRESHOLD}; "
                           f"{len(self.entries)} map(s) this session")
        if (index, len(self.entries)) == self._drawn:
            return  # drawn (or being drawn) already
        self.highlighted, self._drawn = index, (index, len(self.entries))
        self._request += 1
        request, entries = self._request, list(self.entries)
        worker = create_worker(render_fsc_plot_apart, entries, index, self.SIZE_PX, _start_thread=False,
                               _ignore_errors=True)
        worker.returned.connect(lambda rgba: self._show(request, rgba, [e.label for e in entries]))
        worker.start()

    def _show(self, request: int, rgba: np.ndarray, labels: list[str]) -> None:
        if request != self._request:
            return  # superseded, or the plot was closed
        self._buffer = np.ascontiguousarray(rgba)
        h, w = self._buffer.shape[:2]
        self.image.setPixmap(QPixmap.fromImage(QImage(self._buffer.data, w, h, 4 * w, QImage.Format.Format_RGBA8888)))
        self.legend_labels = labels

    @property
    def resolution_A(self) -> float | None:
        """Resolution at FSC 0.143 of the latest curve (Å), None without curves."""
        return self.entries[-1].resolution_A if self.entries else None

    def stop(self) -> None:
        """Drop the drawings still under way (the window closes)."""
        self._request = -1


class MapPanel(QWidget):
    """A napari viewer docked in the cockpit showing the ``map`` layer (see the module docstring). The viewer's model
    and its ``QtViewer`` (a canvas with its OpenGL context, ~0.1–0.2 s) are made in later event-loop turns, one
    each, so that building the Run tab does not freeze the window; ``model``/``qt_viewer`` make them at once when
    needed earlier."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._model = None
        self._qt_viewer = None
        self._closed = False
        self.title = QLabel("No map yet: Reconstruct or Refine.")
        self.title.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.title)
        frame = QWidget()  # fixes the viewer's height (napari resets the QtViewer's own limits)
        frame.setFixedHeight(MAP_HEIGHT_PX)
        self._frame_layout = QVBoxLayout(frame)
        self._frame_layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(frame)
        self.layer = None
        self.shown: MapDisplay | None = None
        QTimer.singleShot(0, self._make_model_later)

    def _make_model_later(self) -> None:
        if not self._closed:
            _ = self.model
            QTimer.singleShot(0, self._make_viewer_later)

    def _make_viewer_later(self) -> None:
        if not self._closed:
            _ = self.qt_viewer

    @property
    def model(self):
        """The docked viewer's ``ViewerModel`` (made on first use)."""
        if self._model is None and not self._closed:
            from napari.components import ViewerModel

            self._model = ViewerModel(title="napari-cspt2d map", ndisplay=3)
        return self._model

    @property
    def qt_viewer(self):
        """The docked viewer's ``QtViewer`` (made on first use)."""
        if self._qt_viewer is None and not self._closed:
            from napari.qt import QtViewer

            self._qt_viewer = QtViewer(self.model)
            self._frame_layout.addWidget(self._qt_viewer)
        return self._qt_viewer

    def show_map(self, display: MapDisplay, title: str) -> None:
        """Assign ``display`` (prepared off the GUI thread) to the map layer, made on the first map only."""
        scale = (display.voxel_A,) * 3
        if self.layer is None:
            _ = self.qt_viewer  # the canvas, if its turn has not come yet
            self.layer = self.model.add_image(display.volume, name="map", scale=scale, axis_labels=MAP_AXES,
                                              colormap="bop orange", rendering="iso",
                                              contrast_limits=display.contrast_limits,
                                              iso_threshold=display.iso_level, metadata={"cspt2d": {"role": "map"}})
            self.model.reset_view()
            self.model.camera.angles = MAP_VIEW_ANGLES
            self.model.camera.zoom *= MAP_ZOOM
        else:
            with one_refresh(self.layer) as layer:  # one slice, one thumbnail of the volume
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
        qt_viewer, model, self._qt_viewer, self._model, self.layer = self._qt_viewer, self._model, None, None, None
        self._closed = True
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
