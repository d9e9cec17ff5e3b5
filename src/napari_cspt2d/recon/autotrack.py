"""Assisted tracking: from a few picked tilts of a particle, find it in the other tilts (like IMOD's beadtrack).

For one particle the tilts are visited walking outward from the picked ones in tilt-angle order (nearest to a pick
first). At each tilt the particle's current fit (:func:`napari_cspt2d.recon.trackfit.solve_points`, all positions
accepted so far) predicts where it is; the prediction is refined by normalised cross-correlation of a reference box
(the average of the particle's boxes in the ``n_ref`` already-tracked tilts nearest in angle, each centred on its
position) against the image around the prediction, within ``search_px``. The correlation peak (sub-pixel by a
parabola per axis) gives the new position and its **confidence**: the normalised cross-correlation coefficient at the
peak (Pearson's r of reference and image under a circular mask, in [-1, 1]). A point is accepted when its confidence
reaches ``min_confidence``; accepted points join the fit before the next tilt. Tilts whose search box leaves the
image are skipped. Picked projections are never moved.

Images: anything indexable by tilt id that returns a 2D array ``(ny, nx)`` in unbinned pixels (a ``(T, ny, nx)``
numpy array, a memory-mapped MRC, :class:`napari_cspt2d.model.tiltseries.TiltSeries` ``.data``, a dask array).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.fft
import scipy.ndimage
from numpy.typing import ArrayLike, NDArray

from ..errors import CsptCancelled, CsptInputError
from ..model.tracks import TrackSet
from .. import geometry
from .trackfit import TiltGeometry, TrackFit, solve_points

__all__ = ["AutotrackOptions", "AutotrackResult", "autotrack_particle", "autotrack_all"]

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class AutotrackOptions:
    """``box_px``: reference box size (px); ``search_px``: largest correction of a prediction (px); ``n_ref``: number
    of tracked tilts averaged into the reference; ``min_confidence``: acceptance threshold on the normalised
    cross-correlation peak; ``score``: TrackSet score given to new projections."""

    box_px: int = 48
    search_px: int = 12
    n_ref: int = 4
    min_confidence: float = 0.4
    score: float = 0.0

    def __post_init__(self) -> None:
        if int(self.box_px) != self.box_px or self.box_px < 8:
            raise CsptInputError(f"is {self.box_px}", field="box_px", expected="an integer >= 8 px")
        if int(self.search_px) != self.search_px or self.search_px < 1:
            raise CsptInputError(f"is {self.search_px}", field="search_px", expected="an integer >= 1 px")
        if int(self.n_ref) != self.n_ref or self.n_ref < 1:
            raise CsptInputError(f"is {self.n_ref}", field="n_ref", expected="an integer >= 1")
        if not -1.0 <= self.min_confidence <= 1.0:
            raise CsptInputError(f"is {self.min_confidence}", field="min_confidence", expected="a value in [-1, 1]")


@dataclass(frozen=True, eq=False)
class AutotrackResult:
    """``tracks``: the input plus every accepted point. Per attempted particle-tilt pair (M): ``particle``, ``tilt``
    (ids), ``predicted_px`` (M, 2) fit prediction, ``position_px`` (M, 2) correlation position (NaN when the box
    left the image), ``confidence`` (M,) normalised CC peak (NaN when not measured), ``accepted`` (M,)."""

    tracks: TrackSet
    particle: NDArray[np.int64]
    tilt: NDArray[np.int64]
    predicted_px: NDArray[np.float64]
    position_px: NDArray[np.float64]
    confidence: NDArray[np.float64]
    accepted: NDArray[np.bool_]

    def confidence_of_rows(self) -> NDArray[np.float64]:
        """Confidence per row of ``tracks`` (NaN for rows that were not added by assisted tracking)."""
        t = self.tracks
        n_t = t.n_tilts
        row_keys = t.particle_rows() * n_t + t.tilt_rows()
        ok = self.accepted
        keys = np.searchsorted(t.particles.id, self.particle[ok]) * n_t + np.searchsorted(t.tilts.id, self.tilt[ok])
        order = np.argsort(row_keys)
        out = np.full(len(t), np.nan)
        out[order[np.searchsorted(row_keys[order], keys)]] = self.confidence[ok]
        return out


# ---------------------------------------------------------------------------------------------- image helpers
def _patch(image: NDArray, centre_xy: NDArray, size: int) -> NDArray[np.float64] | None:
    """``size`` x ``size`` patch centred on ``centre_xy`` (sub-pixel, linear interpolation); None if outside."""
    ny, nx = image.shape
    half = (size - 1) / 2.0
    x0, y0 = centre_xy[0] - half, centre_xy[1] - half
    if x0 < 0 or y0 < 0 or x0 + size - 1 > nx - 1 or y0 + size - 1 > ny - 1:
        return None
    ix, iy = int(np.floor(x0)), int(np.floor(y0))
    fx, fy = x0 - ix, y0 - iy
    stop_x, stop_y = min(ix + size + 1, nx), min(iy + size + 1, ny)
    window = np.asarray(image[iy:stop_y, ix:stop_x], dtype=np.float64)
    return scipy.ndimage.shift(window, (-fy, -fx), order=1, mode="nearest", prefilter=False)[:size, :size]


def _circular_mask(size: int) -> NDArray[np.float64]:
    r = np.hypot(*np.meshgrid(np.arange(size) - (size - 1) / 2, np.arange(size) - (size - 1) / 2))
    edge = size / 2.0
    return np.clip(edge - r, 0.0, 1.0)


def _ncc_peak(reference: NDArray, target: NDArray, mask: NDArray) -> tuple[NDArray[np.float64], float]:
    """Offset (dx, dy) of the reference inside the target (relative to the target centre) and the NCC at the peak."""
    n = mask.sum()
    ref = mask * (reference - (mask * reference).sum() / n)
    ref_norm = np.sqrt((ref**2).sum())
    num, local_sum = _correlate_valid(target, [ref, mask])
    (local_sq,) = _correlate_valid(target**2, [mask])
    var = np.maximum(local_sq - local_sum**2 / n, 1e-12 * max(float(np.max(local_sq)), 1e-300))
    ncc = num / (ref_norm * np.sqrt(var)) if ref_norm > 0 else np.zeros_like(num)
    iy, ix = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
    offset = np.array([ix, iy], dtype=np.float64)
    for axis, i in ((1, ix), (0, iy)):
        if 0 < i < ncc.shape[axis] - 1:
            line = ncc[iy, i - 1:i + 2] if axis == 1 else ncc[i - 1:i + 2, ix]
            denom = line[0] - 2 * line[1] + line[2]
            if denom < 0:
                offset[1 - axis] += float(np.clip(0.5 * (line[0] - line[2]) / denom, -0.5, 0.5))
    centre = (np.array(ncc.shape[::-1]) - 1) / 2.0
    return offset - centre, float(np.clip(ncc[iy, ix], -1.0, 1.0))


def _correlate_valid(image: NDArray, kernels: list[NDArray]) -> list[NDArray[np.float64]]:
    """``sum_uv image[i + u, j + v] kernel[u, v]`` for every placement of each kernel inside the image (FFT)."""
    shape = image.shape
    spectrum = scipy.fft.rfft2(image)
    out = []
    for kernel in kernels:
        valid = tuple(s - k + 1 for s, k in zip(shape, kernel.shape))
        full = scipy.fft.irfft2(spectrum * np.conj(scipy.fft.rfft2(kernel, s=shape)), s=shape)
        out.append(full[: valid[0], : valid[1]])
    return out


# ---------------------------------------------------------------------------------------------- tracking
def _walk_order(angle: NDArray, picked_rows: NDArray, candidate_rows: NDArray) -> NDArray[np.int64]:
    """Candidate tilt rows ordered by angle-rank distance to the nearest picked tilt (smaller |angle| first)."""
    rank = np.empty(len(angle), np.int64)
    rank[np.argsort(angle, kind="stable")] = np.arange(len(angle))
    dist = np.min(np.abs(rank[candidate_rows][:, None] - rank[picked_rows][None, :]), axis=1)
    return candidate_rows[np.lexsort((np.abs(angle[candidate_rows]), dist))]


def _track_one(
    images: Sequence, geo: TiltGeometry, tilt_ids: NDArray, picked_rows: NDArray, picked_xy: NDArray,
    candidates: NDArray, opts: AutotrackOptions,
) -> list[tuple[int, NDArray, NDArray, float, bool]]:
    mask = _circular_mask(opts.box_px)
    rows, xy = list(picked_rows), list(picked_xy)
    out = []
    for trow in _walk_order(geo.angle_deg, picked_rows, candidates):
        xyz, _ = solve_points(geo, np.array(rows), np.array(xy), np.zeros(len(rows), np.int64), 1)
        predicted = geo.predict_px(xyz, [trow])[0]
        nearest = np.array(rows)[np.argsort(np.abs(geo.angle_deg[rows] - geo.angle_deg[trow]), kind="stable")]
        # references are centred on the fit, not on their own measurements, so errors do not accumulate
        centres = geo.predict_px(np.repeat(xyz, len(nearest), axis=0), nearest)
        refs = [b for b in (_patch(images[int(tilt_ids[r])], c, opts.box_px) for r, c in zip(nearest, centres))
                if b is not None][: opts.n_ref]
        target = _patch(images[int(tilt_ids[trow])], predicted, opts.box_px + 2 * opts.search_px)
        if not refs or target is None:
            out.append((int(trow), predicted, np.full(2, np.nan), np.nan, False))
            continue
        reference = np.mean([(b - b.mean()) / (b.std() or 1.0) for b in refs], axis=0)
        offset, confidence = _ncc_peak(reference, target, mask)
        position = predicted + offset
        accepted = confidence >= opts.min_confidence
        out.append((int(trow), predicted, position, confidence, bool(accepted)))
        if accepted:
            rows.append(int(trow))
            xy.append(position)
    return out


def _check_images(images: Sequence, tracks: TrackSet) -> None:
    try:
        first = np.asarray(images[int(tracks.tilts.id[0])])
    except (IndexError, KeyError, TypeError) as exc:
        raise CsptInputError(f"cannot be indexed by tilt id ({exc})", field="images",
                             expected="a (T, ny, nx) stack indexable by tilt id") from exc
    if first.ndim != 2 or tuple(first.shape) != tuple(tracks._require_shape()):
        raise CsptInputError(f"gives sections of shape {first.shape}", field="images",
                             expected=f"sections of the TrackSet's image shape {tracks.image_shape_yx}")


def _resolve_geometry(tracks: TrackSet, fit: TrackFit | None) -> TiltGeometry:
    if fit is None:
        return TiltGeometry.from_tracks(tracks)
    if not np.array_equal(fit.tilt_id, tracks.tilts.id):
        raise CsptInputError("has different tilts than the TrackSet", field="fit", expected="a fit of this TrackSet")
    return fit.geometry


def autotrack_all(
    tracks: TrackSet,
    images: Sequence,
    *,
    particle_ids: ArrayLike | None = None,
    tilt_ids: ArrayLike | None = None,
    fit: TrackFit | None = None,
    options: AutotrackOptions | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> AutotrackResult:
    """Track ``particle_ids`` (default: all) into ``tilt_ids`` (default: every tilt) where they have no projection.

    ``fit``: a :class:`TrackFit` of ``tracks`` whose tilt geometry (refined shifts, rotations, ...) predicts the
    positions; default: the TrackSet's angles and axes. ``progress(stage, done, total)`` is called after each
    particle; ``cancel()`` returning True stops the run with :class:`~napari_cspt2d.errors.CsptCancelled` (the input
    TrackSet is untouched)."""
    opts = options or AutotrackOptions()
    _check_images(images, tracks)
    geo = _resolve_geometry(tracks, fit)
    pids = tracks.particles.id if particle_ids is None else np.atleast_1d(np.asarray(particle_ids, np.int64))
    unknown = ~np.isin(pids, tracks.particles.id)
    if unknown.any():
        raise CsptInputError(f"contains {int(pids[unknown][0])}, which is not a particle", field="particle_ids",
                             expected="ids of particles in the TrackSet")
    wanted_tilts = np.ones(tracks.n_tilts, bool) if tilt_ids is None else np.isin(tracks.tilts.id, tilt_ids)
    positions = tracks.positions_px()
    trow_all = tracks.tilt_rows()
    found: list[tuple] = []
    for done, pid in enumerate(pids):
        if cancel is not None and cancel():
            raise CsptCancelled("assisted tracking cancelled")
        mine = tracks.particle == pid
        picked_rows = trow_all[mine]
        candidates = np.flatnonzero(wanted_tilts & ~np.isin(np.arange(tracks.n_tilts), picked_rows))
        if len(picked_rows) and len(candidates):
            for trow, pred, pos, conf, ok in _track_one(images, geo, tracks.tilts.id, picked_rows, positions[mine],
                                                        candidates, opts):
                found.append((int(pid), int(tracks.tilts.id[trow]), pred, pos, conf, ok))
        if progress is not None:
            progress("autotrack", done + 1, len(pids))
    return _assemble(tracks, found, opts)


def autotrack_particle(
    tracks: TrackSet, images: Sequence, particle_id: int, *, fit: TrackFit | None = None,
    options: AutotrackOptions | None = None,
) -> AutotrackResult:
    """:func:`autotrack_all` for one particle."""
    return autotrack_all(tracks, images, particle_ids=[particle_id], fit=fit, options=options)


def _assemble(tracks: TrackSet, found: list[tuple], opts: AutotrackOptions) -> AutotrackResult:
    if not found:
        empty2 = np.zeros((0, 2))
        return AutotrackResult(tracks, np.zeros(0, np.int64), np.zeros(0, np.int64), empty2, empty2.copy(),
                               np.zeros(0), np.zeros(0, bool))
    pid, tid, pred, pos, conf, ok = (np.array(v) for v in zip(*found))
    out = tracks
    if ok.any():
        prow = np.searchsorted(tracks.particles.id, pid[ok])
        trow = np.searchsorted(tracks.tilts.id, tid[ok])
        shift = geometry.shifts_from_positions(tracks.particles.xyz_px[prow], tracks.tilts.angle_deg[trow],
                                               tracks.tilts.axis_deg[trow], pos[ok], tracks.image_shape_yx)
        out = tracks.append(pid[ok], tid[ok], shift, score=np.full(int(ok.sum()), opts.score))
    return AutotrackResult(out, pid.astype(np.int64), tid.astype(np.int64), pred.astype(np.float64),
                           pos.astype(np.float64), conf.astype(np.float64), ok.astype(bool))
