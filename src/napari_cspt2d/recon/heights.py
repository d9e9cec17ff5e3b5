"""Particle heights from 2D tracks, for the CTF: each projection's defocus is the tilt's minus the height term.

pyp gives every projection its own defocus from the particle's real 3D position: the tilt's defocus minus the
particle's height along the beam in the tilted specimen (``z'`` of :func:`napari_cspt2d.recon.geometry.project_points`
× pixel; :func:`napari_cspt2d.recon.ctf.projection_defocus_A`). The seed's tracks carry zero 3D coordinates, so every
projection would get the tilt's defocus. Here the 3D point of each particle is fitted from its track through the tilt
geometry (:func:`napari_cspt2d.recon.trackfit.fit_tracks`, robust) and, where the fit is trustworthy, put into the
TrackSet (positions kept, :meth:`TrackSet.with_particle_xyz`); everything that models the CTF (refinement,
reconstruction, the ``DEFOCUS_1/2`` columns written for pyp) then uses the fitted heights.

Trustworthy (:func:`fit_heights`)
    A particle's height is trusted when it was seen at two or more tilt angles at least 0.5° apart, with at least
    three projections in the fit, and the 1-σ uncertainty of its height is at most ``max_error_A`` in every tilt
    it was seen in. That uncertainty is ``sqrt(h_t^T C h_t)`` × pixel, with ``h_t`` the height row of the tilt's
    rotation and ``C = s² (AᵀWA)⁻¹`` the covariance of the particle's fitted point: ``A`` its projections' 2×3 design
    matrices, ``W`` their robust weights, ``s²`` the residual variance per coordinate of its own projections
    (``Σ |r|² / (2 n − 3)`` over the projections in the fit, unweighted, so that down-weighting cannot hide a bad
    track). A badly tracked particle therefore fails by its own residuals, a
    particle seen over a small tilt range by its geometry. The default ``max_error_A = 100`` Å keeps the CTF phase
    error at 5 Å resolution below 0.25 rad at 300 kV (``π λ Δz k²``).

The sign of the heights comes from the tilt table's angles and tilt-axis angle (the hand: tracks alone cannot tell
``axis`` from ``axis + 180°``, see :mod:`~napari_cspt2d.recon.trackfit`); fitted heights are only as right as those.
Switch: ``fitted_heights_ctf`` (on by default) applies when the tracks carry no heights (every 3D point zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..errors import CsptInputError
from ..model.tracks import TrackSet
from .. import geometry
from .trackfit import TiltGeometry, fit_tracks

__all__ = ["DEFAULT_MAX_ERROR_A", "HeightFit", "fit_heights", "has_heights", "with_fitted_heights"]

DEFAULT_MAX_ERROR_A = 100.0
_MIN_PROJECTIONS = 3


@dataclass(frozen=True, eq=False)
class HeightFit:
    """Per particle (P, in ``particle_id`` order): fitted point ``xyz_px`` (P, 3, unbinned px, relative to the
    tomogram centre), ``height_error_A`` (P,) the largest 1-σ height uncertainty over its tilts (inf when
    undetermined), ``trusted`` (P,); ``rms_px`` the fit's RMS residual length over all used projections."""

    particle_id: NDArray[np.int64]
    xyz_px: NDArray[np.float64]
    height_error_A: NDArray[np.float64]
    trusted: NDArray[np.bool_]
    rms_px: float


def has_heights(tracks: TrackSet) -> bool:
    """True when any particle has a non-zero 3D point (the tracks carry their own heights)."""
    return bool(np.any(tracks.particles.xyz_px != 0))


def fit_heights(tracks: TrackSet, *, pixel_A: float, max_error_A: float = DEFAULT_MAX_ERROR_A) -> HeightFit:
    """Fit each particle's 3D point from its track and decide which heights are trustworthy (module docstring).

    ``tracks`` needs ``image_shape_yx``; ``pixel_A`` is the tilt-stack pixel (Å)."""
    if not (math.isfinite(pixel_A) and pixel_A > 0):
        raise CsptInputError(f"is {pixel_A!r}", field="pixel_A", expected="> 0 Å")
    if not (max_error_A > 0):
        raise CsptInputError(f"is {max_error_A!r}", field="fitted_heights_max_error_A", expected="> 0 Å")
    fit = fit_tracks(tracks)
    prow, trow = tracks.particle_rows(), tracks.tilt_rows()
    n_p = tracks.n_particles
    geo = TiltGeometry.from_tracks(tracks)
    w = fit.weight
    design = geo.design(trow)  # (N, 2, 3)
    normal = np.einsum("n,nki,nkj->nij", w, design, design).reshape(-1, 9)
    info = np.stack([np.bincount(prow, normal[:, k], n_p) for k in range(9)], axis=1).reshape(-1, 3, 3)
    sq = np.bincount(prow, (w > 0) * np.sum(fit.residual_px**2, axis=1), n_p)
    n_used = np.bincount(prow, (w > 0).astype(np.float64), n_p)
    enough = fit.determined & (n_used >= _MIN_PROJECTIONS)
    error = np.full(n_p, np.inf)
    if enough.any():
        var = sq[enough] / np.maximum(2.0 * n_used[enough] - 3.0, 1.0)
        cov = np.linalg.inv(info[enough]) * var[:, None, None]
        height_rows = geometry.rotation_y(geo.angle_deg)[:, 2, :]  # (T, 3): z' of each tilt
        per_tilt = np.einsum("ti,pij,tj->pt", height_rows, cov, height_rows)
        seen = np.zeros((n_p, tracks.n_tilts), bool)
        seen[prow[w > 0], trow[w > 0]] = True
        error[enough] = np.sqrt(np.max(np.where(seen[enough], per_tilt, 0.0), axis=1)) * pixel_A
    return HeightFit(tracks.particles.id.copy(), fit.xyz_px, error, error <= max_error_A, fit.rms_px)


def with_fitted_heights(tracks: TrackSet, fit: HeightFit) -> TrackSet:
    """``tracks`` with the trusted particles' fitted points (every projection keeps its image position)."""
    if not np.array_equal(fit.particle_id, tracks.particles.id):
        raise CsptInputError("does not match the TrackSet's particles", field="fit",
                             expected="a HeightFit of this TrackSet")
    xyz = np.where(fit.trusted[:, None], fit.xyz_px, tracks.particles.xyz_px)
    return tracks.with_particle_xyz(xyz, keep_positions=True)
