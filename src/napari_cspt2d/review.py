"""Review of refined shifts, with no Qt: which proposals the user accepted or rejected, what the views show.

A refinement proposes a new position for every projection. :class:`ShiftReview` pairs the tracks that were refined
(``before``, the run's snapshot) with the refined ones (``after``, same rows) and derives the *status* of each
proposal from the curation document itself: **accepted** when the document's projection sits at the refined
position, **pending** or **rejected** (the user said no) when it sits at the picked one, **edited** when it was moved
or deleted by hand since, **unchanged** when the refinement did not move it (tilts not used for refinement) and it
is still there. Deriving it from the document keeps the status right through undo/redo. Accepting writes the refined
position and score into the document as one named action; rejecting an accepted shift puts the picked position back
(also one action); both are undone like any other edit.

What the views need is computed here, off the GUI thread: :func:`shift_vectors` (arrows exaggerated so they are
visible at full view, coloured by score), :func:`worst_first` order, and :func:`gallery_images` (a particle's boxes at
the picked and refined positions and the map's reprojection, low-passed and normalised).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.fft
from numpy.typing import ArrayLike, NDArray

from . import geometry
from .errors import CsptInputError
from .model.editing import TrackDocument
from .model.params import PypParameters, refine_rhref_for
from .model.settings import Settings
from .model.tracks import TrackSet
from .recon import ctf
from .recon.backproject import project_volume
from .recon.extract import extract_particles
from .recon.arguments import imaging as imaging_of
from .recon.refine import Imaging

__all__ = [
    "ACCEPTED",
    "ARROW_FACTORS",
    "ARROW_TARGET_FRACTION",
    "EDITED",
    "PENDING",
    "REJECTED",
    "SAME_POSITION_PX",
    "STATUS_NAMES",
    "UNCHANGED",
    "GalleryImages",
    "ShiftReview",
    "ShiftVectors",
    "arrow_factor",
    "gallery_images",
    "score_limits",
    "shift_vectors",
    "worst_first",
]

PENDING, ACCEPTED, REJECTED, EDITED, UNCHANGED = 0, 1, 2, 3, 4
STATUS_NAMES = ("pending", "accepted", "rejected", "edited", "unchanged")
SAME_POSITION_PX = 1e-6


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


#: Arrow exaggerations offered (the smallest that makes the median shift :data:`ARROW_TARGET_FRACTION` of the image).
ARROW_FACTORS = (1, 2, 5, 10, 20, 50, 100, 200, 500)
#: Drawn length of the median shift, as a fraction of the image's larger side: visible at full view.
ARROW_TARGET_FRACTION = 0.02


def arrow_factor(shift_length_px: NDArray[np.float64], image_size_px: int) -> int:
    """How many times longer than the shift an arrow is drawn: the smallest of :data:`ARROW_FACTORS` that draws the
    median non-zero shift at least :data:`ARROW_TARGET_FRACTION` of ``image_size_px`` long (1 with no shift)."""
    moved = shift_length_px[np.isfinite(shift_length_px) & (shift_length_px > SAME_POSITION_PX)]
    if not moved.size:
        return 1
    wanted = ARROW_TARGET_FRACTION * float(image_size_px) / float(np.median(moved))
    return next((f for f in ARROW_FACTORS if f >= wanted), ARROW_FACTORS[-1])


def score_limits(score: NDArray[np.float64]) -> tuple[float, float]:
    """Colour range of the scores: their 2nd and 98th percentiles (a non-empty range)."""
    finite = score[np.isfinite(score)]
    low, high = (float(np.percentile(finite, 2)), float(np.percentile(finite, 98))) if finite.size else (0.0, 1.0)
    return (low, high) if high > low else (low, low + 1e-6)


@dataclass(frozen=True, eq=False)
class ShiftVectors:
    """What the ``refined shifts`` Vectors layer shows: ``data`` (N, 2, 3) with start ``(tilt, y, x)`` at the picked
    position and direction ``(0, dy, dx)`` to the refined one (unbinned px), per-vector ``features`` (a table made
    here, off the GUI thread: the layer takes it as it is, and the session's first table costs pandas ~40 ms), the
    colour range ``score_limits`` of the score colouring, the arrow exaggeration ``factor`` (the layer's length) and
    the line ``width_px`` (unbinned px, thin at full view)."""

    data: NDArray[np.float64]
    features: pd.DataFrame
    score_limits: tuple[float, float]
    factor: int
    width_px: float


def shift_vectors(review: ShiftReview) -> ShiftVectors:
    """The vectors of ``review`` (see :class:`ShiftVectors`), sized for the image the tracks are on."""
    start = np.column_stack([review.before.tilt.astype(np.float64), review.before_px[:, 1], review.before_px[:, 0]])
    shift = review.shift_px
    direction = np.column_stack([np.zeros(len(review)), shift[:, 1], shift[:, 0]])
    size = max(review.before.image_shape_yx)
    features = pd.DataFrame({"particle": review.before.particle, "tilt": review.before.tilt,
                             "shift_px": review.shift_length_px, "score": review.score,
                             "residual_px": review.residual_px})
    return ShiftVectors(np.stack([start, direction], axis=1), features, score_limits(review.score),
                        arrow_factor(review.shift_length_px, size), max(1.5, size / 400.0))


def worst_first(review: ShiftReview) -> NDArray[np.int64]:
    """Review rows ordered worst first: lowest score, then longest shift (NaN scores last)."""
    score = np.where(np.isfinite(review.score), review.score, np.inf)
    return np.lexsort((-review.shift_length_px, score)).astype(np.int64)


# ---------------------------------------------------------------------------------------------------- the gallery
@dataclass(frozen=True, eq=False)
class GalleryImages:
    """Boxes of one particle through its tilts (ordered by angle): review ``rows`` (T,), ``angle_deg`` (T,), and
    ``picked``, ``refined``, ``reference`` (T, n, n) float32, each box normalised (zero mean, unit deviation), and
    ``grey`` (3, T, n, n) uint8: the three rows as 8-bit grey (±3 deviations), made in the worker so that the GUI
    thread only wraps them as images."""

    particle: int
    rows: NDArray[np.int64]
    angle_deg: NDArray[np.float64]
    picked: NDArray[np.float32]
    refined: NDArray[np.float32]
    reference: NDArray[np.float32]
    grey: NDArray[np.uint8]


def grey_uint8(boxes: NDArray[np.float32]) -> NDArray[np.uint8]:
    """Normalised boxes (any shape) as 8-bit grey: −3 deviations black, +3 white, C-contiguous."""
    return np.ascontiguousarray(np.clip((boxes + 3.0) * (255.0 / 6.0), 0, 255).astype(np.uint8))


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
    imaging = imaging_of(Settings.parse(params))
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
    boxes = [_lowpass_normalise(x, resolution_px) for x in (picked, refined, reference)]
    return GalleryImages(int(particle), rows, after.tilts.angle_deg[trow], *boxes, grey_uint8(np.stack(boxes)))
