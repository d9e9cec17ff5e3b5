"""pyp's constrained (CSP) refinement modes in 2D-track mode: projections follow one model per tilt series.

In constrained single-particle tomography a particle's position in each tilt is not free: it is the projection of
the particle's 3D point through the tilt's geometry (:mod:`napari_cspt2d.recon.geometry`, the model of
:mod:`napari_cspt2d.recon.trackfit`)::

    predicted = centre + s_t + R_z(axis_t) R_y(angle_t) X_p        (x, y; unbinned px)

with per-tilt parameters (tilt angle, tilt-axis angle, image shift ``s_t``) shared by every particle of the tilt
series, and per-particle 3D points ``X_p``. Per-projection shifts are residuals on top of that prediction.

What a round does (all pure functions of arrays; the pipeline gathers and scatters)
-------------------------------------------------------------------------------------
1. *Measure* (in the bundle jobs, particle by particle): every projection's position is refined against the map as
   in the free mode (:func:`napari_cspt2d.recon.refine.refine_tracks`: the peak of its band-limited correlation);
   the refined TrackSet is the measurement.
2. *Solve* (in the main process, once all bundles are gathered, so it is the same on dask's LocalCluster and on
   SLURM: a job returns its measurements, never a partial solution): :func:`solve_constrained` fits the particles'
   points and the tilt geometry to every measurement at once — a robust (Huber) least-squares fit,
   :func:`napari_cspt2d.recon.trackfit.fit_tracks`, with the tilt tolerances below as bounds — then ties each
   point to its track (the particle tolerance below). Measurements dropped by the score cutoff get weight 0.
   Tilts outside ``csp_UseImagesForRefinementMin/Max`` follow pyp's split of its modes (``pyp/align/core.py``: the
   micrograph mode 3 runs on every exposure, the particle modes on the range): with ``csp_refine_micrographs``
   their projections are measured like the others and their geometry is fitted to those measurements, but the
   particles' points come from the tilts in the range only (the points are fitted with the in-range tilts, then
   each outside tilt's angle, axis and shift are fitted to its measurements with the points held); without it they
   keep their geometry, and their projections are placed by the model like all others.
3. *Place* (:func:`place_projections`): each projection's final position is the prediction plus its residual
   (measured − predicted) as the per-projection rule below says; the next round's jobs receive these positions, the
   solved per-tilt geometry and the particles' points in their TrackSet.

pyp's keys and the rules followed (nextpyp/pyp: spec ``config/pyp_config.toml`` tab ``csp``; modes mapped in
``src/pyp/align/core.py``; regularisation in ``src/pyp/analysis/fit.py`` ``regularize_image``)
--------------------------------------------------------------------------------------------------------------------
``csp_refine_micrographs`` (spec: "Optimize tilt-axis orientation and position for each tilt-image"; core.py maps
it to CSP mode 3, micrograph shifts, and mode 0 lists tilt and axis angles)
    Per tilt: tilt angle, tilt-axis angle and image shift are refined, within ``csp_ToleranceMicrographTiltAngles``
    (°), ``csp_ToleranceMicrographTiltAxisAngles`` (°) and ``csp_ToleranceMicrographShifts`` (Å, each shift
    component) of the values at the start of the round (pyp's tolerances bound each refinement run, so a run of
    several iterations can go further). The reference tilt (smallest |angle|) keeps its tilt angle and
    shift (with free particle points they fix the model's translation and tilt offset, which no measurement can
    tell, see :mod:`~napari_cspt2d.recon.trackfit`); its axis is refined.
``csp_refine_particles`` (spec: "Optimize sub-tomogram orientations and translations in 3D"; core.py: mode 2)
    Per particle: the 3D point fitted to the measurements may lie at most ``csp_ToleranceParticlesShifts`` (Å, each
    coordinate) from the particle's *anchor*, the point its own track (the picks) gives through the solved tilt
    geometry — in 2D-track mode the track is what pyp's 3D coordinates are; the orientation is refined by the
    local search of :func:`~napari_cspt2d.recon.refine.refine_tracks` with each ZYZ Euler angle within its own
    tolerance of where it started, ``csp_ToleranceParticlesPhi``, ``…Theta``, ``…Psi`` (°; 0 holds that angle;
    :attr:`CspModes.euler_range_deg`, cisTEM's per-angle search ranges). When off, the point is the anchor: pyp's
    micrograph refinement with the particles at their 3D positions.
``csp_frame_refinement`` (core.py: mode 5 → per-frame shifts; the seed requires it on)
    A projection is pyp's "frame" here (one exposure of a particle): per-projection shifts are refined. With it
    off, projections sit exactly at the prediction.
``csp_transreg`` with ``csp_spatial_sigma`` (unbinned px) and ``csp_time_sigma`` (frames; here projections in
acquisition order, ``TIND``) (fit.py ``regularize_image``)
    The per-projection residuals are regularised as pyp regularises frame shifts: first averaged over the
    particles of the same tilt with weights ``exp(-d / sigma)`` (``d`` = distance between the particles' 3D points,
    normalised to sum 1; ``sigma`` grows by 1.25× until at least 5 particles lie within ``2 sigma``; 0 = off), then
    smoothed along the particle's projections in acquisition order by pyp's "AB" rule (median of 3, then a
    normalised Bartlett window of ``csp_time_sigma`` points, edges repeated; 0 = off). Residuals are thereby pulled
    towards the constrained prediction. (pyp's default ``csp_transreg_method`` is a spline fit; its AB option is the
    one followed here.) Without ``csp_transreg`` the residuals are kept whole: each projection sits at its
    measured position.

    What differs from pyp. pyp regularises only with movie frames (``csp_frame_refinement`` acts when a tilt is a
    movie: ``pyp/align/core.py`` sets its frame refinement only with ``use_frames``, and only then calls
    ``fit.regularize``), per tilt image inside ``csp_UseImagesForRefinementMin/Max`` (``fit.regularize`` skips the
    others), on the shifts of a particle's frames *within one tilt*: its time axis is the movie's frames, and it
    adds the tilt's own frame drift back. A 2D track has one image per tilt, so here a projection is the frame
    (issue #19's mapping), the spatial rule is pyp's as written, and the time axis is the particle's exposures
    across the tilt series (the series as the particle's "movie"), every tilt regularised. On
    ``benchmarks/fidelity.py``'s simulation the time smoothing moves the placed positions by about 0.002 px
    (spatial averaging does the work); it also spreads a tilt's residuals to its neighbours in acquisition order,
    so a tilt whose measurements are bad (or were never measured) drags its neighbours — ``csp_time_sigma = 0``
    keeps the spatial rule only.

"Free" mode (the seed's settings: ``csp_frame_refinement`` on, the other switches off, pyp's defaults): no model —
each projection keeps its own measured shift and every particle its refined orientation, which is what pyp's
per-frame refinement without regularisation does. Any of ``csp_refine_micrographs``, ``csp_refine_particles`` or
``csp_transreg`` turns the model on (:attr:`CspModes.constrained`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import scipy.ndimage
import scipy.spatial
import scipy.spatial.distance
from numpy.typing import ArrayLike, NDArray

from ..errors import CsptInputError
from ..model.tracks import TrackSet
from .. import geometry
from .trackfit import TiltGeometry, fit_tracks

__all__ = ["CspModes", "CspState", "ConstrainedFit", "start_constrained", "constrained_round", "solve_constrained",
           "regularize_residuals", "place_projections"]

_MIN_NEIGHBOURS = 5  # pyp: "At a minimum, average this number of particles"
_SIGMA_GROWTH = 1.25  # pyp's step when too few particles are within 2 sigma
_CHUNK = 1024  # rows of the spatial weights computed at once (bounds memory)
_MIN_PARTICLES_PER_TILT = 3  # as trackfit: a tilt's geometry needs at least three particles
_MAX_STEPS = 15
_CONVERGED_PX = 1e-3  # a step moving no point and no shift by more than this (and no angle by 1e-6 rad) ends the fit
_DAMPING = 1e-3
_HUBER_K = 2.0
_RAYLEIGH_MEDIAN = float(np.sqrt(2.0 * np.log(2.0)))


@dataclass(frozen=True)
class CspModes:
    """The CSP switches and tolerances (module docstring), kernel arguments built once from the parameters.

    Tolerances: ``tilt_angle_deg``, ``tilt_axis_deg``, ``tilt_shift_A`` (per tilt), ``particle_shift_A`` and
    ``particle_phi/psi/theta_deg`` (per particle); ``spatial_sigma_px`` (unbinned px) and ``time_sigma``
    (projections) regularise the residuals when ``transreg``."""

    refine_micrographs: bool = False
    refine_particles: bool = False
    frame_refinement: bool = True
    transreg: bool = False
    spatial_sigma_px: float = 500.0
    time_sigma: int = 21
    tilt_angle_deg: float = 1.5
    tilt_axis_deg: float = 1.0
    tilt_shift_A: float = 100.0
    particle_shift_A: float = 20.0
    particle_phi_deg: float = 30.0
    particle_psi_deg: float = 30.0
    particle_theta_deg: float = 30.0

    def __post_init__(self) -> None:
        for name in ("spatial_sigma_px", "tilt_angle_deg", "tilt_axis_deg", "tilt_shift_A", "particle_shift_A",
                     "particle_phi_deg", "particle_psi_deg", "particle_theta_deg"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise CsptInputError(f"is {value!r}", field=name, expected="a finite number >= 0")
        if isinstance(self.time_sigma, bool) or not isinstance(self.time_sigma, int) or self.time_sigma < 0:
            raise CsptInputError(f"is {self.time_sigma!r}", field="csp_time_sigma", expected="an integer >= 0")

    @property
    def constrained(self) -> bool:
        """True when projections follow the model (any of micrographs, particles, transreg)."""
        return self.refine_micrographs or self.refine_particles or self.transreg

    @property
    def euler_range_deg(self) -> tuple[float, float, float]:
        """How far each Euler angle of a particle's local search may move: (phi, theta, psi) tolerances (°)."""
        return (self.particle_phi_deg, self.particle_theta_deg, self.particle_psi_deg)


@dataclass(frozen=True, eq=False)
class CspState:
    """What a constrained run carries from round to round for one tilt series (particles ``particle_id``): the
    current per-tilt ``geometry`` (its angles and axes are the TrackSet's tilt table, its shifts are already in the
    projections' shifts; they go to ``TSHIFT_X/Y``). The particles' points travel in the TrackSet."""

    particle_id: NDArray[np.int64]
    geometry: TiltGeometry


@dataclass(frozen=True, eq=False)
class ConstrainedFit:
    """Result of :func:`solve_constrained`, rows as in the measured TrackSet: ``geometry`` (per tilt), ``xyz_px``
    (P, 3), ``predicted_px`` and ``measured_px`` (N, 2, absolute unbinned px), ``weight`` (N,) robust weight of
    each measurement (0 = not used), ``rms_px`` the weighted RMS length of measured − predicted."""

    geometry: TiltGeometry
    xyz_px: NDArray[np.float64]
    predicted_px: NDArray[np.float64]
    measured_px: NDArray[np.float64]
    weight: NDArray[np.float64]
    rms_px: float

    @property
    def residual_px(self) -> NDArray[np.float64]:
        """Measured − predicted (N, 2)."""
        return self.measured_px - self.predicted_px


def start_constrained(picks: TrackSet) -> tuple[TrackSet, CspState]:
    """The first round's TrackSet and state from the picks (with ``image_shape_yx``): tracks without 3D points
    (the seed's zero-filled coordinates) get each particle's point fitted from its track through the tilt geometry
    (:func:`~napari_cspt2d.recon.trackfit.fit_tracks`, robust); every projection keeps its position. The state's
    geometry is the picks' (no tilt shifts); a resumed run replaces it by its last file's (tilt table and
    ``TSHIFT_X/Y``)."""
    tracks = picks
    if not np.any(picks.particles.xyz_px != 0):
        tracks = picks.with_particle_xyz(fit_tracks(picks).xyz_px, keep_positions=True)
    geo = TiltGeometry.from_tracks(tracks)
    return tracks, CspState(tracks.particles.id.copy(), geo)


def constrained_round(measured: TrackSet, state: CspState, modes: CspModes, *, pixel_A: float,
                      picks_px: ArrayLike | None = None, use: ArrayLike | None = None,
                      point_use: ArrayLike | None = None) -> tuple[TrackSet, CspState, ConstrainedFit]:
    """Solve and place (module docstring, steps 2 and 3) for the measured TrackSet of one tilt series (the
    round's refined projections, with the tilt table and points of the previous round); ``picks_px`` (N, 2),
    ``use`` and ``point_use`` as in :func:`solve_constrained`. Returns the placed TrackSet, the next state and the
    fit."""
    if not np.array_equal(measured.particles.id, state.particle_id):
        raise CsptInputError("has other particles than the run started with", field="measured.particles",
                             expected="the particles of the constrained run's state")
    start = replace(state.geometry, angle_deg=measured.tilts.angle_deg.copy(), axis_deg=measured.tilts.axis_deg.copy())
    fit = solve_constrained(measured, modes, pixel_A=pixel_A, start=start, picks_px=picks_px, use=use,
                            point_use=point_use)
    return place_projections(measured, fit, modes), replace(state, geometry=fit.geometry), fit


def solve_constrained(measured: TrackSet, modes: CspModes, *, pixel_A: float, start: TiltGeometry,
                      picks_px: ArrayLike | None = None, use: ArrayLike | None = None,
                      point_use: ArrayLike | None = None) -> ConstrainedFit:
    """Fit the per-tilt geometry (``csp_refine_micrographs``, within the tolerances around ``start``) and the
    particles' points to the measured positions of ``measured`` (a TrackSet with ``image_shape_yx``; its particles'
    ``xyz_px`` are the current points, in ``start``'s frame): one robust least-squares fit of both.

    The points are then tied to the tracks: each particle's *anchor* is the point its picks ``picks_px`` (N, 2,
    absolute unbinned px, e.g. the user's tracks) give through the solved geometry (a robust fit of the picks;
    without picks: its current point). With ``csp_refine_particles`` the fitted point may lie at most
    ``csp_ToleranceParticlesShifts`` (each coordinate) from its anchor; without, the point is the anchor.
    ``use`` (N,) bool: measurements that count (default all); ``point_use`` (N,) bool: those of them that also fit
    the points (default all: the tilts in the refinement range; the tilts with fewer than 3 such particles are then
    fitted to their ``use`` measurements with the points held); ``pixel_A`` is the tilt-stack pixel."""
    if not (math.isfinite(pixel_A) and pixel_A > 0):
        raise CsptInputError(f"is {pixel_A!r}", field="pixel_A", expected="> 0 Å")
    obs = measured.positions_px()
    used, for_points = (_mask(value, name, len(measured)) for value, name in ((use, "use"), (point_use, "point_use")))
    prow, trow = measured.particle_rows(), measured.tilt_rows()
    tolerance = (modes.tilt_angle_deg, modes.tilt_axis_deg, modes.tilt_shift_A / pixel_A)
    geo, xyz, weight = _bundle_adjust(obs, prow, trow, start, measured.particles.xyz_px, used & for_points,
                                      tolerance if modes.refine_micrographs else None)
    if modes.refine_micrographs:
        geo, resected = _resect(obs, prow, trow, start, geo, xyz, used, ~_solvable(trow, used & for_points, len(
            start.angle_deg)), tolerance)
        weight = np.where(for_points, weight, resected)
    anchor = measured.particles.xyz_px
    if picks_px is not None:
        picks = np.asarray(picks_px, dtype=np.float64)
        if picks.shape != obs.shape:
            raise CsptInputError(f"has shape {picks.shape}", field="picks_px", expected=f"{obs.shape} positions")
        tracked = measured.with_positions(np.arange(len(measured)), picks)
        anchor = fit_tracks(tracked, robust="huber", start=geo).xyz_px
    reach = modes.particle_shift_A / pixel_A
    xyz = np.clip(xyz, anchor - reach, anchor + reach) if modes.refine_particles else anchor
    predicted = geo.predict_px(xyz[prow], trow)
    length2 = np.sum((obs - predicted) ** 2, axis=1)
    counted = weight > 0
    rms = float(np.sqrt(np.average(length2[counted], weights=weight[counted]))) if counted.any() else math.nan
    return ConstrainedFit(geo, np.array(xyz), predicted, obs, weight, rms)


def _mask(value: ArrayLike | None, name: str, n: int) -> NDArray[np.bool_]:
    """A per-measurement boolean mask (n,) from ``value`` (None = all True)."""
    mask = np.ones(n, bool) if value is None else np.asarray(value, dtype=bool).reshape(-1)
    if mask.shape != (n,):
        raise CsptInputError(f"has shape {mask.shape}", field=name, expected=f"({n},) booleans")
    return mask


def _solvable(trow: NDArray, used: NDArray, n_t: int) -> NDArray[np.bool_]:
    """Tilts (n_t,) with enough used measurements to fit their geometry (at least 3 particles)."""
    return np.bincount(trow[used], minlength=n_t) >= _MIN_PARTICLES_PER_TILT


def _resect(obs: NDArray, prow: NDArray, trow: NDArray, start: TiltGeometry, current: TiltGeometry, xyz: NDArray,
            used: NDArray, tilts: NDArray, tolerance: tuple[float, float, float]) -> tuple[TiltGeometry, NDArray]:
    """Fit the angle, axis and shift of the tilts ``tilts`` (T,) bool to their ``used`` measurements with the
    points ``xyz`` (P, 3) held, within ``tolerance`` of ``start`` (robust Gauss-Newton, 4 × 4 per tilt, Huber
    weights as :func:`_bundle_adjust`); returns ``current`` with those tilts fitted and the robust weights (N,) of
    their measurements (0 elsewhere)."""
    rows = used & tilts[trow] & _solvable(trow, used, len(tilts))[trow]
    weight = np.zeros(len(obs))
    if not rows.any():
        return current, weight
    n_t = len(tilts)
    angle, axis, shift = current.angle_deg.copy(), current.axis_deg.copy(), current.shift_px.copy()
    o, p, t = obs[rows], prow[rows], trow[rows]
    for _ in range(_MAX_STEPS):
        design = geometry.tilt_matrices(angle, axis)[t, :2, :]
        residual = o - start.centre_px - shift[t] - np.einsum("nij,nj->ni", design, xyz[p])
        w = _huber(np.hypot(residual[:, 0], residual[:, 1]), np.ones(len(o), bool))
        jq = _tilt_jacobian(angle, axis, t, xyz[p])
        u = _per_group(np.einsum("n,nki,nkj->nij", w, jq, jq), t, n_t)
        b = _per_group(np.einsum("n,nki,nk->ni", w, jq, residual), t, n_t)
        u[:, np.arange(4), np.arange(4)] *= 1.0 + _DAMPING
        step = np.zeros((n_t, 4))
        fitted = np.unique(t)
        step[fitted] = np.linalg.solve(u[fitted] + 1e-12 * np.eye(4), b[fitted][..., None])[..., 0]
        angle = np.clip(angle + np.rad2deg(step[:, 0]), *_box(start.angle_deg, tolerance, 0))
        axis = np.clip(axis + np.rad2deg(step[:, 1]), *_box(start.axis_deg, tolerance, 1))
        shift = np.clip(shift + step[:, 2:], *_box(start.shift_px, tolerance, 2))
        if np.max(np.abs(step[:, 2:])) < _CONVERGED_PX and np.max(np.abs(step[:, :2])) < 1e-6:
            break
    weight[rows] = w
    return replace(current, angle_deg=angle, axis_deg=axis, shift_px=shift), weight


def _bundle_adjust(obs: NDArray, prow: NDArray, trow: NDArray, start: TiltGeometry, xyz0: NDArray, used: NDArray,
                   tolerance: tuple[float, float, float] | None) -> tuple[TiltGeometry, NDArray, NDArray]:
    """Robust Gauss-Newton fit of the points ``X_p`` and, with ``tolerance`` = (angle °, axis °, shift px), of each
    tilt's angle, axis and shift within that box around ``start``; returns the geometry, the points (P, 3) and
    the final robust weights (N,).

    Each step solves the normal equations by the Schur complement on the points (3 × 3 blocks), leaving a dense
    system of 4 unknowns per tilt, damped by 1e-3 × its diagonal (Levenberg-Marquardt): directions no measurement
    can tell (a common translation of the points against the tilts' shifts) keep their starting values. The
    reference tilt (smallest |angle|) keeps its tilt angle, which fixes the common turn of the points about the
    tilt axis against all tilt angles (as in :mod:`~napari_cspt2d.recon.trackfit`). Tilts with fewer than 3
    measured particles keep their parameters. Weights: Huber's on the residual lengths,
    ``k = 2 sigma``, ``sigma = median |r| / sqrt(2 ln 2)`` (as :func:`~napari_cspt2d.recon.trackfit.fit_tracks`)."""
    n_p, n_t = len(xyz0), len(start.angle_deg)
    angle, axis, shift = start.angle_deg.copy(), start.axis_deg.copy(), start.shift_px.copy()
    xyz = np.array(xyz0, dtype=np.float64)
    free = _solvable(trow, used, n_t)
    reference = int(np.argmin(np.where(free, np.abs(start.angle_deg), np.inf)))
    weight = used.astype(np.float64)
    for _ in range(_MAX_STEPS):
        design = geometry.tilt_matrices(angle, axis)[trow, :2, :]  # (N, 2, 3)
        residual = obs - start.centre_px - shift[trow] - np.einsum("nij,nj->ni", design, xyz[prow])
        weight = _huber(np.hypot(residual[:, 0], residual[:, 1]), used)
        v = _per_group(np.einsum("n,nki,nkj->nij", weight, design, design), prow, n_p)  # (P, 3, 3)
        v += (1e-6 * np.einsum("pii->p", v) + 1e-12)[:, None, None] * np.eye(3)
        v_inv = np.linalg.inv(v)
        b_x = _per_group(np.einsum("n,nki,nk->ni", weight, design, residual), prow, n_p)  # (P, 3)
        if tolerance is None:
            step_x, step_q = np.einsum("pij,pj->pi", v_inv, b_x), np.zeros((n_t, 4))
        else:
            jq = _tilt_jacobian(angle, axis, trow, xyz[prow])  # (N, 2, 4)
            u = _per_group(np.einsum("n,nki,nkj->nij", weight, jq, jq), trow, n_t)  # (T, 4, 4)
            b_q = _per_group(np.einsum("n,nki,nk->ni", weight, jq, residual), trow, n_t)  # (T, 4)
            cross = np.zeros((n_p, n_t, 4, 3))
            cross[prow, trow] = np.einsum("n,nki,nkj->nij", weight, jq, design)  # one projection per pair
            cv = np.einsum("ptai,pij->ptaj", cross, v_inv)
            schur = np.zeros((n_t, 4, n_t, 4))
            schur[np.arange(n_t), :, np.arange(n_t), :] = u
            flat_cv = cv.transpose(1, 2, 0, 3).reshape(4 * n_t, 3 * n_p)
            flat_cross = cross.transpose(1, 2, 0, 3).reshape(4 * n_t, 3 * n_p)
            schur = schur.reshape(4 * n_t, 4 * n_t) - flat_cv @ flat_cross.T
            rhs = b_q.reshape(-1) - flat_cv @ b_x.reshape(-1)
            keep = np.repeat(free, 4)
            keep[4 * reference] = False  # the reference tilt's angle fixes the turn about the tilt axis
            schur[np.diag_indices_from(schur)] *= 1.0 + _DAMPING
            step_q = np.zeros(4 * n_t)
            step_q[keep] = np.linalg.solve(schur[np.ix_(keep, keep)] + 1e-12 * np.eye(keep.sum()), rhs[keep])
            step_q = step_q.reshape(n_t, 4)
            step_x = np.einsum("pij,pj->pi", v_inv, b_x - np.einsum("ptai,ta->pi", cross, step_q))
        xyz += step_x
        angle = np.clip(angle + np.rad2deg(step_q[:, 0]), *_box(start.angle_deg, tolerance, 0))
        axis = np.clip(axis + np.rad2deg(step_q[:, 1]), *_box(start.axis_deg, tolerance, 1))
        shift = np.clip(shift + step_q[:, 2:], *_box(start.shift_px, tolerance, 2))
        if np.max(np.abs(step_x), initial=0.0) < _CONVERGED_PX and np.max(np.abs(step_q), initial=0.0) < 1e-6:
            break
    return replace(start, angle_deg=angle, axis_deg=axis, shift_px=shift), xyz, weight


def _box(centre: NDArray, tolerance: tuple[float, float, float] | None, k: int) -> tuple[NDArray, NDArray]:
    reach = 0.0 if tolerance is None else tolerance[k]
    return centre - reach, centre + reach


def _tilt_jacobian(angle_deg: NDArray, axis_deg: NDArray, tilt_rows: NDArray, xyz: NDArray) -> NDArray[np.float64]:
    """Derivatives (N, 2, 4) of the projected positions of points ``xyz`` (N, 3) in tilts ``tilt_rows`` by the
    tilt angle and axis (per radian) and the shift."""
    d_tilt = geometry.rotation_y(angle_deg + 90.0)  # d R_y / d angle: y unchanged
    d_tilt[:, 1, 1] = 0.0
    by_angle = (geometry.rotation_z(axis_deg) @ d_tilt)[tilt_rows, :2, :]
    by_axis = geometry.tilt_matrices(angle_deg, axis_deg + 90.0)[tilt_rows, :2, :]
    out = np.zeros((len(xyz), 2, 4))
    out[:, :, 0] = np.einsum("nij,nj->ni", by_angle, xyz)
    out[:, :, 1] = np.einsum("nij,nj->ni", by_axis, xyz)
    out[:, 0, 2] = out[:, 1, 3] = 1.0
    return out


def _per_group(values: NDArray, group: NDArray, n: int) -> NDArray[np.float64]:
    """Sums of ``values`` (N, ...) per group (N,) → (n, ...)."""
    flat = values.reshape(len(values), -1)
    out = np.stack([np.bincount(group, flat[:, k], n) for k in range(flat.shape[1])], axis=1)
    return out.reshape((n,) + values.shape[1:])


def _huber(length: NDArray, used: NDArray) -> NDArray[np.float64]:
    """Huber weights of residual lengths (0 where not ``used``), scale from their median."""
    if not used.any():
        return np.zeros_like(length)
    scale = float(np.median(length[used])) / _RAYLEIGH_MEDIAN
    k = _HUBER_K * max(scale, 1e-9)
    return np.where(used, np.minimum(1.0, k / np.maximum(length, 1e-300)), 0.0)


def regularize_residuals(residual_px: ArrayLike, particle_rows: ArrayLike, tilt_rows: ArrayLike, order: ArrayLike,
                         xyz_px: ArrayLike, *, spatial_sigma_px: float, time_sigma: int,
                         weight: ArrayLike | None = None) -> NDArray[np.float64]:
    """pyp's ``csp_transreg`` on per-projection residuals (N, 2): spatial average over the particles of the same
    tilt, then time smoothing along each particle's projections in acquisition ``order`` (N,) (module docstring).

    ``particle_rows``/``tilt_rows`` (N,) index ``xyz_px`` (P, 3, unbinned px) and the tilts; ``weight`` (N,)
    marks the residuals that may be averaged in (> 0; default all). A residual that is not averaged in still gets
    its neighbours' average. Returns the regularised residuals (N, 2)."""
    r = np.asarray(residual_px, dtype=np.float64).reshape(-1, 2)
    prow = np.asarray(particle_rows, dtype=np.int64).reshape(-1)
    trow = np.asarray(tilt_rows, dtype=np.int64).reshape(-1)
    acq = np.asarray(order, dtype=np.float64).reshape(-1)
    xyz = np.asarray(xyz_px, dtype=np.float64).reshape(-1, 3)
    ok = np.ones(len(r), bool) if weight is None else np.asarray(weight, dtype=np.float64).reshape(-1) > 0
    if not (len(prow) == len(trow) == len(acq) == len(ok) == len(r)):
        raise CsptInputError("have different lengths", field="residual_px/particle_rows/tilt_rows/order",
                             expected="one value per projection")
    if not (math.isfinite(spatial_sigma_px) and spatial_sigma_px >= 0):
        raise CsptInputError(f"is {spatial_sigma_px!r}", field="csp_spatial_sigma", expected=">= 0 px")
    out = _spatial_average(r, prow, trow, xyz, spatial_sigma_px, ok) if spatial_sigma_px > 0 else r.copy()
    if time_sigma > 0:
        out = _time_smooth(out, prow, acq, time_sigma)
    return out


def _spatial_sigmas(xyz: NDArray, sigma: float) -> NDArray[np.float64]:
    """Each particle's sigma: ``sigma`` grown by 1.25× until 5 particles (itself included) lie within 2 sigma
    (pyp grows it only when there are more than 5 particles)."""
    sigmas = np.full(len(xyz), float(sigma))
    if len(xyz) <= _MIN_NEIGHBOURS:
        return sigmas
    kth = scipy.spatial.cKDTree(xyz).query(xyz, k=_MIN_NEIGHBOURS)[0][:, -1]  # 5th nearest, itself first
    while np.any(grow := kth >= 2.0 * sigmas):
        sigmas[grow] *= _SIGMA_GROWTH
    return sigmas


def _spatial_average(r: NDArray, prow: NDArray, trow: NDArray, xyz: NDArray, sigma: float, ok: NDArray) -> NDArray:
    """Weighted mean of the residuals of each tilt's particles, ``exp(-d / sigma_i)``. The weights do not depend
    on the tilt, so each block of particles' weights is made once and applied to every tilt by one product; they
    are long-tailed, so every particle of the tilt counts, as in pyp."""
    sigmas = _spatial_sigmas(xyz, sigma)
    n_p, n_t = len(xyz), int(trow.max()) + 1 if trow.size else 0
    values = np.zeros((n_p, n_t, 2))
    present = np.zeros((n_p, n_t))
    values[prow[ok], trow[ok]] = r[ok]
    present[prow[ok], trow[ok]] = 1.0
    total = np.zeros((n_p, n_t, 2))
    norm = np.zeros((n_p, n_t))
    for block in np.array_split(np.arange(n_p), max(1, -(-n_p // _CHUNK))):
        w = np.exp(-scipy.spatial.distance.cdist(xyz[block], xyz) / sigmas[block][:, None])
        total[block] = (w @ values.reshape(n_p, -1)).reshape(len(block), n_t, 2)
        norm[block] = w @ present
    has = norm[prow, trow] > 0
    out = r.copy()
    out[has] = total[prow, trow][has] / norm[prow, trow][has][:, None]
    return out


def _time_smooth(r: NDArray, prow: NDArray, acq: NDArray, time_sigma: int) -> NDArray:
    """pyp's AB rule per particle: median of 3, then a normalised Bartlett window of ``time_sigma`` points."""
    window = np.bartlett(time_sigma)
    window = window / window.sum() if window.sum() > 0 else np.ones(1)
    out = r.copy()
    order = np.lexsort((acq, prow))
    starts = np.flatnonzero(np.r_[True, prow[order][1:] != prow[order][:-1]])
    for a, b in zip(starts, np.r_[starts[1:], len(order)]):
        rows = order[a:b]
        for k in range(2):
            median = scipy.ndimage.median_filter(r[rows, k], size=3, mode="nearest")
            out[rows, k] = scipy.ndimage.convolve1d(median, window, mode="nearest")
    return out


def place_projections(tracks: TrackSet, fit: ConstrainedFit, modes: CspModes) -> TrackSet:
    """``tracks`` (the measured TrackSet of ``fit``) with the model put in: the solved tilt angles and axes in its
    tilt table, the particles' points, and every projection at prediction + residual by the per-projection rule
    (module docstring). Per-tilt shifts and residuals end up in the projections' shifts."""
    if len(tracks) != len(fit.predicted_px):
        raise CsptInputError(f"has {len(tracks)} projections, the fit {len(fit.predicted_px)}", field="tracks",
                             expected="the measured TrackSet of the fit")
    if not modes.frame_refinement:
        residual = np.zeros_like(fit.predicted_px)
    elif modes.transreg:
        residual = regularize_residuals(fit.residual_px, tracks.particle_rows(), tracks.tilt_rows(),
                                        tracks.tilts.order[tracks.tilt_rows()], fit.xyz_px,
                                        spatial_sigma_px=modes.spatial_sigma_px, time_sigma=modes.time_sigma,
                                        weight=fit.weight)
    else:
        residual = fit.residual_px
    geo = fit.geometry
    moved = tracks.replace(
        tilts=replace(tracks.tilts, angle_deg=geo.angle_deg.copy(), axis_deg=geo.axis_deg.copy()),
        particles=replace(tracks.particles, xyz_px=fit.xyz_px.copy()),
    )
    return moved.with_positions(np.arange(len(tracks)), fit.predicted_px + residual)
