"""Visual validation of refined shifts, and accepting or rejecting them into the curated tracks (undoable).

A refinement proposes a new position for every projection. :class:`ShiftReview` pairs the tracks that were refined
(``before``, the run's snapshot) with the refined ones (``after``, same rows) and derives the *status* of each
proposal from the curation document itself: **accepted** when the document's projection sits at the refined
position, **pending** or **rejected** (the user said no) when it sits at the picked one, **edited** when it was moved
or deleted by hand since, **unchanged** when the refinement did not move it (tilts not used for refinement) and it
is still there. Deriving it from the document keeps the status right through undo/redo. Accepting writes
the refined position and score into the document as one named action; rejecting an accepted shift puts the picked
position back (also one action); both are undone with Ctrl+Z like any other edit.

Views (:class:`ShiftValidation`, docked on the right, with the gallery docked at the bottom):

* a Vectors layer ``refined shifts`` in the tilt-series viewer, from each projection's picked position to its
  refined one, coloured by refinement score (red = low, green = high; arrows drawn :data:`VECTOR_EXAGGERATION` ×
  longer: the layer's *length*);
* a sortable table of projections (particle, tilt, angle, shift, score, residual from the particle's fitted 3D
  track; row colour = status); selecting a row jumps to that tilt and particle;
* a gallery of the selected particle through all its tilts (ordered by angle): its box at the picked position, at
  the refined position, and the map's reprojection at the refined orientation with the projection's CTF, all
  low-passed to the refinement resolution and with a cross at the box centre. With a right shift the refined boxes
  look like the reprojections, centred on the cross; a wrong one stands out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.fft
from napari.layers import Vectors
from numpy.typing import ArrayLike, NDArray
from qtpy.QtCore import QItemSelectionModel, QModelIndex, QRect, Qt, QTimer, Signal
from qtpy.QtGui import QColor, QFont, QImage, QPainter, QPen
from qtpy.QtWidgets import QGridLayout, QLabel, QPushButton, QScrollArea, QVBoxLayout, QWidget

from ..errors import CsptInputError
from ..model.editing import Change, TrackDocument
from ..model.params import PypParameters, refine_rhref_for
from ..model.tracks import TrackSet
from .. import geometry
from ..recon import ctf
from ..recon.backproject import project_volume
from ..recon.extract import extract_particles
from ..recon.refine import Imaging
from ._guard import report_errors
from ._particle_table import ParticleTableModel, ParticleTableView
from .params_widget import curation_widget

__all__ = [
    "ShiftReview", "ShiftValidation", "ParticleGallery", "GalleryImages", "gallery_images", "vectors_layer_data",
    "PENDING", "ACCEPTED", "REJECTED", "EDITED", "UNCHANGED", "STATUS_NAMES", "VECTOR_EXAGGERATION",
]

PENDING, ACCEPTED, REJECTED, EDITED, UNCHANGED = 0, 1, 2, 3, 4
STATUS_NAMES = ("pending", "accepted", "rejected", "edited", "unchanged")
STATUS_COLOURS = ("#6b6f78", "#3fae5a", "#d64541", "#4a90d9", "#3b3e45")
VECTOR_EXAGGERATION = 5.0
SAME_POSITION_PX = 1e-6
VECTORS_LAYER = "refined shifts"


# ---------------------------------------------------------------------------------------------------- the model
@dataclass(eq=False)
class ShiftReview:
    """Refined positions proposed for tracks: ``before`` (the tracks that were refined), ``after`` (refined, the same
    rows: particle and tilt columns equal), ``residual_px`` (N,) of each refined projection from its particle's
    fitted 3D track (NaN = unknown), ``rejected`` the rows the user rejected."""

    before: TrackSet
    after: TrackSet
    residual_px: NDArray[np.float64] | None = None
    rejected: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        b, a = self.before, self.after
        if len(a) != len(b) or not (np.array_equal(a.particle, b.particle) and np.array_equal(a.tilt, b.tilt)):
            raise CsptInputError("do not have the same projections as the tracks refined", field="refined tracks",
                                 expected="the same (particle, tilt) rows")
        self.residual_px = (np.full(len(b), np.nan) if self.residual_px is None
                            else np.asarray(self.residual_px, dtype=np.float64).reshape(len(b)))
        self.before_px = b.positions_px()
        self.after_px = a.positions_px()

    def __len__(self) -> int:
        return len(self.before)

    @property
    def shift_px(self) -> NDArray[np.float64]:
        """Refined minus picked position (N, 2), x, y in unbinned px."""
        return self.after_px - self.before_px

    @property
    def shift_length_px(self) -> NDArray[np.float64]:
        return np.hypot(*self.shift_px.T)

    @property
    def score(self) -> NDArray[np.float64]:
        """Refinement score (NCC) of each projection."""
        return self.after.score

    def rows_of_particle(self, particle: int) -> NDArray[np.int64]:
        """Rows of ``particle``, ordered by tilt angle."""
        rows = np.flatnonzero(self.before.particle == int(particle))
        angle = self.before.tilts.angle_deg[self.before.tilt_rows()[rows]]
        return rows[np.argsort(angle, kind="stable")]

    def document_rows(self, tracks: TrackSet) -> NDArray[np.int64]:
        """Row in ``tracks`` of each reviewed projection, by (particle, tilt); -1 where it no longer exists."""
        out = np.full(len(self), -1, np.int64)
        if not len(tracks) or not len(self):
            return out
        span = int(max(tracks.tilt.max(), self.before.tilt.max())) + 1
        keys = tracks.particle * span + tracks.tilt
        wanted = self.before.particle * span + self.before.tilt
        order = np.argsort(keys, kind="stable")
        pos = np.clip(np.searchsorted(keys, wanted, sorter=order), 0, len(tracks) - 1)
        found = keys[order[pos]] == wanted
        out[found] = order[pos[found]]
        return out

    def status(self, tracks: TrackSet) -> NDArray[np.int64]:
        """Status (:data:`PENDING`, :data:`ACCEPTED`, :data:`REJECTED`, :data:`EDITED`, :data:`UNCHANGED`) of each
        proposal given the document's current ``tracks``."""
        rows = self.document_rows(tracks)
        status = np.full(len(self), EDITED, np.int64)
        have = rows >= 0
        current = np.full((len(self), 2), np.nan)
        if have.any():
            current[have] = tracks.positions_px()[rows[have]]
        at_after = np.all(np.abs(current - self.after_px) <= SAME_POSITION_PX, axis=1)
        at_before = np.all(np.abs(current - self.before_px) <= SAME_POSITION_PX, axis=1) & ~at_after
        status[at_before] = PENDING
        if self.rejected:
            rejected = np.zeros(len(self), bool)
            rejected[list(self.rejected)] = True
            status[at_before & rejected] = REJECTED
        status[at_after] = ACCEPTED
        status[at_after & np.all(np.abs(self.shift_px) <= SAME_POSITION_PX, axis=1)] = UNCHANGED
        return status

    def _action_name(self, verb: str, rows: NDArray[np.int64]) -> str:
        particles = np.unique(self.before.particle[rows])
        if rows.size == 1:
            return f"{verb} refined shift (particle {self.before.particle[rows[0]]}, tilt {self.before.tilt[rows[0]]})"
        if particles.size == 1:
            return f"{verb} refined shifts of particle {particles[0]}"
        return f"{verb} {rows.size} refined shifts"

    def _move(self, document: TrackDocument, rows: NDArray[np.int64], positions: NDArray[np.float64],
              scores: NDArray[np.float64], name: str) -> int:
        tracks = document.tracks
        target = self.document_rows(tracks)[rows]
        keep = target >= 0
        if not keep.any():
            return 0
        moved = tracks.with_positions(target[keep], positions[rows[keep]])
        score = moved.score.copy()
        score[target[keep]] = scores[rows[keep]]
        document.apply(name, moved.replace(score=score))
        return int(keep.sum())

    def accept(self, document: TrackDocument, rows: ArrayLike) -> int:
        """Put the refined position and score of ``rows`` into ``document`` (one undoable action); returns how many
        projections changed (already accepted or deleted ones are skipped)."""
        rows = self._check_rows(rows)
        self.rejected.difference_update(rows.tolist())
        todo = rows[self.status(document.tracks)[rows] != ACCEPTED]
        if todo.size == 0:
            return 0
        return self._move(document, todo, self.after_px, self.after.score, self._action_name("Accept", rows))

    def reject(self, document: TrackDocument, rows: ArrayLike) -> int:
        """Mark ``rows`` rejected; those accepted go back to their picked position and score (one undoable action).
        Returns how many projections changed in the document."""
        rows = self._check_rows(rows)
        self.rejected.update(rows.tolist())
        todo = rows[self.status(document.tracks)[rows] == ACCEPTED]
        if todo.size == 0:
            return 0
        return self._move(document, todo, self.before_px, self.before.score, self._action_name("Reject", rows))

    def _check_rows(self, rows: ArrayLike) -> NDArray[np.int64]:
        rows = np.unique(np.atleast_1d(np.asarray(rows, dtype=np.int64)))
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise CsptInputError(f"has rows outside 0..{len(self) - 1}", field="rows",
                                 expected="rows of the refined projections")
        return rows


def vectors_layer_data(review: ShiftReview, pixel_A: float) -> tuple[NDArray[np.float64], dict]:
    """Vectors ``(N, 2, 3)``: start ``(tilt, y, x)`` at the picked position, direction ``(0, dy, dx)`` to the refined
    one (unbinned px), and the layer keyword arguments (features, colour by score, scale ``(1, pixel_A, pixel_A)``)."""
    start = np.column_stack([review.before.tilt.astype(np.float64), review.before_px[:, 1], review.before_px[:, 0]])
    shift = review.shift_px
    direction = np.column_stack([np.zeros(len(review)), shift[:, 1], shift[:, 0]])
    score = review.score
    finite = score[np.isfinite(score)]
    limits = (float(np.percentile(finite, 2)), float(np.percentile(finite, 98))) if finite.size else (0.0, 1.0)
    if limits[1] <= limits[0]:
        limits = (limits[0], limits[0] + 1e-6)
    kwargs = {
        "name": VECTORS_LAYER,
        "features": {"particle": review.before.particle, "tilt": review.before.tilt, "shift_px": review.shift_length_px,
                     "score": score, "residual_px": review.residual_px},
        "edge_color": "score", "edge_colormap": "RdYlGn", "edge_contrast_limits": limits,
        "edge_width": 2.5, "length": VECTOR_EXAGGERATION, "vector_style": "arrow", "opacity": 1.0,
        "projection_mode": "none", "scale": (1.0, float(pixel_A), float(pixel_A)), "axis_labels": ("tilt", "y", "x"),
        "metadata": {"cspt2d": {"role": "refined-shifts"}},
    }
    return np.stack([start, direction], axis=1), kwargs


# ---------------------------------------------------------------------------------------------------- the gallery
@dataclass(frozen=True, eq=False)
class GalleryImages:
    """Boxes of one particle through its tilts (ordered by angle): review ``rows`` (T,), ``angle_deg`` (T,), and
    ``picked``, ``refined``, ``reference`` (T, n, n) float32, each box normalised (zero mean, unit deviation)."""

    particle: int
    rows: NDArray[np.int64]
    angle_deg: NDArray[np.float64]
    picked: NDArray[np.float32]
    refined: NDArray[np.float32]
    reference: NDArray[np.float32]


def _boxes(stack, tracks: TrackSet, rows: NDArray[np.int64], imaging: Imaging, radius_A: float) -> NDArray[np.float32]:
    out = np.empty((rows.size, imaging.box, imaging.box), np.float32)
    where = {int(r): i for i, r in enumerate(rows)}
    for batch in extract_particles(stack, tracks, extract_box=imaging.box * imaging.bin, extract_bin=imaging.bin,
                                   particle_rad_A=radius_A, pixel_A=imaging.stack_pixel_A, rows=rows,
                                   batch_size=max(rows.size, 1)):
        out[[where[int(r)] for r in batch.rows]] = batch.images
    return out


def _lowpass_normalise(images: NDArray[np.float32], resolution_px: float) -> NDArray[np.float32]:
    """Gaussian low-pass (half amplitude at ``resolution_px`` period) then zero mean, unit deviation per box."""
    n = images.shape[-1]
    k2 = np.fft.fftfreq(n)[:, None] ** 2 + np.fft.rfftfreq(n)[None, :] ** 2
    filt = np.exp(-np.log(2.0) * k2 * resolution_px**2)
    out = scipy.fft.irfft2(scipy.fft.rfft2(images) * filt, s=(n, n)).astype(np.float32)
    out -= out.mean(axis=(1, 2), keepdims=True)
    out /= np.maximum(out.std(axis=(1, 2), keepdims=True), 1e-12)
    return out


def gallery_images(stack, review: ShiftReview, particle: int, volume: NDArray[np.floating],
                   params: PypParameters, *, iteration: int | None = None) -> GalleryImages:
    """The gallery of ``particle``: boxes at the picked and refined positions from ``stack`` and the reprojection
    of ``volume`` (the map, protein positive) at the refined orientation times the projection's CTF, all low-passed
    to the refinement resolution of ``iteration`` (default the last one)."""
    rows = review.rows_of_particle(particle)
    if rows.size == 0:
        raise CsptInputError(f"particle {particle} was not refined", field="particle", expected="a refined particle")
    imaging = Imaging.from_params(params)
    n = imaging.box
    if np.shape(volume) != (n, n, n):
        raise CsptInputError(f"has shape {np.shape(volume)}", field="map", expected=f"({n}, {n}, {n})")
    radius_A = float(params["particle_rad"])
    picked = _boxes(stack, review.before, rows, imaging, radius_A)
    refined = _boxes(stack, review.after, rows, imaging, radius_A)
    after = review.after
    trow, prow = after.tilt_rows()[rows], after.particle_rows()[rows]
    euler = after.particles.euler_deg[prow]
    matrices = geometry.projection_matrices(euler[:, 2], euler[:, 1], euler[:, 0], after.tilts.angle_deg[trow],
                                            after.tilts.axis_deg[trow])
    projections = project_volume(volume, matrices)
    defocus_A = ctf.projection_defocus_A(after.tilts.defocus_um[trow], after.projected_px()[rows, 2],
                                         imaging.stack_pixel_A)
    model = ctf.image_model(n, imaging.pixel_A, defocus_A, voltage_kV=imaging.voltage_kV, cs_mm=imaging.cs_mm,
                            amp_contrast=imaging.amp_contrast).grid(n, imaging.pixel_A)
    reference = scipy.fft.irfft2(scipy.fft.rfft2(projections) * model, s=(n, n)).astype(np.float32)
    last = params["refine_maxiter"] if iteration is None else iteration
    resolution_px = max(refine_rhref_for(params, max(last, 2)) / imaging.pixel_A, 2.0)
    return GalleryImages(int(particle), rows, after.tilts.angle_deg[trow],
                         *(_lowpass_normalise(x, resolution_px) for x in (picked, refined, reference)))


def _to_qimage(box: NDArray[np.float32]) -> tuple[QImage, NDArray[np.uint8]]:
    """8-bit grey image of a normalised box (±3 deviations), and the buffer it points into (keep it alive)."""
    grey = np.ascontiguousarray(np.clip((box + 3.0) * (255.0 / 6.0), 0, 255).astype(np.uint8))
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
            [_to_qimage(b) for b in stack] for stack in (images.picked, images.refined, images.reference)]
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

    HEADERS = ("Particle", "Tilt", "Angle (°)", "Shift (px)", "Score", "Resid. (px)")

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


# ---------------------------------------------------------------------------------------------------- the dock
class ShiftValidation(QWidget):
    """The shift-validation dock (table, accept/reject buttons) with the gallery dock and the vectors layer."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.review: ShiftReview | None = None
        self.document: TrackDocument | None = None
        self.layer: Vectors | None = None
        self._stack = None
        self._params: PypParameters | None = None
        self._volume = None
        self._unsubscribe: Callable[[], None] | None = None
        self._particle: int | None = None
        self._status = np.zeros(0, np.int64)
        self._label = ""
        self._build_ui()
        self._status_timer = QTimer(self)
        self._status_timer.setSingleShot(True)
        self._status_timer.setInterval(100)
        self._status_timer.timeout.connect(self.refresh_status)
        napari_viewer.dims.events.current_step.connect(self._on_step)
        window = napari_viewer.window
        self.dock = window.add_dock_widget(self, name="Shift validation", area="right", tabify=True)
        self.gallery_dock = window.add_dock_widget(self.gallery_scroll, name="Particle gallery", area="bottom")
        self.dock.raise_()

    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        self.summary = QLabel("No refinement yet.")
        self.summary.setWordWrap(True)
        layout.addWidget(self.summary)
        self.table = ProjectionTableView()
        self.table.row_activated.connect(self.jump)
        self.table.setMinimumHeight(150)
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
        hint = QLabel(f"{legend}<br>Arrows in '{VECTORS_LAYER}' are drawn ×{VECTOR_EXAGGERATION:g} (layer length), "
                      "coloured by score (red low, green high).")
        hint.setWordWrap(True)
        hint.setStyleSheet("color: gray")
        layout.addWidget(hint)
        self.gallery = ParticleGallery()
        self.gallery.row_clicked.connect(self.jump)
        self.gallery_scroll = QScrollArea()
        self.gallery_scroll.setWidget(self.gallery)
        self.gallery_scroll.setWidgetResizable(True)
        self.gallery_scroll.setMinimumHeight(self.gallery.minimumHeight() + 24)

    # ------------------------------------------------------------------ content
    def set_review(self, review: ShiftReview, *, stack, params: PypParameters, volume, document: TrackDocument,
                   label: str = "") -> None:
        """Show ``review`` (refined proposals for ``document``'s tracks) with the gallery drawn from ``stack`` and
        ``volume`` (the map) using ``params``."""
        self.review, self._stack, self._params, self._volume = review, stack, params, volume
        if document is not self.document:
            if self._unsubscribe is not None:
                self._unsubscribe()
            self.document = document
            self._unsubscribe = document.subscribe(self._on_change)
        self._status = review.status(document.tracks)
        self.table.source.set_review(review, self._status)
        self._label = label
        self._show_vectors()
        self._particle = None
        self.gallery.set_images(None, self._status, review.score, review.shift_length_px)
        self._update_summary()
        if len(review):
            worst = int(np.argmax(review.shift_length_px))
            self.jump(worst)

    def _show_vectors(self) -> None:
        data, kwargs = vectors_layer_data(self.review, self._params.stack_pixel_A)
        existing = next((lyr for lyr in self.viewer.layers if isinstance(lyr, Vectors) and lyr.name == VECTORS_LAYER),
                        None)
        if existing is not None:
            self.viewer.layers.remove(existing)
        self.layer = self.viewer.add_vectors(data, **kwargs)
        points = curation_widget(self.viewer).controller
        if points is not None:
            self.viewer.layers.selection.active = points.points

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
    @report_errors("Jump to projection")
    def jump(self, row: int) -> None:
        """Show review ``row``: its tilt in the viewer, its particle active and centred, its particle's gallery."""
        review = self.review
        if review is None:
            return
        particle, tilt = int(review.before.particle[row]), int(review.before.tilt[row])
        labels = list(self.viewer.dims.axis_labels)
        axis = labels.index("tilt") if "tilt" in labels else 0
        self.viewer.dims.set_point(axis, tilt)
        controller = curation_widget(self.viewer).controller
        if controller is not None and particle in set(controller.document.tracks.particles.id.tolist()):
            controller.set_active_particle(particle, center=True)
        self.show_particle(particle)
        self.gallery.set_current(row)
        self.table.select_row(row)
        column = self.gallery.column_of(row)
        if column is not None:
            self.gallery_scroll.ensureVisible(self.gallery.column_x(column) + self.gallery.cell // 2, 0,
                                              self.gallery.cell, 0)

    def show_particle(self, particle: int) -> None:
        """Draw the gallery of ``particle`` (cached while it stays the same particle)."""
        if particle == self._particle:
            return
        images = gallery_images(self._stack, self.review, particle, self._volume, self._params)
        self._particle = particle
        self.gallery.set_images(images, self._status, self.review.score, self.review.shift_length_px)

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
        """Stop following the document and the viewer."""
        self._status_timer.stop()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            self.viewer.dims.events.current_step.disconnect(self._on_step)
