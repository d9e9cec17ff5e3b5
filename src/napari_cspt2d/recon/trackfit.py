"""3D positions from 2D tracks: per-particle least squares, optional global refinement of the tilt geometry.

Model (all through :mod:`napari_cspt2d.geometry`)
-------------------------------------------------------
The observed position ``o`` (unbinned px, numpy pixel centres) of particle ``p`` in tilt ``t`` is predicted as::

    o_hat = centre + s_t + m_t * [R_z(axis_t) @ R_y(angle_t) @ X_p]_xy

``X_p`` is the particle's 3D point relative to the tomogram centre (unbinned px), ``centre`` the image centre
``((nx-1)/2, (ny-1)/2)``, ``s_t`` a per-tilt image shift (px), ``m_t`` a per-tilt magnification and ``axis_t`` the
in-plane rotation (tilt-axis angle, degrees CCW from the image y axis). Without refinement ``s_t = 0``, ``m_t = 1``
and angle/axis are the TrackSet's; then each ``X_p`` is a 3-unknown linear least-squares problem, solved for all
particles at once from batched 3x3 normal equations.

Residuals are ``o_hat - o`` (**projected minus observed**, IMOD's sign), per projection, in px. ``mean_residual_px``
is the mean residual length (IMOD tiltalign's "residual error mean"), ``rms_px`` the root mean square length.

Global refinement (``refine=``, like IMOD tiltalign with beads) solves the particles' 3D points jointly with
``"axis"`` (one tilt-axis correction for all tilts), ``"rotation"`` (a rotation per tilt), ``"shift"`` (``s_t``),
``"mag"`` (``m_t``) and ``"tilt"`` (the tilt angles) with :func:`scipy.optimize.least_squares` and an analytic sparse
Jacobian. The reference tilt (smallest ``|angle|``) keeps its shift, magnification and angle, which fixes the
translation, scale and tilt-offset ambiguities; with shifts refined the particles' mean height along the beam in the
reference tilt is also held at its starting value (the remaining translation ambiguity). Tilts seen by fewer than
three particles keep their starting parameters. A particle seen at fewer than two distinct tilt angles has no defined
height; it gets ``Z = 0`` in the reference frame's plane (a small ridge) and ``determined = False``.

Robust weighting: iteratively reweighted least squares on the residual *lengths* ``|r|``. The scale is
``sigma = median|r| / sqrt(2 ln 2)`` (the per-component standard deviation for Gaussian noise) unless ``scale_px`` is
given; Huber weights ``min(1, k/|r|)`` with ``k = 2 sigma``, Tukey biweights ``(1 - (|r|/c)^2)^2`` with
``c = 4.685 sigma`` (0 beyond ``c``). Each reweighting step is a weighted least-squares solve.

Conventions when comparing with IMOD (validated on the BB and midzone2 bead sets in ``tests/test_trackfit.py``)
----------------------------------------------------------------------------------------------------------------
* Origin: IMOD model coordinates have the origin at the pixel corner; ``numpy = imod - 0.5``. IMOD's image centre
  ``nx/2`` is our ``(nx-1)/2``, so positions relative to the centre are identical.
* ``fid.xyz``: X, Y are IMOD coordinates in the aligned frame, Z is already relative to the centre; our ``xyz_px`` is
  ``(X - nx/2, Y - ny/2, Z)``. Tracks mapped through ``.tltxf`` into the aligned frame (axis 0, no shifts) and
  fitted without refinement give IMOD's points directly: median 3D difference 0.08 px (BB) and 0.10 px (midzone2),
  mean residual 0.325 vs 0.313 px and 0.666 vs 0.644 px (tiltalign's, from its ``.resid``).
* From the prealigned tracks with ``refine`` (rotation, shift, mag; + tilt for midzone2) the mean residual is again
  within 6 % of tiltalign's, and the bead constellation equals IMOD's up to a global affine map within 2 % of the
  identity (0.005 px after that map): a 0.5-1.2 % scale (our reference tilt has magnification 1, tiltalign normalises
  differently), a few tenths of a degree of rotation about Z and a comparable skew, which tracks hardly determine
  (tiltalign also solves distortion terms). IMOD fixes the beads' mean Z at 0; our translation gauge differs (above).
* Axis and hand: tiltalign's projection ``x = X cos(t) + Z sin(t)`` is our ``R_y`` (same hand, same tilt sign). The
  ``.tltxf`` transform ``A`` maps prealigned to aligned coordinates about the centre, so the prealigned frame is
  ``m_t R_z(axis_t) = A^-1`` and ``s_t = -A^-1 d``; the fitted ``axis_t`` therefore equals minus the rotation angle
  of ``A`` (about -11 deg for BB). ``axis`` and ``axis + 180`` (with all of ``X`` negated) fit tracks equally well:
  that is the hand ambiguity, which tracks alone cannot resolve.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import scipy.optimize
import scipy.sparse
from numpy.typing import ArrayLike, NDArray

from ..errors import CsptInputError
from ..model.tracks import TrackSet
from .. import geometry
from . import ctf

__all__ = [
    "REFINABLE",
    "TiltGeometry",
    "TrackFit",
    "solve_points",
    "estimate_axis_deg",
    "fit_tracks",
    "apply_fit",
    "fill_missing",
    "missing_pairs",
    "defocus_offset_um",
]

REFINABLE = ("axis", "rotation", "shift", "mag", "tilt")
Robust = Literal["none", "huber", "tukey"]
_HUBER_K = 2.0
_TUKEY_C = 4.685
_RAYLEIGH_MEDIAN = float(np.sqrt(2.0 * np.log(2.0)))
_MIN_PARTICLES_PER_TILT = 3


@dataclass(frozen=True, eq=False)
class TiltGeometry:
    """Per-tilt projection parameters (T rows, in tilt-table order): ``angle_deg``, ``axis_deg``, ``shift_px``
    (T, 2), ``mag`` (T,), and the image centre ``centre_px`` (x, y). See the module docstring for the model."""

    angle_deg: NDArray[np.float64]
    axis_deg: NDArray[np.float64]
    shift_px: NDArray[np.float64]
    mag: NDArray[np.float64]
    centre_px: NDArray[np.float64]

    @classmethod
    def from_tracks(cls, tracks: TrackSet) -> TiltGeometry:
        """The TrackSet's angles and axes, no shift, unit magnification."""
        n = tracks.n_tilts
        return cls(tracks.tilts.angle_deg.copy(), tracks.tilts.axis_deg.copy(), np.zeros((n, 2)), np.ones(n),
                   geometry.image_center_px(tracks._require_shape()))

    def predict_px(self, xyz_px: ArrayLike, tilt_rows: ArrayLike) -> NDArray[np.float64]:
        """Absolute image positions ``(M, 2)`` of 3D points ``(M, 3)`` in tilts ``tilt_rows`` ``(M,)``."""
        t = np.asarray(tilt_rows, dtype=np.int64)
        proj = geometry.project_points(xyz_px, self.angle_deg[t], self.axis_deg[t])[:, :2]
        return self.centre_px + self.shift_px[t] + self.mag[t][:, None] * proj

    def design(self, tilt_rows: NDArray[np.int64]) -> NDArray[np.float64]:
        """Per-observation 2x3 matrices ``m R_z(axis) R_y(angle)`` restricted to x, y: shape (N, 2, 3)."""
        t = tilt_rows
        return self.mag[t][:, None, None] * geometry.tilt_matrices(self.angle_deg[t], self.axis_deg[t])[:, :2, :]


@dataclass(frozen=True, eq=False)
class TrackFit:
    """Result of :func:`fit_tracks`. Rows of per-projection arrays follow the fitted TrackSet's rows.

    Per particle (P, in ``particle_id`` order): ``xyz_px`` (P, 3) relative to the tomogram centre,
    ``n_used`` (P,) projections that entered the fit, ``determined`` (P,) seen at >= 2 distinct tilt angles,
    ``particle_mean_residual_px`` (P,) (NaN without projections).
    Per tilt (T, in ``tilt_id`` order): ``geometry`` (fitted :class:`TiltGeometry`), ``tilt_mean_residual_px`` (T,)
    (NaN without projections).
    Per projection (N): ``residual_px`` (N, 2) projected minus observed, ``weight`` (N,) robust weight in [0, 1]
    (0 for projections left out with ``use``).
    Summary: ``mean_residual_px`` (mean length over used projections), ``rms_px`` (rms length), ``scale_px`` (robust
    scale), ``refined`` and ``robust`` as requested, ``reference_tilt`` (id)."""

    particle_id: NDArray[np.int64]
    xyz_px: NDArray[np.float64]
    n_used: NDArray[np.int64]
    determined: NDArray[np.bool_]
    particle_mean_residual_px: NDArray[np.float64]
    tilt_id: NDArray[np.int64]
    geometry: TiltGeometry
    tilt_mean_residual_px: NDArray[np.float64]
    residual_px: NDArray[np.float64]
    weight: NDArray[np.float64]
    mean_residual_px: float
    rms_px: float
    scale_px: float
    refined: tuple[str, ...]
    robust: str
    reference_tilt: int

    def predict_px(self, particle_id: ArrayLike, tilt_id: ArrayLike) -> NDArray[np.float64]:
        """Predicted absolute image positions ``(M, 2)`` (x, y, px) of particles in tilts (both ``(M,)`` ids)."""
        prow = _rows_of(self.particle_id, particle_id, "particle_id")
        trow = _rows_of(self.tilt_id, tilt_id, "tilt_id")
        return self.geometry.predict_px(self.xyz_px[prow], trow)


def _rows_of(ids: NDArray[np.int64], wanted: ArrayLike, name: str) -> NDArray[np.int64]:
    wanted = np.atleast_1d(np.asarray(wanted, dtype=np.int64))
    rows = np.clip(np.searchsorted(ids, wanted), 0, max(len(ids) - 1, 0))
    if len(ids) == 0 or np.any(ids[rows] != wanted):
        raise CsptInputError("contains ids the fit does not know", field=name, expected="ids of the fitted TrackSet")
    return rows


# ---------------------------------------------------------------------------------------------- linear 3D solve
def solve_points(
    geo: TiltGeometry,
    tilt_rows: ArrayLike,
    position_px: ArrayLike,
    particle_rows: ArrayLike,
    n_particles: int,
    *,
    weight: ArrayLike | None = None,
    fallback_xyz: ArrayLike | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Weighted least-squares 3D point of every particle from its observed positions, all particles at once.

    Observations: ``position_px`` (N, 2) absolute, in tilts ``tilt_rows`` (N,) of ``geo``, of particles
    ``particle_rows`` (N,) in ``[0, n_particles)``. Returns ``xyz`` (P, 3) and ``determined`` (P,): seen at two
    tilt angles >= 0.5 deg apart; others get ``Z = 0`` (a small ridge), particles without observations keep
    ``fallback_xyz`` (default 0)."""
    t = np.asarray(tilt_rows, dtype=np.int64)
    prow = np.asarray(particle_rows, dtype=np.int64)
    w = np.ones(len(t)) if weight is None else np.asarray(weight, dtype=np.float64)
    fallback = np.zeros((n_particles, 3)) if fallback_xyz is None else np.asarray(fallback_xyz, dtype=np.float64)
    design = geo.design(t)
    rhs = np.asarray(position_px, dtype=np.float64) - geo.centre_px - geo.shift_px[t]
    wg = design * w[:, None, None]
    normal = np.einsum("nki,nkj->nij", wg, design).reshape(-1, 9)
    vec = np.einsum("nki,nk->ni", wg, rhs)
    a = np.stack([np.bincount(prow, normal[:, k], n_particles) for k in range(9)], axis=1).reshape(-1, 3, 3)
    b = np.stack([np.bincount(prow, vec[:, k], n_particles) for k in range(3)], axis=1)
    seen = w > 0
    determined = _determined(prow[seen], geo.angle_deg[t[seen]], n_particles)
    trace = np.einsum("pii->p", a)
    empty = trace <= 0
    a[empty] = np.eye(3)
    b[empty] = fallback[empty]
    a[:, 2, 2] += np.where(determined | empty, 0.0, 1e-6 * trace)
    return np.linalg.solve(a, b[..., None])[..., 0], determined


def _determined(prow: NDArray, angle: NDArray, n_particles: int) -> NDArray[np.bool_]:
    """Particles seen at two or more tilt angles at least 0.5 deg apart."""
    lo = np.full(n_particles, np.inf)
    hi = np.full(n_particles, -np.inf)
    np.minimum.at(lo, prow, angle)
    np.maximum.at(hi, prow, angle)
    return (hi - lo) >= 0.5


def _robust_weights(length: NDArray, robust: str, scale: float) -> NDArray[np.float64]:
    if robust == "none" or scale <= 0:
        return np.ones_like(length)
    if robust == "huber":
        k = _HUBER_K * scale
        return np.minimum(1.0, k / np.maximum(length, 1e-300))
    c = _TUKEY_C * scale
    return np.where(length < c, (1.0 - (length / c) ** 2) ** 2, 0.0)


# ---------------------------------------------------------------------------------------------- global refinement
@dataclass(frozen=True, eq=False)
class _Problem:
    """The joint refinement of determined particles' 3D points and the tilt geometry. Parameters are increments
    from ``start`` (radians for angles, log for magnification) so every refinement starts at zero."""

    obs: NDArray  # (n, 2) absolute positions
    prow: NDArray  # (n,) rows among the refined particles
    trow: NDArray  # (n,) tilt rows
    n_particles: int
    start: TiltGeometry
    free_tilts: NDArray  # tilt rows with enough particles for per-tilt parameters
    ref: int  # reference tilt row: keeps shift, magnification and angle
    refine: frozenset[str]
    height0: float  # mean height in the reference tilt, held when shifts are refined

    @property
    def non_ref(self) -> NDArray:
        return self.free_tilts[self.free_tilts != self.ref]

    def layout(self) -> dict[str, slice]:
        sizes = {"xyz": 3 * self.n_particles}
        if "rotation" in self.refine:
            sizes["rotation"] = len(self.free_tilts)
        elif "axis" in self.refine:
            sizes["axis"] = 1
        for key, width in (("shift", 2), ("mag", 1), ("tilt", 1)):
            if key in self.refine:
                sizes[key] = width * len(self.non_ref)
        out, start = {}, 0
        for key, size in sizes.items():
            out[key] = slice(start, start + size)
            start += size
        return out

    def unpack(self, x: NDArray) -> tuple[NDArray, TiltGeometry]:
        lay, g = self.layout(), self.start
        angle, axis, shift, mag = g.angle_deg.copy(), g.axis_deg.copy(), g.shift_px.copy(), g.mag.copy()
        if "axis" in lay:
            axis += np.rad2deg(x[lay["axis"]][0])
        if "rotation" in lay:
            axis[self.free_tilts] += np.rad2deg(x[lay["rotation"]])
        if "shift" in lay:
            shift[self.non_ref] += x[lay["shift"]].reshape(-1, 2)
        if "mag" in lay:
            mag[self.non_ref] *= np.exp(x[lay["mag"]])
        if "tilt" in lay:
            angle[self.non_ref] += np.rad2deg(x[lay["tilt"]])
        return x[lay["xyz"]].reshape(-1, 3), TiltGeometry(angle, axis, shift, mag, g.centre_px)

    def residuals(self, x: NDArray, sqrt_w: NDArray) -> NDArray:
        xyz, geo = self.unpack(x)
        r = ((geo.predict_px(xyz[self.prow], self.trow) - self.obs) * sqrt_w[:, None]).reshape(-1)
        if "shift" in self.refine:
            heights = geometry.project_points(xyz, geo.angle_deg[self.ref])[:, 2]
            r = np.append(r, (heights.mean() - self.height0) * np.sqrt(self.n_particles))
        return r

    def jacobian(self, x: NDArray, sqrt_w: NDArray) -> scipy.sparse.csr_matrix:
        """Analytic sparse Jacobian of :meth:`residuals`."""
        lay = self.layout()
        xyz, geo = self.unpack(x)
        n, p, t = len(self.obs), self.prow, self.trow
        m = geo.mag[t][:, None]
        pts = xyz[p]
        angle, axis = geo.angle_deg[t], geo.axis_deg[t]
        rows2 = np.arange(2 * n).reshape(n, 2)
        parts_r, parts_c, parts_v = [], [], []

        def add(cols: NDArray, values: NDArray, keep: NDArray | slice = slice(None)) -> None:
            """values (n', 2, k) of observations ``keep`` against columns (n', k)."""
            k = cols.shape[1]
            parts_r.append(np.repeat(rows2[keep][:, :, None], k, axis=2).reshape(-1))
            parts_c.append(np.repeat(cols[:, None, :], 2, axis=1).reshape(-1))
            parts_v.append((values * sqrt_w[keep][:, None, None]).reshape(-1))

        def add_per_tilt(key: str, tilt_rows: NDArray, width: int, values: NDArray) -> None:
            """values (n, 2, width) against the ``width`` columns of each observation's tilt in block ``key``."""
            first = np.full(len(geo.angle_deg), -1)
            first[tilt_rows] = lay[key].start + width * np.arange(len(tilt_rows))
            cols = first[t]
            keep = cols >= 0
            if keep.any():
                add(cols[keep, None] + np.arange(width), values[keep], keep)

        add(lay["xyz"].start + 3 * p[:, None] + np.arange(3), geo.design(t))
        if "axis" in lay or "rotation" in lay:
            d_rot = m * (geometry.tilt_matrices(angle, axis + 90.0) @ pts[..., None])[:, :2, 0]
            if "axis" in lay:
                add(np.full((n, 1), lay["axis"].start), d_rot[:, :, None])
            else:
                add_per_tilt("rotation", self.free_tilts, 1, d_rot[:, :, None])
        if "shift" in lay:
            add_per_tilt("shift", self.non_ref, 2, np.broadcast_to(np.eye(2), (n, 2, 2)))
        if "mag" in lay:
            q = geometry.project_points(pts, angle, axis)[:, :2]
            add_per_tilt("mag", self.non_ref, 1, (m * q)[:, :, None])
        if "tilt" in lay:
            d_ry = geometry.rotation_y(angle + 90.0) @ pts[..., None]
            d_ry[:, 1] = 0.0  # d/dtheta of R_y leaves y unchanged
            add_per_tilt("tilt", self.non_ref, 1, (m * (geometry.rotation_z(axis) @ d_ry)[:, :2, 0])[:, :, None])
        n_rows = 2 * n
        if "shift" in self.refine:
            grad = geometry.rotation_y(geo.angle_deg[self.ref])[2] / np.sqrt(self.n_particles)
            parts_r.append(np.full(3 * self.n_particles, n_rows))
            parts_c.append(lay["xyz"].start + np.arange(3 * self.n_particles))
            parts_v.append(np.tile(grad, self.n_particles))
            n_rows += 1
        shape = (n_rows, max(s.stop for s in lay.values()))
        return scipy.sparse.csr_matrix(
            (np.concatenate(parts_v), (np.concatenate(parts_r), np.concatenate(parts_c))), shape=shape
        )

    def solve(self, xyz0: NDArray, weight: NDArray, max_nfev: int) -> tuple[NDArray, TiltGeometry]:
        lay = self.layout()
        x0 = np.zeros(max(s.stop for s in lay.values()))
        x0[lay["xyz"]] = xyz0.reshape(-1)
        result = scipy.optimize.least_squares(
            self.residuals, x0, jac=self.jacobian, args=(np.sqrt(weight),), method="trf", x_scale="jac",
            tr_solver="lsmr", max_nfev=max_nfev, xtol=1e-10, ftol=1e-10, gtol=1e-10,
        )
        return self.unpack(result.x)


# ---------------------------------------------------------------------------------------------- public API
def _use_mask(tracks: TrackSet, use: ArrayLike | None) -> NDArray[np.bool_]:
    n = len(tracks)
    if use is None:
        return np.ones(n, bool)
    use = np.asarray(use)
    if use.dtype == bool:
        if use.shape != (n,):
            raise CsptInputError(f"has shape {use.shape}", field="use", expected=f"a boolean mask of shape ({n},)")
        return use.copy()
    mask = np.zeros(n, bool)
    idx = use.astype(np.int64).reshape(-1)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise CsptInputError("has row indices out of range", field="use", expected=f"rows in [0, {n})")
    mask[idx] = True
    return mask


def _check_refine(refine: Iterable[str]) -> frozenset[str]:
    chosen = frozenset([refine] if isinstance(refine, str) else refine)
    unknown = chosen - set(REFINABLE)
    if unknown:
        raise CsptInputError(f"has unknown entries {sorted(unknown)}", field="refine", expected=f"any of {REFINABLE}")
    return chosen


def estimate_axis_deg(tracks: TrackSet, *, step_deg: float = 1.0, use: ArrayLike | None = None,
                      max_particles: int = 500) -> float:
    """Tilt-axis angle (degrees, in (-90, 90]) common to all tilts that best explains the tracks.

    A grid search (``step_deg``) of per-particle linear fits, then a parabolic refinement of the best step; at most
    ``max_particles`` particles (evenly spaced) are used. Tracks cannot tell ``axis`` from ``axis + 180`` (the
    hand); the TrackSet's own axis values are ignored."""
    if not (np.isfinite(step_deg) and 0 < step_deg <= 45):
        raise CsptInputError(f"is {step_deg}", field="step_deg", expected="0 < step <= 45 degrees")
    used = _use_mask(tracks, use)
    keep_particles = tracks.particles.id[:: max(1, -(-tracks.n_particles // max_particles))]
    used &= np.isin(tracks.particle, keep_particles)
    obs = tracks.positions_px()[used]
    prow, trow = tracks.particle_rows()[used], tracks.tilt_rows()[used]
    base = TiltGeometry.from_tracks(tracks)
    candidates = np.arange(-90.0 + step_deg, 90.0 + 1e-9, step_deg)

    def cost(axis_deg: float) -> float:
        geo = replace(base, axis_deg=np.full(tracks.n_tilts, axis_deg))
        xyz, _ = solve_points(geo, trow, obs, prow, tracks.n_particles)
        return float(np.sum((geo.predict_px(xyz[prow], trow) - obs) ** 2))

    costs = np.array([cost(a) for a in candidates])
    best = int(np.argmin(costs))
    lo, mid, hi = (costs[(best + k) % len(costs)] for k in (-1, 0, 1))
    denom = lo - 2 * mid + hi
    offset = 0.5 * (lo - hi) / denom if denom > 0 else 0.0
    axis = candidates[best] + float(np.clip(offset, -0.5, 0.5)) * step_deg
    return float(-((90.0 - axis) % 180.0 - 90.0))  # wrapped into (-90, 90]


def fit_tracks(
    tracks: TrackSet,
    *,
    refine: Iterable[str] = (),
    robust: Robust = "huber",
    scale_px: float | None = None,
    use: ArrayLike | None = None,
    axis_search: bool = False,
    max_reweight: int = 8,
    max_nfev: int = 200,
    start: TiltGeometry | None = None,
) -> TrackFit:
    """Fit every particle's 3D point (and, with ``refine``, the tilt geometry) to its 2D track.

    ``tracks`` needs ``image_shape_yx``. ``refine`` is any subset of :data:`REFINABLE` (see the module docstring),
    ``robust`` the weighting (``"none"``, ``"huber"``, ``"tukey"``), ``scale_px`` a fixed robust scale (px; default:
    estimated from the residuals), ``use`` a boolean mask or row indices of the projections that enter the fit (the
    others still get residuals, with weight 0). ``axis_search`` first replaces every tilt's axis by
    :func:`estimate_axis_deg` (for tracks whose axis is unknown). ``start`` is the geometry to start from (default:
    the TrackSet's angles and axes, no shift, unit magnification; without ``refine`` the points are fitted through
    it). Returns a :class:`TrackFit`."""
    if robust not in ("none", "huber", "tukey"):
        raise CsptInputError(f"is {robust!r}", field="robust", expected="'none', 'huber' or 'tukey'")
    if scale_px is not None and not (np.isfinite(scale_px) and scale_px > 0):
        raise CsptInputError(f"is {scale_px}", field="scale_px", expected="> 0 px")
    chosen = _check_refine(refine)
    used = _use_mask(tracks, use)
    if not used.any():
        raise CsptInputError("selects no projection", field="use", expected="at least one projection to fit")
    obs = tracks.positions_px()
    prow, trow = tracks.particle_rows(), tracks.tilt_rows()
    n_p, n_t = tracks.n_particles, tracks.n_tilts
    geo = TiltGeometry.from_tracks(tracks) if start is None else start
    if axis_search:
        geo = replace(geo, axis_deg=np.full(n_t, estimate_axis_deg(tracks, use=used)))
    seen_tilts = np.bincount(trow[used], minlength=n_t) > 0
    ref = int(np.argmin(np.where(seen_tilts, np.abs(geo.angle_deg), np.inf)))
    weight = used.astype(np.float64)

    def solve(xyz_start: NDArray, g: TiltGeometry) -> tuple[NDArray, NDArray, NDArray, NDArray]:
        xyz_new, det = solve_points(g, trow, obs, prow, n_p, weight=weight, fallback_xyz=xyz_start)
        res = g.predict_px(xyz_new[prow], trow) - obs
        return xyz_new, det, res, np.hypot(res[:, 0], res[:, 1])

    def refine_and_solve(xyz_start: NDArray, g: TiltGeometry, det: NDArray) -> tuple:
        problem = _make_problem(obs, prow, trow, g, ref, chosen, det, weight, xyz_start)
        if problem is not None:
            sel = det[prow] & (weight > 0)
            xyz_det, g = problem.solve(xyz_start[det], weight[sel], max_nfev)
            xyz_start = xyz_start.copy()
            xyz_start[det] = xyz_det
        return (g, *solve(xyz_start, g))

    xyz, determined, residual, length = solve(tracks.particles.xyz_px, geo)
    if chosen:
        geo, xyz, determined, residual, length = refine_and_solve(xyz, geo, determined)
    scale = float(scale_px) if scale_px is not None else 0.0
    if robust != "none":
        for _ in range(max_reweight):
            if scale_px is None:
                scale = float(np.median(length[used])) / _RAYLEIGH_MEDIAN
            new_weight = np.where(used, _robust_weights(length, robust, scale), 0.0)
            converged = np.max(np.abs(new_weight - weight)) < 1e-3
            weight = new_weight
            if converged:
                break
            if chosen:
                geo, xyz, determined, residual, length = refine_and_solve(xyz, geo, determined)
            else:
                xyz, determined, residual, length = solve(xyz, geo)

    return TrackFit(
        particle_id=tracks.particles.id.copy(),
        xyz_px=xyz,
        n_used=np.bincount(prow[used], minlength=n_p),
        determined=determined,
        particle_mean_residual_px=_group_mean(length, prow, used, n_p),
        tilt_id=tracks.tilts.id.copy(),
        geometry=geo,
        tilt_mean_residual_px=_group_mean(length, trow, used, n_t),
        residual_px=residual,
        weight=weight,
        mean_residual_px=float(length[used].mean()),
        rms_px=float(np.sqrt(np.mean(length[used] ** 2))),
        scale_px=scale,
        refined=tuple(k for k in REFINABLE if k in chosen),
        robust=robust,
        reference_tilt=int(tracks.tilts.id[ref]),
    )


def _group_mean(values: NDArray, group: NDArray, used: NDArray, n: int) -> NDArray[np.float64]:
    count = np.bincount(group[used], minlength=n)
    total = np.bincount(group[used], values[used], minlength=n)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _make_problem(obs, prow, trow, geo, ref, chosen, determined, weight, xyz) -> _Problem | None:
    sel = determined[prow] & (weight > 0)
    if not sel.any():
        return None
    seen = np.zeros((len(geo.angle_deg), len(determined)), bool)
    seen[trow[sel], prow[sel]] = True
    heights = geometry.project_points(xyz[determined], geo.angle_deg[ref])[:, 2]
    return _Problem(obs=obs[sel], prow=(np.cumsum(determined) - 1)[prow[sel]], trow=trow[sel],
                    n_particles=int(determined.sum()), start=geo,
                    free_tilts=np.flatnonzero(seen.sum(axis=1) >= _MIN_PARTICLES_PER_TILT), ref=ref,
                    refine=chosen, height0=float(heights.mean()))


def apply_fit(tracks: TrackSet, fit: TrackFit, *, update_tilts: bool = True) -> TrackSet:
    """Put the fitted 3D points into ``tracks`` keeping every projection's image position (shifts absorb the rest).

    With ``update_tilts`` the fitted tilt angles and tilt-axis angles replace the TrackSet's (per-tilt shifts and
    magnifications have no column in the TrackSet: they end up in the projections' shifts)."""
    if not np.array_equal(fit.particle_id, tracks.particles.id) or not np.array_equal(fit.tilt_id, tracks.tilts.id):
        raise CsptInputError("does not match the TrackSet's particles and tilts", field="fit",
                             expected="a TrackFit computed from this TrackSet")
    geo = fit.geometry
    if not update_tilts or (np.array_equal(geo.angle_deg, tracks.tilts.angle_deg)
                            and np.array_equal(geo.axis_deg, tracks.tilts.axis_deg)):
        return tracks.with_particle_xyz(fit.xyz_px, keep_positions=True)
    positions = tracks.positions_px()
    moved = tracks.replace(
        tilts=replace(tracks.tilts, angle_deg=geo.angle_deg.copy(), axis_deg=geo.axis_deg.copy()),
        particles=replace(tracks.particles, xyz_px=fit.xyz_px.copy()),
    )
    return moved.with_positions(np.arange(len(tracks)), positions)


def missing_pairs(tracks: TrackSet) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """``(particle_id, tilt_id)`` of every particle-tilt pair without a projection, sorted by particle then tilt."""
    have = np.zeros((tracks.n_particles, tracks.n_tilts), bool)
    have[tracks.particle_rows(), tracks.tilt_rows()] = True
    prow, trow = np.nonzero(~have)
    return tracks.particles.id[prow], tracks.tilts.id[trow]


def fill_missing(tracks: TrackSet, fit: TrackFit, *, margin_px: float = 0.0, score: float = 0.0) -> TrackSet:
    """Add a projection at the fit's predicted position for every particle-tilt pair without one.

    Predictions closer than ``margin_px`` to the image border (or outside it) are skipped. New rows get ``score``."""
    pid, tid = missing_pairs(tracks)
    if pid.size == 0:
        return tracks
    pos = fit.predict_px(pid, tid)
    ny, nx = tracks.image_shape_yx
    inside = ((pos[:, 0] >= margin_px) & (pos[:, 0] <= nx - 1 - margin_px)
              & (pos[:, 1] >= margin_px) & (pos[:, 1] <= ny - 1 - margin_px))
    pid, tid, pos = pid[inside], tid[inside], pos[inside]
    prow = np.searchsorted(tracks.particles.id, pid)
    trow = np.searchsorted(tracks.tilts.id, tid)
    shift = geometry.shifts_from_positions(tracks.particles.xyz_px[prow], tracks.tilts.angle_deg[trow],
                                           tracks.tilts.axis_deg[trow], pos, tracks.image_shape_yx)
    return tracks.append(pid, tid, shift, score=np.full(pid.size, float(score)))


def defocus_offset_um(tracks: TrackSet, pixel_size_A: float) -> NDArray[np.float64]:
    """Per-projection defocus change (µm, underfocus positive) from the particle's height in the tilted specimen.

    Add it to the tilt's defocus; the sign and meaning are :func:`napari_cspt2d.recon.ctf.projection_defocus_A`'s
    (a particle nearer the source is less underfocused). Shape (N,), one value per projection."""
    if not (np.isfinite(pixel_size_A) and pixel_size_A > 0):
        raise CsptInputError(f"is {pixel_size_A}", field="pixel_size_A", expected="> 0 Å")
    height = tracks.projected_px()[:, 2]
    return ctf.projection_defocus_A(0.0, height, pixel_size_A) * 1e-4
