"""Results inside the cockpit: the map in a viewer docked in the Run tab, the FSC curves of every map, the history.

Why a viewer of its own, docked (never floating): the tilt-series viewer's dimensions are ``(tilt, y, x)``; a 3D map
added to it would share the first slider and its 3D rendering would switch the tilt series to 3D too. The docked
viewer (a napari ``ViewerModel`` with its ``QtViewer``, as napari's ``multiple_viewer_widget`` example does) keeps its
own dims and camera, so switching between the tilt series and the map is only a look to the side. Its ``map`` layer is
made once, before the first map, and updated in place with arrays, contrast limits and iso level prepared off the GUI
thread (:func:`napari_cspt2d.runs.map_display`), assigned with one refresh and one thumbnail
(:func:`._layer_update.one_refresh`). With a GPU the map is drawn as a 3D iso-surface; on a software OpenGL renderer
(llvmpipe…), where that draw takes 0.3–1 s of GUI-thread time per map, as its central slice, with a one-click "3D"
button (:class:`MapPanel`).

The FSC plot accumulates: every map of the session keeps its curve, named in the legend (``run 2 · it 3``); the
latest is drawn in colour with its 0.143 resolution marked, earlier ones fade. It is drawn in a process of its own
(:func:`napari_cspt2d.fsc_plot.render_fsc_plot_apart`, waited for by a worker thread) and shown as an image.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
from napari.layers import Image
from napari.qt.threading import create_worker
from qtpy.QtCore import QSize, Qt, Signal
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import (QAbstractItemView, QHBoxLayout, QLabel, QPushButton, QSizePolicy, QTableWidget,
                            QTableWidgetItem, QVBoxLayout, QWidget)

from ..fsc_plot import FSC_THRESHOLD, FscEntry, render_fsc_plot_apart
from ..runs import MapDisplay
from ._gl_info import gl_renderer, is_software_renderer
from ._layer_update import one_refresh
from ._stages import in_own_turn

__all__ = ["FSC_THRESHOLD", "FittedPicture", "FscPlot", "HistoryTable", "MapPanel"]

MAP_AXES = ("z", "y", "x")
#: Initial 3D view of a map (napari camera angles, degrees): tilted so that its depth shows.
MAP_VIEW_ANGLES = (20.0, 30.0, 140.0)
MAP_HEIGHT_PX = 280
#: Colormaps of the map: its 3D iso-surface, its slices (density white on black, as section viewers show them).
MAP_COLORMAP_3D = "bop orange"
MAP_COLORMAP_SLICES = "gray"
#: Zoom over napari's fit-the-box view (a particle fills about half of its box).
MAP_ZOOM = 1.8


class FittedPicture(QLabel):
    """A picture of ``size_px`` (w, h) shown whole, scaled down to the label's width when the tab is narrower (the
    Run tab at 1366 px is ~290 px wide): it never makes its tab wider than the dock, which would push the tab's
    right-hand buttons out of view."""

    def __init__(self, size_px: tuple[int, int], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.size_px = size_px
        self.picture: QPixmap | None = None
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        self.setFixedHeight(size_px[1])
        self.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)

    def sizeHint(self) -> QSize:
        return QSize(*self.size_px)

    def set_picture(self, picture: QPixmap) -> None:
        self.picture = picture
        self._fit()

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self._fit()

    def _fit(self) -> None:
        if self.picture is None:
            return
        if self.width() >= self.picture.width():
            self.setPixmap(self.picture)
        else:
            self.setPixmap(self.picture.scaledToWidth(max(self.width(), 1), Qt.TransformationMode.SmoothTransformation))


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
        self.image = FittedPicture(self.SIZE_PX)
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
        self.image.set_picture(QPixmap.fromImage(QImage(self._buffer.data, w, h, 4 * w, QImage.Format.Format_RGBA8888)))
        self.legend_labels = labels

    @property
    def resolution_A(self) -> float | None:
        """Resolution at FSC 0.143 of the latest curve (Å), None without curves."""
        return self.entries[-1].resolution_A if self.entries else None

    def stop(self) -> None:
        """Drop the drawings still under way (the window closes)."""
        self._request = -1


def _shortcut_changes_held():
    """A context in which napari's action manager emits no ``shortcut_changed``. A ``QtViewer`` made binds every
    shortcut of the settings again, unbinding it first (the same shortcuts in the end), and each change refreshed
    every welcome screen and button tooltip of every viewer: ~180 events, half of making the docked viewer's
    ``QtViewer`` (20–40 ms). A welcome screen refreshes its shortcuts when shown; the new viewer's buttons take
    their tooltips when bound."""
    try:
        from napari.utils.action_manager import action_manager

        return action_manager.events.shortcut_changed.blocker()
    except (ImportError, AttributeError):  # another napari: made as it comes
        return contextlib.nullcontext()


class MapPanel(QWidget):
    """A napari viewer docked in the cockpit showing the ``map`` layer (see the module docstring).

    Built in small pieces, one per event-loop turn, so that neither building the Run tab nor the first map freezes
    the window: the OpenGL renderer's name (:func:`._gl_info.gl_renderer`), the viewer's model, its ``QtViewer`` (a
    canvas with its OpenGL context); on :meth:`prepare`, the ``map`` layer (made hidden; the viewer's third dim;
    the layer added: 0.1 s in all that the first map would otherwise pay at once). ``model``/``qt_viewer`` make them
    at once when needed earlier.

    What is drawn depends on the renderer. With a GPU the map is a 3D iso-surface. On a software rasterizer (Mesa
    llvmpipe under Xvfb, in a VM or over remote desktop) one 3D ray-cast of a 128³ map takes 0.3–1 s on the GUI
    thread, at every map that arrives and every camera move; there the panel shows the map's central z section in
    grey (the slider under it moves through z), which draws in a few ms, says so beside a "3D" button that turns
    the 3D view on (and off) with one click. Either way the layer holds the full-resolution map: only how it is drawn
    changes; the history and the FSC curves are the same."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._model = None
        self._qt_viewer = None
        self._made: Image | None = None  # the map layer, made hidden before the first map
        self._closed = False
        self.software: bool | None = None  # whether OpenGL is a software rasterizer (known from the first turn)
        self.renderer = ""
        self.title = QLabel("No map yet: Reconstruct or Refine.")
        self.title.setWordWrap(True)
        self.view_3d_button = QPushButton("3D")
        self.view_3d_button.setCheckable(True)
        self.view_3d_button.setChecked(True)
        self.view_3d_button.toggled.connect(self._set_3d)
        self.mode_label = QLabel("")
        self.mode_label.setWordWrap(True)
        self.mode_label.setStyleSheet("color: #9a9ea8; font-size: 11px;")
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.mode_label, 1)
        row.addWidget(self.view_3d_button, 0, Qt.AlignmentFlag.AlignTop)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.title)
        layout.addLayout(row)
        frame = QWidget()  # fixes the viewer's height (napari resets the QtViewer's own limits)
        frame.setFixedHeight(MAP_HEIGHT_PX)
        self._frame_layout = QVBoxLayout(frame)
        self._frame_layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(frame)
        self.layer: Image | None = None  # the map layer once it shows a map
        self.shown: MapDisplay | None = None
        self._in_turns(self._detect_renderer, lambda: self.model, lambda: self.qt_viewer)

    # ------------------------------------------------------------------ building, one piece per turn
    def _in_turns(self, *pieces: Callable[[], object]) -> None:
        """Run ``pieces`` one per event-loop turn of their own (:func:`._stages.in_own_turn`), in order."""
        for piece in pieces:
            in_own_turn(lambda piece=piece: None if self._closed else piece())

    def prepare(self) -> None:
        """Make the map layer, hidden, in later event-loop turns (made; the viewer's dims; added to the viewer), so
        that the first map only assigns its data. Called once a tilt series is open or a run starts (not when the
        panel is built: the process's first napari layer also pays the unit registry's set-up, ~0.1 s, which opening
        the cockpit should not)."""
        if self._made is None or self._made not in self.model.layers:
            self._in_turns(self._make_layer, self._make_dims, self._add_layer)

    def _detect_renderer(self) -> None:
        if self.software is not None:
            return
        self.renderer = gl_renderer()
        self.software = is_software_renderer(self.renderer)
        if self.software:
            self.view_3d_button.blockSignals(True)
            self.view_3d_button.setChecked(False)
            self.view_3d_button.blockSignals(False)
        self._say_mode()

    @property
    def model(self):
        """The docked viewer's ``ViewerModel`` (made on first use; 2D display on a software renderer)."""
        if self._model is None and not self._closed:
            from napari.components import ViewerModel

            self._detect_renderer()
            self._model = ViewerModel(title="napari-cspt2d map", ndisplay=3 if self.is_3d else 2)
        return self._model

    @property
    def qt_viewer(self):
        """The docked viewer's ``QtViewer`` (made on first use)."""
        if self._qt_viewer is None and not self._closed:
            from napari.qt import QtViewer

            with _shortcut_changes_held():
                self._qt_viewer = QtViewer(self.model)
            self._frame_layout.addWidget(self._qt_viewer)
        return self._qt_viewer

    def _make_layer(self) -> None:
        if self._made is None:
            self._made = Image(np.zeros((2, 2, 2), np.float32), name="map", axis_labels=MAP_AXES,
                               colormap=self._colormap(), rendering="iso", interpolation2d="linear",
                               contrast_limits=(0.0, 1.0),
                               iso_threshold=0.5, visible=False, metadata={"cspt2d": {"role": "map"}})

    def _make_dims(self) -> None:
        """The viewer's three dims (its z slider's widgets): a third of the cost of adding the layer, apart."""
        if self.model.dims.ndim < len(MAP_AXES):
            self.model.dims.ndim = len(MAP_AXES)

    def _add_layer(self) -> None:
        self._make_layer()
        if self._made not in self.model.layers:
            _ = self.qt_viewer  # (its turn may not have come yet)
            self.model.layers.append(self._made)

    # ------------------------------------------------------------------ 3D or slices
    @property
    def is_3d(self) -> bool:
        """Whether the map is drawn in 3D (else its central z section): the "3D" button's state."""
        return self.view_3d_button.isChecked()

    def _colormap(self) -> str:
        return MAP_COLORMAP_3D if self.is_3d else MAP_COLORMAP_SLICES

    def _say_mode(self) -> None:
        renderer = self.renderer.split(" (")[0] or "unknown"
        if self.software:
            self.view_3d_button.setToolTip(
                f"Show the map as a 3D iso-surface. Off by default: this OpenGL renders in software ({renderer}), "
                "where each 3D draw of the map takes 0.3–1 s and would freeze the window whenever a map arrives "
                "or the view moves.")
            self.mode_label.setText(f"Central slice (z slider below): 3D is off, software OpenGL ({renderer}) "
                                    "draws it too slowly." if not self.is_3d else
                                    f"3D on software OpenGL ({renderer}): each draw takes 0.3–1 s.")
        else:
            self.view_3d_button.setToolTip("Show the map as a 3D iso-surface (on) or its central z slice (off)")
            self.mode_label.setText("" if self.is_3d else "Central slice (z slider below).")
        self.mode_label.setToolTip(f"OpenGL renderer: {self.renderer or 'unknown'}")

    def _set_3d(self, on: bool) -> None:
        self._say_mode()
        if self._model is None:
            return  # the model is made with the chosen display
        self.model.dims.ndisplay = 3 if on else 2
        layer = self._made
        if layer is not None:
            layer.colormap = self._colormap()
        if self.shown is not None:
            self._frame(self.shown)

    def _frame(self, display: MapDisplay) -> None:
        """Fit the view to the map: in 3D tilted so that its depth shows, in 2D at its central z section."""
        model = self.model
        model.reset_view()
        if self.is_3d:
            model.camera.angles = MAP_VIEW_ANGLES
        else:
            model.dims.set_current_step(0, display.volume.shape[0] // 2)
        model.camera.zoom *= MAP_ZOOM

    # ------------------------------------------------------------------ maps
    def show_map(self, display: MapDisplay, title: str) -> None:
        """Assign ``display`` (prepared off the GUI thread) to the map layer, with one refresh and one thumbnail."""
        scale = (display.voxel_A,) * 3
        self._add_layer()  # (made already by prepare, unless the first map comes before its turns)
        first = self.layer is None
        with one_refresh(self._made) as layer:  # one slice, one thumbnail of the volume
            if tuple(layer.scale) != scale:
                layer.scale = scale
            layer.data = display.volume
            layer.contrast_limits_range = display.contrast_limits
            layer.contrast_limits = display.contrast_limits
            layer.iso_threshold = display.iso_level
            layer.visible = True
        self.layer = layer
        if first or layer.data.shape != self.shown.volume.shape or self.shown.voxel_A != display.voxel_A:
            self._frame(display)
        self.shown = display
        self.title.setText(title)

    def close_viewer(self) -> None:
        """Free the docked viewer (called when the napari window closes)."""
        qt_viewer, model, self._qt_viewer, self._model, self.layer = self._qt_viewer, self._model, None, None, None
        self._made = None
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
