"""The Validate tab: refined shifts seen at full view, judged worst first, accepted or rejected (undoable).

The review itself (:class:`~napari_cspt2d.review.ShiftReview`: statuses derived from the curation document, accept
and reject as named, undoable actions) and everything the views show are computed without Qt, in the run's worker
(:func:`~napari_cspt2d.runs.prepare_iteration`) or a gallery worker; this tab only assigns them:

* a Vectors layer ``refined shifts`` in the tilt-series viewer (made once, updated in place), from each projection's
  picked position to its refined one, drawn ×N longer so they are visible at full view (N shown beside the colour
  bar), coloured by refinement score (red = low, green = high, colour bar with the score range);
* "Worst first" navigation (lowest score, then longest shift) and a sortable table of projections (particle, tilt,
  angle, shift, score, residual; row colour = status); selecting a row jumps to that tilt and particle;
* a gallery of the selected particle through all its tilts (ordered by angle): its box at the picked position, at
  the refined position, and the map's reprojection with the projection's CTF, all low-passed to the refinement
  resolution, with a cross at the box centre.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
from napari.layers import Vectors
from napari.qt.threading import create_worker
from napari.utils.colormaps import ensure_colormap
from numpy.typing import NDArray
from qtpy.QtCore import QItemSelectionModel, QModelIndex, QRect, Qt, QTimer, Signal
from qtpy.QtGui import QColor, QFont, QImage, QLinearGradient, QPainter, QPen
from qtpy.QtWidgets import QGridLayout, QHBoxLayout, QLabel, QPushButton, QScrollArea, QVBoxLayout, QWidget

from ..errors import CsptInputError
from ..model.editing import Change, TrackDocument
from ..model.params import PypParameters
from ..review import (
    PENDING,
    STATUS_NAMES,
    UNCHANGED,
    GalleryImages,
    ShiftReview,
    ShiftVectors,
    gallery_images,
    shift_vectors,
    worst_first,
)
from ._guard import report_errors
from ._layer_update import add_unselected, layer_list_told_once, one_refresh
from ._owner import CockpitState, state_of
from ._particle_table import ParticleTableModel, ParticleTableView
from ._stages import in_own_turn

__all__ = ["ShiftValidation", "ParticleGallery", "STATUS_COLOURS", "VECTORS_LAYER", "SCORE_COLORMAP",
           "add_shift_vectors_layer", "shift_vectors_layer"]

STATUS_COLOURS = ("#6b6f78", "#3fae5a", "#d64541", "#4a90d9", "#3b3e45")
VECTORS_LAYER = "refined shifts"
SCORE_COLORMAP = "RdYlGn"


def _to_qimage(grey: NDArray[np.uint8]) -> tuple[QImage, NDArray[np.uint8]]:
    """A QImage over an 8-bit grey box (:attr:`GalleryImages.grey`), and the buffer it points into (keep it alive)."""
    h, w = grey.shape
    return QImage(grey.data, w, h, w, QImage.Format.Format_Grayscale8), grey


class ParticleGallery(QWidget):
    """One column per tilt (ordered by angle): the picked box, the refined box and the map's reprojection, with the
    angle above and score / shift below; the strip under a column shows its status. Signal ``row_clicked(int)``
    (review row of the column clicked)."""

    row_clicked = Signal(int)
    ROW_NAMES = ("picked", "refined", "map")

    def __init__(self, cell_px: int = 84, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.cell = int(cell_px)
        self.gap, self.left, self.top, self.bottom = 4, 58, 18, 30
        self.images: GalleryImages | None = None
        self._qimages: list[list[tuple[QImage, NDArray]]] = []
        self.status = np.zeros(0, np.int64)
        self.scores = np.zeros(0)
        self.shifts = np.zeros(0)
        self.current_row: int | None = None
        self.setMinimumHeight(self.top + 3 * (self.cell + self.gap) + self.bottom)

    def set_images(self, images: GalleryImages | None, status: NDArray[np.int64], scores: NDArray[np.float64],
                   shifts: NDArray[np.float64]) -> None:
        """Show ``images``; ``status``/``scores``/``shifts`` are per review row (all rows)."""
        self.images = images
        self._qimages = [] if images is None else [
            [_to_qimage(box) for box in row] for row in images.grey]
        self.set_status(status)
        self.scores, self.shifts = scores, shifts
        columns = 0 if images is None else images.rows.size
        self.setMinimumWidth(self.left + columns * (self.cell + self.gap) + self.gap)
        self.update()

    def set_status(self, status: NDArray[np.int64]) -> None:
        self.status = status
        self.update()

    def set_current(self, row: int | None) -> None:
        """Outline the column of review ``row``."""
        self.current_row = row
        self.update()

    def column_x(self, column: int) -> int:
        return self.left + column * (self.cell + self.gap)

    def column_of(self, row: int) -> int | None:
        if self.images is None:
            return None
        hits = np.flatnonzero(self.images.rows == row)
        return int(hits[0]) if hits.size else None

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt API
        painter = QPainter(self)
        painter.fillRect(self.rect(), QColor("#262930"))
        painter.setPen(QColor("#d6d6d6"))
        font = QFont(painter.font())
        font.setPointSize(8)
        painter.setFont(font)
        if self.images is None:
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter,
                             "Select a projection in the table to see its particle through the tilts.")
            painter.end()
            return
        c, g = self.cell, self.gap
        for r, name in enumerate(self.ROW_NAMES):
            painter.drawText(QRect(2, self.top + r * (c + g), self.left - 6, c),
                             int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter), name)
        cross = QPen(QColor(255, 214, 0, 170))
        for j, row in enumerate(self.images.rows.tolist()):
            x = self.column_x(j)
            painter.setPen(QColor("#d6d6d6"))
            painter.drawText(QRect(x, 0, c, self.top), int(Qt.AlignmentFlag.AlignCenter),
                             f"{self.images.angle_deg[j]:+.0f}°")
            for r in range(3):
                y = self.top + r * (c + g)
                painter.drawImage(QRect(x, y, c, c), self._qimages[r][j][0])
                painter.setPen(cross)
                painter.drawLine(x + c // 2 - 5, y + c // 2, x + c // 2 + 5, y + c // 2)
                painter.drawLine(x + c // 2, y + c // 2 - 5, x + c // 2, y + c // 2 + 5)
            y = self.top + 3 * (c + g)
            status = int(self.status[row]) if row < self.status.size else PENDING
            painter.fillRect(QRect(x, y - g + 1, c, 4), QColor(STATUS_COLOURS[status]))
            painter.setPen(QColor("#d6d6d6"))
            painter.drawText(QRect(x, y + 3, c, self.bottom - 3), int(Qt.AlignmentFlag.AlignHCenter),
                             f"{self.scores[row]:.2f} · {self.shifts[row]:.1f}px")
            if row == self.current_row:
                painter.setPen(QPen(QColor("#ffffff"), 2))
                painter.drawRect(QRect(x - 2, self.top - 2, c + 3, 3 * (c + g) + 1))
        painter.end()

    def mousePressEvent(self, event) -> None:  # noqa: N802 - Qt API
        if self.images is None:
            return
        column = int((event.position().x() - self.left) // (self.cell + self.gap))
        if 0 <= column < self.images.rows.size:
            self.row_clicked.emit(int(self.images.rows[column]))


# ---------------------------------------------------------------------------------------------------- the table
class ProjectionTableModel(ParticleTableModel):
    """Columns: particle, tilt, angle, shift length, score, residual; row background = status."""

    HEADERS = ("Part.", "Tilt", "Angle", "Shift", "Score", "Resid.")
    TOOLTIPS = ("Particle id", "Tilt (stack section, from 0)", "Tilt angle (°)", "Refined minus picked position (px)",
                "Refinement score (NCC)", "Distance from the particle's fitted 3D track (px)")

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._columns = [np.zeros(0, np.int64), np.zeros(0, np.int64)] + [np.zeros(0)] * 4
        self.status = np.zeros(0, np.int64)

    def set_review(self, review: ShiftReview, status: NDArray[np.int64]) -> None:
        b = review.before
        self.beginResetModel()
        self._columns = [b.particle, b.tilt, b.tilts.angle_deg[b.tilt_rows()], review.shift_length_px, review.score,
                         review.residual_px]
        self.status = status
        self.endResetModel()

    def set_status(self, status: NDArray[np.int64]) -> None:
        self.status = status
        if self.rowCount():
            self.dataChanged.emit(self.index(0, 0), self.index(self.rowCount() - 1, self.columnCount() - 1))

    def data(self, index: QModelIndex, role: int = Qt.ItemDataRole.DisplayRole):
        if index.isValid() and index.row() < self.status.size:
            status = int(self.status[index.row()])
            if role == Qt.ItemDataRole.BackgroundRole and status not in (PENDING, UNCHANGED):
                colour = QColor(STATUS_COLOURS[status])
                colour.setAlpha(90)
                return colour
            if role == Qt.ItemDataRole.ToolTipRole:
                return STATUS_NAMES[status]
        return super().data(index, role)


class ProjectionTableView(ParticleTableView):
    """Sortable projection table; signal ``row_activated(int)`` (review row) when the current row changes."""

    row_activated = Signal(int)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.source = ProjectionTableModel(self)
        self.proxy.setSourceModel(self.source)
        self.sortByColumn(3, Qt.SortOrder.DescendingOrder)
        self.selectionModel().currentRowChanged.connect(self._on_current)

    def _on_clicked(self, index: QModelIndex) -> None:
        self.row_activated.emit(self.proxy.mapToSource(index).row())

    def _on_current(self, current: QModelIndex, _previous: QModelIndex) -> None:
        if current.isValid():
            self.row_activated.emit(self.proxy.mapToSource(current).row())

    def selected_rows(self) -> list[int]:
        """Review rows selected (sorted)."""
        return sorted({self.proxy.mapToSource(i).row() for i in self.selectionModel().selectedRows()})

    def select_row(self, row: int) -> None:
        index = self.proxy.mapFromSource(self.source.index(row, 0))
        self.selectionModel().blockSignals(True)
        self.selectionModel().setCurrentIndex(index, QItemSelectionModel.SelectionFlag.ClearAndSelect
                                              | QItemSelectionModel.SelectionFlag.Rows)
        self.selectionModel().blockSignals(False)
        self.viewport().update()
        self.scrollTo(index)


class ColourBar(QWidget):
    """The score colour bar of the shift arrows: the colormap from low (left) to high (right) with the range, and
    the arrows' exaggeration (×N)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.limits = (0.0, 1.0)
        self.factor = 1
        colormap = ensure_colormap(SCORE_COLORMAP)
        self._colours = [QColor.fromRgbF(*map(float, c)) for c in colormap.map(np.linspace(0, 1, 9))]
        self.setMinimumHeight(34)

    def set_scale(self, limits: tuple[float, float], factor: int) -> None:
        self.limits, self.factor = limits, int(factor)
        self.update()

    def text(self) -> str:
        return f"score {self.limits[0]:.2f} … {self.limits[1]:.2f}   arrows ×{self.factor}"

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt API
        painter = QPainter(self)
        bar = QRect(4, 2, self.width() - 8, 12)
        gradient = QLinearGradient(bar.left(), 0, bar.right(), 0)
        for i, colour in enumerate(self._colours):
            gradient.setColorAt(i / (len(self._colours) - 1), colour)
        painter.fillRect(bar, gradient)
        painter.setPen(QColor("#d6d6d6"))
        painter.drawText(QRect(4, 15, self.width() - 8, self.height() - 15),
                         int(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter), f"{self.limits[0]:.2f} low")
        painter.drawText(QRect(4, 15, self.width() - 8, self.height() - 15),
                         int(Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignVCenter), f"arrows ×{self.factor}")
        painter.drawText(QRect(4, 15, self.width() - 8, self.height() - 15),
                         int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter), f"high {self.limits[1]:.2f}")
        painter.end()


def shift_vectors_layer(vectors: ShiftVectors, pixel_A: float, visible: bool = True) -> Vectors:
    """The ``refined shifts`` layer showing ``vectors`` (stack pixels of ``pixel_A`` Å), not yet in a viewer."""
    return Vectors(
        vectors.data, features=vectors.features, name=VECTORS_LAYER, edge_color="score",
        edge_colormap=SCORE_COLORMAP, edge_contrast_limits=vectors.score_limits, edge_width=vectors.width_px,
        length=vectors.factor, vector_style="arrow", opacity=1.0, projection_mode="none", visible=visible,
        scale=(1.0, pixel_A, pixel_A), axis_labels=("tilt", "y", "x"), metadata={"cspt2d": {"role": "refined-shifts"}})


def add_shift_vectors_layer(viewer, vectors: ShiftVectors, pixel_A: float, visible: bool = True) -> Vectors:
    """Add the ``refined shifts`` layer showing ``vectors`` (stack pixels of ``pixel_A`` Å) to ``viewer``."""
    return viewer.add_layer(shift_vectors_layer(vectors, pixel_A, visible))


def _no_vectors() -> ShiftVectors:
    """No refined shift yet: what the layer holds before the first review."""
    features = {name: np.zeros(0) for name in ("particle", "tilt", "shift_px", "score", "residual_px")}
    return ShiftVectors(np.zeros((0, 2, 3)), features, (0.0, 1.0), 1, 1.5)


# ---------------------------------------------------------------------------------------------------- the tab
class ShiftValidation(QWidget):
    """The Validate tab: summary, colour bar, worst-first navigation, projection table, accept/reject, gallery."""

    def __init__(self, napari_viewer, state: CockpitState | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state_owner = state if state is not None else state_of(napari_viewer)
        self.review: ShiftReview | None = None
        self.document: TrackDocument | None = None
        self.layer: Vectors | None = None
        self._pending_layer: Vectors | None = None  # made by prepare_layer, added in the next turn
        self._stack = None
        self._params: PypParameters | None = None
        self._volume = None
        self._iteration: int | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._particle: int | None = None
        self._gallery_cache: dict[int, GalleryImages] = {}
        self._gallery_worker = None
        self._order = np.zeros(0, np.int64)
        self._position = -1
        self._status = np.zeros(0, np.int64)
        self._label = ""
        self._current_row: int | None = None
        self._build_ui()
        self._status_timer = QTimer(self)
        self._status_timer.setSingleShot(True)
        self._status_timer.setInterval(100)
        self._status_timer.timeout.connect(self.refresh_status)
        napari_viewer.dims.events.current_step.connect(self._on_step)

    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        self.summary = QLabel("No refinement yet: Refine in the Run tab.")
        self.summary.setWordWrap(True)
        layout.addWidget(self.summary)
        self.colour_bar = ColourBar()
        layout.addWidget(self.colour_bar)
        nav = QHBoxLayout()
        for attr, text, slot, tip in (
            ("worst_button", "Worst first", self.worst, "The projection with the lowest score (then longest shift)"),
            ("next_button", "Next worse", self.next_worst, "The next projection in worst-first order"),
            ("previous_button", "Previous", self.previous_worst, "The previous projection in worst-first order"),
        ):
            button = QPushButton(text)
            button.setToolTip(tip)
            button.clicked.connect(lambda _=False, s=slot: s())
            setattr(self, attr, button)
            nav.addWidget(button)
        layout.addLayout(nav)
        self.table = ProjectionTableView()
        self.table.row_activated.connect(self.jump)
        self.table.setMinimumHeight(160)
        layout.addWidget(self.table, 1)
        grid = QGridLayout()
        for i, (attr, text, slot, tip) in enumerate((
            ("accept_button", "Accept", self.accept_selected, "Accept the refined shift of the selected projections"),
            ("reject_button", "Reject", self.reject_selected, "Keep the picked position of the selected projections"),
            ("accept_particle_button", "Accept particle", self.accept_particle,
             "Accept the refined shifts of every projection of the particle in the gallery"),
            ("reject_particle_button", "Reject particle", self.reject_particle,
             "Keep the picked positions of every projection of the particle in the gallery"),
            ("accept_all_button", "Accept all pending", self.accept_pending,
             "Accept every refined shift not yet accepted, rejected or edited"),
        )):
            button = QPushButton(text)
            button.setToolTip(tip + " (undo: Ctrl+Z)")
            button.clicked.connect(lambda _=False, s=slot: s())
            setattr(self, attr, button)
            grid.addWidget(button, i // 2, i % 2)
        layout.addLayout(grid)
        legend = "  ".join(f"<span style='color:{c}'>■</span> {n}" for n, c in zip(STATUS_NAMES, STATUS_COLOURS))
        hint = QLabel(legend)
        hint.setWordWrap(True)
        layout.addWidget(hint)
        self.gallery = ParticleGallery()
        self.gallery.row_clicked.connect(self.jump)
        self.gallery_scroll = QScrollArea()
        self.gallery_scroll.setWidget(self.gallery)
        self.gallery_scroll.setWidgetResizable(True)
        self.gallery_scroll.setMinimumHeight(self.gallery.minimumHeight() + 24)
        layout.addWidget(self.gallery_scroll)

    # ------------------------------------------------------------------ content
    def show_entry(self, entry) -> None:
        """Show the refinement step of history ``entry`` (everything prepared in the run's worker), staged: see
        :meth:`set_review`. Nothing is done when its review is the one shown: the view stays where the user is."""
        prepared, s = entry.result, entry.session
        if prepared.review is self.review and s.document is self.document:
            return  # shown already (e.g. the last finished run's, back after a cancelled run that made no step)
        self.set_review(prepared.review, stack=s.stack, params=s.params, volume=prepared.item.reconstruction.map,
                        document=s.document, label=f"run {entry.run} · {prepared.item.label}",
                        iteration=prepared.item.iteration, vectors=prepared.vectors, gallery=prepared.gallery,
                        jump_to=prepared.worst_row, staged=True)

    def set_review(self, review: ShiftReview, *, stack, params: PypParameters, volume, document: TrackDocument,
                   label: str = "", iteration: int | None = None, vectors: ShiftVectors | None = None,
                   gallery: GalleryImages | None = None, jump_to: int | None = None, staged: bool = False) -> None:
        """Show ``review`` (refined proposals for ``document``'s tracks); the gallery is drawn from ``stack`` and
        ``volume`` (the map) with ``params``. ``vectors``/``gallery`` when prepared already (else computed here);
        the view goes to ``jump_to`` (default: the worst projection). ``staged``: the vectors' assignment, the
        jump's tilt (which re-slices every layer of the viewer) and its particle (made active and centred, its row
        and gallery) each in an event-loop turn of its own, each with its own repaint (:func:`._stages.in_own_turn`;
        dropped if another review is shown meanwhile), as a run's steps arrive — in one turn they took 0.1–0.2 s at
        the first step."""
        self.review, self._stack, self._params, self._volume = review, stack, params, volume
        self._iteration = iteration
        if document is not self.document:
            if self._unsubscribe is not None:
                self._unsubscribe()
            self.document = document
            self._unsubscribe = document.subscribe(self._on_change)
        self._status = review.status(document.tracks)
        self.table.source.set_review(review, self._status)
        self._label = label
        self._order = worst_first(review)
        self._position = -1
        self._particle = None
        self._gallery_cache = {} if gallery is None else {gallery.particle: gallery}
        self.gallery.set_images(None, self._status, review.score, review.shift_length_px)
        self._update_summary()
        shown = vectors if vectors is not None else shift_vectors(review)
        steps = [lambda: self._show_vectors(shown)]
        if len(review):
            row = int(self._order[0]) if jump_to is None else int(jump_to)
            if staged:
                steps += [lambda: self._go_to_tilt(row), lambda: self.jump(row)]
            else:
                steps.append(lambda: self.jump(row))
        for step in steps:
            if staged:
                in_own_turn(lambda step=step: step() if self.review is review else None)
            else:
                step()

    def prepare_layer(self, pixel_A: float) -> None:
        """Add the ``refined shifts`` layer, empty and hidden, before any review (the cockpit does it once a tilt
        series of ``pixel_A`` Å/px is open), so that a Refine's first results only assign the data and show it. Two
        event-loop turns, each a small piece of GUI-thread work: the layer is made in this one; in the next it joins
        the viewer without being selected (:func:`._layer_update.add_unselected`: the tracks stay the active layer,
        the layer controls do not switch to it and back)."""
        if self.layer is not None and self.layer in self.viewer.layers:
            return
        layer = self._pending_layer = shift_vectors_layer(_no_vectors(), pixel_A, visible=False)
        in_own_turn(lambda: self._add_prepared(layer))

    def _add_prepared(self, layer: Vectors) -> None:
        if layer is not self._pending_layer:
            return  # superseded by a later series, or the session closed
        self._pending_layer = None
        if self.layer is None or self.layer not in self.viewer.layers:  # (a review may have made one meanwhile)
            self.layer = add_unselected(self.viewer.layers, layer)

    def _add_layer(self, vectors: ShiftVectors, pixel_A: float, visible: bool = True) -> Vectors:
        layer = add_shift_vectors_layer(self.viewer, vectors, pixel_A, visible)
        controller = self.state_owner.controller
        if controller is not None:  # picking goes on in the tracks layer
            self.viewer.layers.selection.active = controller.points
        return layer

    def _show_vectors(self, vectors: ShiftVectors) -> None:
        """Assign the vectors to the layer (made on the first review if :meth:`prepare_layer` was not called); the
        layer is shown when it receives its first vectors (later reviews keep the user's choice)."""
        self.colour_bar.set_scale(vectors.score_limits, vectors.factor)
        layer, pixel_A = self.layer, float(self._params.stack_pixel_A)
        if layer is None or layer not in self.viewer.layers:
            self.layer = self._add_layer(vectors, pixel_A)
            return
        first = not len(layer.data)
        # one slice and thumbnail of the ~10⁵ vectors, not one per setter, and the layer list told once (also when the
        # arrows' new extent changes the viewer's and it re-slices every layer); a setting that did not change is not
        # assigned (each assignment is events: the controls, the visual, the colours)
        with layer_list_told_once(self.viewer.layers), one_refresh(layer):
            if tuple(layer.scale) != (1.0, pixel_A, pixel_A):
                layer.scale = (1.0, pixel_A, pixel_A)
            limits = tuple(map(float, vectors.score_limits))
            if tuple(layer.edge_contrast_limits) != limits:  # before the features: the colours made once, by them
                layer.edge_contrast_limits = limits
            layer.data = vectors.data
            layer.features = vectors.features  # recolours by the new scores: the layer keeps colouring by "score"
            if layer.edge_width != vectors.width_px:
                layer.edge_width = vectors.width_px
            if layer.length != vectors.factor:
                layer.length = vectors.factor
            if layer.edge_color_mode != "colormap":  # not coloured by a feature (yet): colour by the score
                layer.edge_color = "score"
        if first:
            layer.visible = True

    def _on_change(self, change: Change) -> None:
        if change.kind in ("edit", "undo", "redo"):
            self._status_timer.start()

    def refresh_status(self) -> None:
        """Recompute every status from the document (after edits, accept/reject, undo/redo)."""
        self._status_timer.stop()
        if self.review is None or self.document is None:
            return
        self._status = self.review.status(self.document.tracks)
        self.table.source.set_status(self._status)
        self.gallery.set_status(self._status)
        self._update_summary()

    def _update_summary(self) -> None:
        review = self.review
        counts = np.bincount(self._status, minlength=len(STATUS_NAMES))
        shift = review.shift_length_px
        self.summary.setText(
            f"{self._label}: {len(review)} projections refined, shift median {np.median(shift):.2f} px, "
            f"max {shift.max():.2f} px; " + ", ".join(f"{c} {n}" for c, n in zip(counts, STATUS_NAMES) if c))

    # ------------------------------------------------------------------ navigation
    def worst(self) -> None:
        """Go to the worst projection (lowest score, then longest shift)."""
        self._step_worst(None)

    def next_worst(self) -> None:
        self._step_worst(+1)

    def previous_worst(self) -> None:
        self._step_worst(-1)

    @report_errors("Worst first")
    def _step_worst(self, delta: int | None) -> None:
        if self.review is None or not len(self.review):
            raise CsptInputError("no refinement to review", field="refinement", expected="a finished Refine run")
        self._position = 0 if delta is None else (self._position + delta) % len(self._order)
        self.jump(int(self._order[self._position]))

    @report_errors("Jump to projection")
    def jump(self, row: int) -> None:
        """Show review ``row``: its tilt in the viewer, its particle active and centred, its particle's gallery."""
        review = self.review
        if review is None:
            return
        hits = np.flatnonzero(self._order == row)
        if hits.size:
            self._position = int(hits[0])
        particle = int(review.before.particle[row])
        self._go_to_tilt(row)
        controller = self.state_owner.controller
        with layer_list_told_once(self.viewer.layers):  # (the picking layer's selection: a dozen events)
            if controller is not None and controller.active_particle == particle:
                controller.center_on_active()  # (its track and its point's selection are there already)
            elif controller is not None and particle in set(controller.document.tracks.particles.id.tolist()):
                controller.set_active_particle(particle, center=True)
        self.table.select_row(row)
        self._current_row = row
        self.show_particle(particle)

    def _go_to_tilt(self, row: int) -> None:
        """Show the tilt of review ``row`` in the viewer (nothing to do when it is shown: no re-slicing)."""
        labels = list(self.viewer.dims.axis_labels)
        axis = labels.index("tilt") if "tilt" in labels else 0
        tilt = int(self.review.before.tilt[row])
        if self.viewer.dims.point[axis] != tilt:
            with layer_list_told_once(self.viewer.layers):  # every layer re-sliced: ~20 events, one per layer
                self.viewer.dims.set_point(axis, tilt)

    def show_particle(self, particle: int) -> None:
        """Show the gallery of ``particle``: from the cache, else made in a worker and shown when ready."""
        if particle == self._particle and self.gallery.images is not None:
            self._mark_current()
            return
        self._particle = particle
        images = self._gallery_cache.get(particle)
        if images is not None:
            self._set_gallery(images)
            return
        review, stack, volume, params, iteration = self.review, self._stack, self._volume, self._params, self._iteration
        worker = create_worker(gallery_images, stack, review, particle, volume, params, iteration=iteration,
                               _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda images, r=review: self._gallery_ready(r, images))
        worker.errored.connect(self._gallery_failed)
        self._gallery_worker = worker
        worker.start()

    @report_errors("Gallery")
    def _gallery_failed(self, exc: BaseException) -> None:
        raise exc

    def _gallery_ready(self, review: ShiftReview, images: GalleryImages) -> None:
        if review is not self.review:
            return  # a newer review is shown
        self._gallery_cache[images.particle] = images
        if images.particle == self._particle:
            self._set_gallery(images)

    def _set_gallery(self, images: GalleryImages) -> None:
        self.gallery.set_images(images, self._status, self.review.score, self.review.shift_length_px)
        self._mark_current()

    def _mark_current(self) -> None:
        row = self._current_row
        self.gallery.set_current(row)
        column = None if row is None else self.gallery.column_of(row)
        if column is not None:
            self.gallery_scroll.ensureVisible(self.gallery.column_x(column) + self.gallery.cell // 2, 0,
                                              self.gallery.cell, 0)

    def _on_step(self, event=None) -> None:
        review, images = self.review, self.gallery.images
        if review is None or images is None:
            return
        labels = list(self.viewer.dims.axis_labels)
        axis = labels.index("tilt") if "tilt" in labels else 0
        tilt = int(round(self.viewer.dims.point[axis]))
        hits = images.rows[review.before.tilt[images.rows] == tilt]
        self.gallery.set_current(int(hits[0]) if hits.size else None)

    # ------------------------------------------------------------------ accept / reject
    def _require(self) -> tuple[ShiftReview, TrackDocument]:
        if self.review is None or self.document is None:
            raise CsptInputError("no refinement to review", field="refinement", expected="a finished Refine run")
        return self.review, self.document

    def _selected(self) -> list[int]:
        rows = self.table.selected_rows()
        if not rows and self.gallery.current_row is not None:
            rows = [self.gallery.current_row]
        if not rows:
            raise CsptInputError("no projection is selected", field="selection", expected="a row of the table")
        return rows

    def _particle_rows(self) -> NDArray[np.int64]:
        if self._particle is None:
            raise CsptInputError("no particle is shown", field="particle", expected="a projection selected first")
        return self.review.rows_of_particle(self._particle)

    def _done(self, verb: str, changed: int) -> None:
        self.refresh_status()
        name = "" if not changed else f" ({changed} projection(s) changed; Ctrl+Z undoes)"
        self.summary.setText(self.summary.text() + f"\n{verb}{name}.")

    @report_errors("Accept")
    def accept_selected(self) -> None:
        review, document = self._require()
        self._done("Accepted", review.accept(document, self._selected()))

    @report_errors("Reject")
    def reject_selected(self) -> None:
        review, document = self._require()
        self._done("Rejected", review.reject(document, self._selected()))

    @report_errors("Accept particle")
    def accept_particle(self) -> None:
        review, document = self._require()
        self._done("Accepted the particle", review.accept(document, self._particle_rows()))

    @report_errors("Reject particle")
    def reject_particle(self) -> None:
        review, document = self._require()
        self._done("Rejected the particle", review.reject(document, self._particle_rows()))

    @report_errors("Accept all")
    def accept_pending(self) -> None:
        review, document = self._require()
        pending = np.flatnonzero(review.status(document.tracks) == PENDING)
        self._done("Accepted all pending", review.accept(document, pending) if pending.size else 0)

    def close_session(self) -> None:
        """Stop following the document and the viewer; a gallery still being drawn is dropped when it arrives."""
        self._status_timer.stop()
        self.review = None
        self._pending_layer = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            self.viewer.dims.events.current_step.disconnect(self._on_step)
