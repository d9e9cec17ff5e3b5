"""CSPT refinement of 2D tracks against a map: per-projection shifts and per-particle orientations.

One call of :func:`refine_tracks` is one refinement round of a set of particles against the current map (the
pipeline, :mod:`napari_cspt2d.recon.pipeline`, runs it per particle bundle and per iteration).

Reference projections
    Central slices of the map's transform (:class:`~napari_cspt2d.recon.backproject.Projector`) through
    ``A_pt = R_z(axis) R_y(tilt) A_p`` (:func:`geometry.projection_matrices`), multiplied by each projection's image
    model ``m`` (CTF at the projection's own defocus × dose filter, :func:`ctf.image_model`), i.e. the same geometry
    and CTF as the data and as the reconstruction. Like pyp and cisTEM, refinement uses the full map by default; given
    the two half maps and each projection's half (:func:`reconstruct.half_split`), a particle is refined against its
    own half map only (strict gold standard, RELION's way; with few particles the half maps are noisy and the
    orientations suffer: on the 30-particle test sample 2.7° instead of 0.8° median error).

Band and score
    Only frequencies ``1/refine_rlref <= |k| <= 1/refine_rhref`` (Å⁻¹) count; ``refine_rhref`` is pyp's per-iteration
    colon list (``"8:7:6"``: 8 Å in iteration 2, ...) and is capped at 2.2 extracted pixels (just below Nyquist).
    The score of a projection is the normalised cross-correlation in that band,
    ``NCC = Σ Re(I · conj(m S)) / (‖I‖ ‖m S‖)`` (−1..1), ``I`` the image transform, ``S`` the central slice.
    A particle's score is the mean NCC of the projections used for its refinement.

Per-projection shifts
    The NCC of each projection as a function of its 2D shift (a cross-correlation map) is maximised inside a disc:
    a projection may not move further than ``shift_range_A`` from where it started (its pick, ``origin_px``;
    default: its position at the start of the call). The integer peak is refined to sub-pixel precision by a parabola
    through the 3 × 3 neighbourhood and two Newton steps on the band-limited (continuous) correlation.

Per-particle orientations
    All tilts of a particle are scored jointly: the mean NCC, at the refined shifts, of its projections in the
    refinement tilt range that were not dropped by the cutoff (occupancy > 0). *Local search* around the current
    angles, coarse to fine: at each step size (``angle_step_deg`` halving down to ``angle_precision_deg``) the six
    rotations by ± step about the x, y and z axes are scored, a parabola per axis predicts the optimum, and the best
    of these becomes the new centre; the band is narrowed to what the step can resolve (radius ``1.5 / step`` Fourier
    pixels) so coarse steps are cheap and smooth. The search never leaves a ball of ``angle_range_deg`` around the
    starting orientation; with ``euler_range_deg`` = (phi, theta, psi) tolerances (pyp's
    ``csp_ToleranceParticlesPhi/Theta/Psi``) it instead keeps each ZYZ Euler angle within its own tolerance of its
    start: every candidate is moved into that box before it is scored (each angle's change clipped; of a
    rotation's two Euler triples, ``(phi, theta, psi)`` and ``(phi + 180, -theta, psi + 180)``, the one nearer the
    start is clipped), so a tolerance of 0 holds its angle (pyp's docs: Phi and Theta 0 search the in-plane Psi
    only). *Global search* for particles without angles (all three Euler angles exactly 0, the
    TrackSet's "unknown"): every rotation of a grid of about ``global_step_deg`` spacing (Fibonacci-sphere viewing
    directions × in-plane angles) is scored at low resolution, and the 8 best seed local searches. Such a particle's
    projections stay at their picks for the search (shifts refined against a made-up orientation would be wrong);
    then their shifts are refined, a local search from the found orientation at the refined shifts follows, and
    the shifts are refined once more. From the true map low-passed to 30 Å this finds the sample's orientations to
    0.4° median error (``benchmarks/global_search.py``; 1.4° without the second search; without the first rule
    most particles end up 90-180° off).

Tilts used for refinement (``csp_UseImagesForRefinementMin/Max``, :class:`TiltSelection`)
    pyp selects exposures by acquisition index (``TIND``: 0 = first exposure; Max = −1 = up to the last one); the
    seed's ``-60/60`` are tilt angles in degrees. Rule (``unit="auto"``): the values are **degrees when Min < 0**
    (an exposure index cannot be negative), **acquisition indices otherwise**; ``unit="degrees"`` or ``"order"``
    says it explicitly. Both bounds are inclusive. Projections of other tilts do not enter the orientation search or
    the particle score; they are still scored and reconstructed, and their shifts are kept — unless
    ``measure_all_tilts`` (the constrained modes' ``csp_refine_micrographs``): then their shifts are refined too,
    as the measurements pyp's micrograph refinement fits every tilt's geometry from (it runs on all exposures:
    ``pyp/align/core.py`` resets the range to 0..-1 for CSP mode 3, and keeps it for the particle modes).

Particles refined (``csp_RefineProjectionCutoff``, pyp's "min number of projections for refinement")
    Only particles with at least that many projections are refined (0 = every particle); a value between 0 and 1
    (the seed's 0.5) is a fraction of the tilt series' tilts (:func:`napari_cspt2d.model.params.min_projections`).
    The other particles keep their shifts and angles; their projections are still scored and reconstructed.

Projection cutoff (``refine_projection_score_cutoff`` = ``c``, napari-cspt2d's own key, :func:`projection_cutoff_mask`)
    After refinement, a projection is dropped (occupancy 0: left out of the next orientation search and of the
    reconstruction) when its score is low compared with the other projections of its particle:

    * ``c = 0``: nothing is dropped;
    * ``0 < c < 1`` (the seed's 0.5): score ``< c × median`` of the particle's projection scores (when that median
      is positive; otherwise nothing is dropped);
    * ``c >= 1``: score ``< mean − c × standard deviation`` of the particle's scores.

    Kept projections get occupancy 100 (pyp's percent). The rule is re-applied every iteration, so a projection can
    come back.

Scores, occupancy and convergence
    The returned TrackSet carries the refined shifts (unbinned px), the particles' refined ``euler_deg``
    (``psi, theta, phi``), per-projection NCC in ``score`` and the occupancy above; :class:`RefineResult` also has
    the per-particle scores. :func:`parameter_change` measures how much two rounds differ (the pipeline stops when
    the RMS shift change is below 0.1 px and the median orientation change below 0.25°).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import scipy.fft
from numba import njit
from numpy.typing import ArrayLike, NDArray

from ..errors import CsptCancelled, CsptInputError
from ..model.tiltseries import TiltSeries
from ..model.tracks import TiltTable, TrackSet
from .. import geometry
from . import ctf
from .backproject import Projector, sample_half_grid
from .extract import extract_particles

__all__ = [
    "TiltSelection",
    "RefineOptions",
    "RefineResult",
    "refine_tracks",
    "projection_cutoff_mask",
    "orientation_grid",
    "parameter_change",
    "has_no_angles",
    "within_euler_range",
]

TiltUnit = Literal["auto", "degrees", "order"]
Progress = Callable[[str, int, int], None]


# ==================================================================================================== rules
@dataclass(frozen=True)
class TiltSelection:
    """Which tilts are used for refinement (see the module docstring for the rule).

    ``minimum``/``maximum`` are inclusive bounds in ``unit``: ``"degrees"`` (tilt angle), ``"order"`` (acquisition
    index, ``maximum = -1`` = no upper bound) or ``"auto"`` (degrees when ``minimum < 0``, else order)."""

    minimum: float = -math.inf
    maximum: float = math.inf
    unit: TiltUnit = "auto"

    def __post_init__(self) -> None:
        if self.unit not in ("auto", "degrees", "order"):
            raise CsptInputError(f"is {self.unit!r}", field="tilt unit", expected="'auto', 'degrees' or 'order'")
        for name in ("minimum", "maximum"):
            if math.isnan(getattr(self, name)):
                raise CsptInputError("is NaN", field=f"csp_UseImagesForRefinement{name[:3].title()}",
                                     expected="a number")

    @property
    def resolved_unit(self) -> Literal["degrees", "order"]:
        if self.unit != "auto":
            return self.unit  # type: ignore[return-value]
        return "degrees" if self.minimum < 0 else "order"

    def mask(self, tilts: TiltTable) -> NDArray[np.bool_]:
        """Boolean mask over ``tilts`` rows: True for tilts used in refinement."""
        if self.resolved_unit == "degrees":
            value, hi = tilts.angle_deg, self.maximum
        else:
            value, hi = tilts.order.astype(np.float64), (math.inf if self.maximum == -1 else self.maximum)
        eps = 1e-6
        return (value >= self.minimum - eps) & (value <= hi + eps)

    def describe(self) -> str:
        unit = self.resolved_unit
        hi = "last" if unit == "order" and self.maximum == -1 else f"{self.maximum:g}"
        return f"{self.minimum:g}..{hi} ({'tilt angle, °' if unit == 'degrees' else 'acquisition index'})"


def projection_cutoff_mask(score: ArrayLike, particle: ArrayLike, cutoff: float) -> NDArray[np.bool_]:
    """Keep-mask ``(N,)`` of the ``refine_projection_score_cutoff`` rule (module docstring): False = dropped.

    ``score`` and ``particle`` are per projection; NaN scores (projections that were not scored) are kept."""
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    particle = np.asarray(particle).reshape(-1)
    if score.shape != particle.shape:
        raise CsptInputError(f"has {score.size} scores for {particle.size} projections", field="score",
                             expected="one score per projection")
    if not (math.isfinite(cutoff) and cutoff >= 0):
        raise CsptInputError(f"is {cutoff!r}", field="refine_projection_score_cutoff", expected="a number >= 0")
    keep = np.ones(score.size, bool)
    if cutoff == 0 or score.size == 0:
        return keep
    _, group = np.unique(particle, return_inverse=True)
    for g in range(int(group.max()) + 1):
        rows = np.flatnonzero((group == g) & np.isfinite(score))
        if rows.size < 2:
            continue
        s = score[rows]
        if cutoff < 1:
            median = float(np.median(s))
            if median > 0:
                keep[rows[s < cutoff * median]] = False
        else:
            keep[rows[s < s.mean() - cutoff * s.std()]] = False
    return keep


def _enough_projections(particle_rows: NDArray[np.int64], n_particles: int, n_tilts: int,
                        cutoff: float) -> NDArray[np.bool_]:
    """``(P,)`` True for particles refined under ``csp_RefineProjectionCutoff = cutoff`` (module docstring), from
    each projection's particle row."""
    from ..model.params import min_projections

    counts = np.bincount(particle_rows, minlength=n_particles)
    return counts >= min_projections(cutoff, n_tilts)


def has_no_angles(euler_deg: ArrayLike) -> NDArray[np.bool_]:
    """True for particles whose Euler angles are all exactly 0 (the TrackSet's "unknown orientation")."""
    return np.all(np.asarray(euler_deg, dtype=np.float64) == 0.0, axis=-1)


def parameter_change(before: TrackSet, after: TrackSet) -> tuple[float, float]:
    """``(rms shift change in px, median orientation change in °)`` between two TrackSets of the same rows."""
    if len(before) != len(after) or not np.array_equal(before.particle, after.particle):
        raise CsptInputError("have different projections", field="tracks", expected="the same rows before and after")
    d = np.linalg.norm(before.positions_px() - after.positions_px(), axis=1) if before.image_shape_yx else \
        np.linalg.norm(before.shift_px - after.shift_px, axis=1)
    rms = float(np.sqrt(np.mean(d * d))) if d.size else 0.0
    ea, eb = before.particles.euler_deg, after.particles.euler_deg
    angle = rotation_angle_deg(_particle_matrices(ea), _particle_matrices(eb))
    return rms, float(np.median(angle)) if angle.size else 0.0


def rotation_angle_deg(a: ArrayLike, b: ArrayLike) -> NDArray[np.float64]:
    """Geodesic angle (°) between rotation matrices ``a`` and ``b`` (..., 3, 3)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    cos = (np.einsum("...ij,...ij->...", a, b) - 1.0) / 2.0
    return np.rad2deg(np.arccos(np.clip(cos, -1.0, 1.0)))


def _particle_matrices(euler_deg: NDArray[np.float64]) -> NDArray[np.float64]:
    """``A_p`` (P, 3, 3) from TrackSet euler columns ``(psi, theta, phi)``."""
    return geometry.euler_to_matrix(euler_deg[:, 2], euler_deg[:, 1], euler_deg[:, 0])


def _euler_columns(matrices: NDArray[np.float64]) -> NDArray[np.float64]:
    """TrackSet euler columns ``(psi, theta, phi)`` (P, 3) from ``A_p`` (P, 3, 3)."""
    phi, theta, psi = geometry.matrix_to_euler(matrices)
    return np.column_stack([psi, theta, phi]).reshape(-1, 3)


def orientation_grid(step_deg: float) -> NDArray[np.float64]:
    """Rotation matrices ``(M, 3, 3)`` covering SO(3) with about ``step_deg`` spacing: viewing directions on a
    Fibonacci sphere (one per ``step²`` of solid angle) × in-plane rotations every ``step_deg``."""
    if not (math.isfinite(step_deg) and 1.0 <= step_deg <= 90.0):
        raise CsptInputError(f"is {step_deg!r}", field="global_step_deg", expected="1..90 degrees")
    step = math.radians(step_deg)
    n_dir = max(2, int(round(4.0 * math.pi / (step * step))))
    i = np.arange(n_dir) + 0.5
    theta = np.degrees(np.arccos(1.0 - 2.0 * i / n_dir))
    phi = np.degrees((math.pi * (1.0 + math.sqrt(5.0)) * i) % (2.0 * math.pi))
    psi = np.arange(0.0, 360.0, 360.0 / max(1, int(round(360.0 / step_deg))))
    ph, ps = np.repeat(phi, psi.size), np.tile(psi, n_dir)
    th = np.repeat(theta, psi.size)
    return geometry.euler_to_matrix(ph, th, ps)


# ==================================================================================================== numba kernel
@njit(cache=True, nogil=True, fastmath=True)
def _orientation_scores(ft, axes, kx, ky, g, m2, out):  # pragma: no cover - compiled
    """NCC of candidate orientations against images, on a sparse set of frequencies.

    ``ft`` (P, P, P//2+1): the projector's half-grid transform; ``axes`` (C, T, 2, 3): grid coordinates of the unit
    kx and ky of tilt ``t`` under candidate ``c`` (``pad · A[:2]``); ``kx``/``ky`` (K,): the frequencies (box units);
    ``g`` (T, K) = mult · m · I / ‖I‖ and ``m2`` (T, K) = mult · m². Writes
    ``out[c, t] = Σ Re(conj(S) g) / sqrt(Σ m2 |S|²)`` with ``S`` the trilinear central slice."""
    for c in range(axes.shape[0]):
        for t in range(axes.shape[1]):
            ax0, ax1, ax2 = axes[c, t, 0, 0], axes[c, t, 0, 1], axes[c, t, 0, 2]
            ay0, ay1, ay2 = axes[c, t, 1, 0], axes[c, t, 1, 1], axes[c, t, 1, 2]
            num = 0.0
            den = 0.0
            for j in range(kx.shape[0]):
                s = sample_half_grid(ft, kx[j] * ax0 + ky[j] * ay0, kx[j] * ax1 + ky[j] * ay1,
                                     kx[j] * ax2 + ky[j] * ay2)
                q = g[t, j]
                num += s.real * q.real + s.imag * q.imag
                den += m2[t, j] * (s.real * s.real + s.imag * s.imag)
            out[c, t] = num / math.sqrt(den) if den > 0.0 else 0.0


# ==================================================================================================== options/result
@dataclass(frozen=True)
class RefineOptions:
    """Settings of one refinement round (units in the names; see the module docstring for each rule).

    ``resolution_A`` is the iteration's high-resolution limit (``refine_rhref``), ``low_resolution_A`` the low one
    (``refine_rlref``); ``shift_range_A`` bounds how far a projection may move from its pick; ``angle_range_deg``
    how far a local orientation search may go (rotation angle), or ``euler_range_deg`` (phi, theta, psi; degrees,
    each >= 0) how far each Euler angle may go instead; ``angle_step_deg`` → ``angle_precision_deg`` are its first
    and last step sizes; ``global_step_deg`` is the grid of the global search; ``tilts`` the tilts used for
    refinement (``measure_all_tilts``: the shifts of the others are refined too); ``min_projections`` is
    ``csp_RefineProjectionCutoff`` (a count, or a fraction of the tilts between 0 and 1); ``projection_cutoff`` is
    ``refine_projection_score_cutoff``."""

    resolution_A: float
    low_resolution_A: float = 100.0
    shift_range_A: float = 20.0
    refine_shifts: bool = True
    measure_all_tilts: bool = False
    refine_angles: bool = True
    angle_range_deg: float = 15.0
    euler_range_deg: tuple[float, float, float] | None = None
    angle_step_deg: float = 4.0
    angle_precision_deg: float = 0.5
    global_step_deg: float = 15.0
    tilts: TiltSelection = field(default_factory=TiltSelection)
    min_projections: float = 0
    projection_cutoff: float = 0.0

    def __post_init__(self) -> None:
        positive = ("resolution_A", "low_resolution_A", "angle_range_deg", "angle_step_deg", "angle_precision_deg",
                    "global_step_deg")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise CsptInputError(f"is {value!r}", field=name, expected="a finite number > 0")
        if not (math.isfinite(self.shift_range_A) and self.shift_range_A >= 0):
            raise CsptInputError(f"is {self.shift_range_A!r}", field="shift_range_A", expected=">= 0 Å")
        if self.resolution_A >= self.low_resolution_A:
            raise CsptInputError(f"is {self.resolution_A:g} Å, not finer than the low-resolution limit "
                                 f"{self.low_resolution_A:g} Å", field="refine_rhref", expected="< refine_rlref")
        if self.angle_precision_deg > self.angle_step_deg:
            raise CsptInputError(f"is {self.angle_precision_deg:g}° > angle_step_deg {self.angle_step_deg:g}°",
                                 field="angle_precision_deg", expected="<= angle_step_deg")
        if self.euler_range_deg is not None and not (
                len(self.euler_range_deg) == 3
                and all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in self.euler_range_deg)):
            raise CsptInputError(f"is {self.euler_range_deg!r}", field="euler_range_deg",
                                 expected="three finite tolerances >= 0 (phi, theta, psi degrees)")
        projection_cutoff_mask([], [], self.projection_cutoff)  # validates the value
        if not (math.isfinite(self.min_projections) and self.min_projections >= 0
                and (self.min_projections < 1 or self.min_projections == int(self.min_projections))):
            raise CsptInputError(f"is {self.min_projections!r}", field="csp_RefineProjectionCutoff",
                                 expected="an integer >= 0 or a fraction between 0 and 1")


@dataclass(frozen=True, eq=False)
class RefineResult:
    """Result of :func:`refine_tracks`: the refined ``tracks``; ``particle_score`` (P,) mean NCC of each particle's
    refinement projections (NaN when it has none); ``used`` (N,) projections that entered refinement;
    ``searched_globally`` (P,) particles that had no angles; ``resolution_A`` the band limit actually used."""

    tracks: TrackSet
    particle_score: NDArray[np.float64]
    used: NDArray[np.bool_]
    searched_globally: NDArray[np.bool_]
    resolution_A: float


@dataclass(frozen=True)
class Imaging:
    """How particle images are cut from the tilt stack and modelled: ``box`` (extracted px), ``bin``
    (``extract_bin``), ``stack_pixel_A`` (``scope_pixel × data_bin``), ``particle_rad_A`` (the extracted boxes are
    normalised on the background outside it), microscope optics and dose weighting."""

    box: int
    bin: int
    stack_pixel_A: float
    particle_rad_A: float
    voltage_kV: float = 300.0
    cs_mm: float = 2.7
    amp_contrast: float = 0.07
    dose_weighting: bool = False

    @property
    def pixel_A(self) -> float:
        """Pixel of the extracted particle images (Å)."""
        return self.stack_pixel_A * self.bin


# ==================================================================================================== machinery
_CHUNK = 512  # projections per vectorised batch (bounds memory: a few MB per array at box 64)
_NEWTON_STEPS = 2
_GLOBAL_SEEDS = 8


@dataclass(frozen=True, eq=False)
class _Band:
    """Frequencies used for scoring: rfft-grid indices ``iy``/``ix`` (K,), frequencies ``ky``/``kx`` (K,) in box
    units, ``mult`` (K,) Friedel multiplicity (1 on the kx = 0 column, else 2) and ``radius`` (K,)."""

    iy: NDArray[np.int64]
    ix: NDArray[np.int64]
    ky: NDArray[np.float64]
    kx: NDArray[np.float64]
    mult: NDArray[np.float64]
    radius: NDArray[np.float64]

    @classmethod
    def annulus(cls, box: int, r_lo: float, r_hi: float) -> _Band:
        ky = np.fft.fftfreq(box) * box
        kx = np.fft.rfftfreq(box) * box
        r = np.hypot(ky[:, None], kx[None, :])
        iy, ix = np.nonzero((r >= r_lo) & (r <= r_hi))
        return cls(iy, ix, ky[iy], kx[ix], np.where(ix == 0, 1.0, 2.0), r[iy, ix])

    def within(self, radius: float) -> _Band:
        keep = self.radius <= radius
        return _Band(*(getattr(self, f)[keep] for f in ("iy", "ix", "ky", "kx", "mult", "radius")))

    def phases(self, shifts_px: NDArray[np.float64], box: int) -> NDArray[np.complex128]:
        """``exp(2πi k·d / box)`` (B, K) for shifts ``d`` (B, 2) x, y in box pixels."""
        w = 2.0 * np.pi / box
        ex = np.exp(1j * w * np.outer(shifts_px[:, 0], np.arange(box // 2 + 1)))  # separable: per column ...
        ey = np.exp(1j * w * np.outer(shifts_px[:, 1], np.fft.fftfreq(box) * box))  # ... and per row
        return ex[:, self.ix] * ey[:, self.iy]


class _Stage:
    """Progress reporting and cancellation between units of work."""

    def __init__(self, progress: Progress | None, cancel: Callable[[], bool] | None) -> None:
        self.progress, self.cancel = progress, cancel

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.cancel is not None and self.cancel():
            raise CsptCancelled(f"refinement cancelled during {stage}")
        if self.progress is not None:
            self.progress(stage, done, total)


def _image_models(tracks: TrackSet, imaging: Imaging) -> NDArray[np.float32]:
    """Per-projection image model ``m`` (N, box, box//2+1): CTF at the projection's defocus (tilt defocus minus the
    particle's height) × dose filter when dose weighting is on."""
    trow = tracks.tilt_rows()
    height = tracks.projected_px()[:, 2]
    defocus = ctf.projection_defocus_A(tracks.tilts.defocus_um[trow], height, imaging.stack_pixel_A)
    exposure = None
    if imaging.dose_weighting:
        t = tracks.tilts
        exposure = ctf.mid_exposure(t.accumulated_dose(), t.dose)[trow]
    model = ctf.image_model(imaging.box, imaging.pixel_A, defocus, voltage_kV=imaging.voltage_kV,
                            cs_mm=imaging.cs_mm, amp_contrast=imaging.amp_contrast, exposure_e_A2=exposure)
    return model.grid(imaging.box, imaging.pixel_A)


def _extract_fourier(data: NDArray, tracks: TrackSet, imaging: Imaging, stage: _Stage) -> NDArray[np.complex64]:
    """``rfft2`` (N, box, box//2+1) of every projection's box, centred exactly on its position (origin at the box
    centre, so a particle at the centre has a real, positive transform)."""
    n = imaging.box
    out = np.empty((len(tracks), n, n // 2 + 1), np.complex64)
    done = 0
    for batch in extract_particles(data, tracks, extract_box=n * imaging.bin, extract_bin=imaging.bin,
                                   particle_rad_A=imaging.particle_rad_A, pixel_A=imaging.stack_pixel_A,
                                   batch_size=_CHUNK):
        out[batch.rows] = scipy.fft.rfft2(np.fft.ifftshift(batch.images, axes=(1, 2)))
        done += len(batch)
        stage("extract", done, len(tracks))
    return out


def _cc_maps(q_band: NDArray[np.complex128], band: _Band, box: int) -> NDArray[np.float32]:
    """Correlation maps ``Σ mult · Re(q e^{2πi k·x/box})`` (B, box, box) from band values ``q`` (B, K); index 0 is
    zero lag."""
    grid = np.zeros((q_band.shape[0], box, box // 2 + 1), np.complex64)
    grid[:, band.iy, band.ix] = q_band
    return (scipy.fft.irfft2(grid, s=(box, box)) * (box * box)).astype(np.float32)


def _continuous_peak(q: NDArray[np.complex128], band: _Band, box: int, start: NDArray[np.float64]
                     ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Newton steps on ``f(d) = Σ mult · Re(q e^{2πi k·d/box})`` from ``start`` (B, 2); returns ``(d, f(d))``.

    A step is taken only where the Hessian is negative definite and the step is shorter than 1 px."""
    d = start.copy()
    w = 2.0 * np.pi / box
    kx, ky = band.kx * w, band.ky * w
    for _ in range(_NEWTON_STEPS):
        z = q * band.phases(d, box)
        re, im = z.real * band.mult, z.imag * band.mult
        gx, gy = -(im @ kx), -(im @ ky)
        hxx, hxy, hyy = -(re @ (kx * kx)), -(re @ (kx * ky)), -(re @ (ky * ky))
        det = hxx * hyy - hxy * hxy
        with np.errstate(divide="ignore", invalid="ignore"):
            sx = -(hyy * gx - hxy * gy) / det
            sy = -(-hxy * gx + hxx * gy) / det
        ok = (hxx < 0) & (det > 0) & np.isfinite(sx) & np.isfinite(sy) & (sx * sx + sy * sy < 1.0)
        d[ok, 0] += sx[ok]
        d[ok, 1] += sy[ok]
    value = ((q * band.phases(d, box)).real * band.mult).sum(axis=1)
    return d, value


def _refine_shift_batch(
    fimg: NDArray[np.complex64], refs: NDArray[np.complex64], band: _Band, box: int,
    centre: NDArray[np.float64], radius: float, active: NDArray[np.bool_],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Shift (B, 2; box px, the particle's offset from the box centre) maximising the NCC between images
    ``fimg`` and references ``refs`` (both rfft layout, B rows) inside discs ``|d - centre| <= radius``; rows
    that are not ``active`` keep d = 0. Returns ``(d, NCC at d)``."""
    i_b = fimg[:, band.iy, band.ix].astype(np.complex128)
    r_b = refs[:, band.iy, band.ix].astype(np.complex128)
    norm = np.sqrt((band.mult * np.abs(i_b) ** 2).sum(1) * (band.mult * np.abs(r_b) ** 2).sum(1))
    q = i_b * np.conj(r_b) / np.where(norm > 0, norm, np.inf)[:, None]
    d = np.zeros((fimg.shape[0], 2))
    rows = np.flatnonzero(active)
    if rows.size:
        cc = _cc_maps(q[rows], band, box)
        lag = np.fft.fftfreq(box) * box
        dx = lag[None, None, :] - centre[rows, 0, None, None]
        dy = lag[None, :, None] - centre[rows, 1, None, None]
        edge = box // 2 - 2
        allowed = (dx * dx + dy * dy <= radius * radius + 1e-9) & (np.abs(lag)[None, :, None] <= edge) & (
            np.abs(lag)[None, None, :] <= edge)
        flat = np.where(allowed, cc, -np.inf).reshape(rows.size, -1)
        peak = flat.argmax(axis=1)
        py, px = np.divmod(peak, box)
        b = np.arange(rows.size)
        sub = np.stack([_parabola(cc[b, py, (px - 1) % box], cc[b, py, px], cc[b, py, (px + 1) % box]),
                        _parabola(cc[b, (py - 1) % box, px], cc[b, py, px], cc[b, (py + 1) % box, px])], axis=1)
        start = np.stack([lag[px], lag[py]], axis=1) + sub
        found, _ = _continuous_peak(q[rows], band, box, start)
        # stay inside the search disc
        off = found - centre[rows]
        dist = np.hypot(off[:, 0], off[:, 1])
        over = dist > radius
        found[over] = centre[rows][over] + off[over] * (radius / dist[over])[:, None]
        d[rows] = found
    score = ((q * band.phases(d, box)).real * band.mult).sum(axis=1)
    return d, score


def _parabola(minus: NDArray, centre: NDArray, plus: NDArray) -> NDArray[np.float64]:
    """Vertex offset (−0.5..0.5) of the parabola through three equally spaced samples (0 when not a maximum)."""
    curv = minus.astype(np.float64) - 2.0 * centre + plus
    with np.errstate(divide="ignore", invalid="ignore"):
        off = np.where(curv < 0, 0.5 * (minus - plus) / curv, 0.0)
    return np.clip(np.nan_to_num(off), -0.5, 0.5)


class _ParticleScorer:
    """Mean NCC over one particle's projections for candidate orientations ``A_p`` (C, 3, 3), at a band radius."""

    def __init__(self, projector: Projector, fimg: NDArray[np.complex64], models: NDArray[np.float32],
                 tilt_mats: NDArray[np.float64], shifts: NDArray[np.float64], band: _Band) -> None:
        self.projector = projector
        self.fimg, self.models, self.tilt_mats, self.shifts, self.band = fimg, models, tilt_mats, shifts, band
        self._cache: dict[float, tuple[NDArray, ...]] = {}

    def _terms(self, radius: float) -> tuple[NDArray, ...]:
        if radius not in self._cache:
            b = self.band.within(radius)
            image = self.fimg[:, b.iy, b.ix] * b.phases(self.shifts, self.projector.box)
            norm = np.sqrt((b.mult * np.abs(image) ** 2).sum(1))
            m = self.models[:, b.iy, b.ix].astype(np.float64)
            g = (b.mult * m * image / np.where(norm > 0, norm, np.inf)[:, None]).astype(np.complex64)
            m2 = (b.mult * m * m).astype(np.float32)
            self._cache[radius] = (b.kx.astype(np.float32), b.ky.astype(np.float32), g, m2)
        return self._cache[radius]

    def __call__(self, candidates: NDArray[np.float64], radius: float) -> NDArray[np.float64]:
        kx, ky, g, m2 = self._terms(radius)
        mats = np.einsum("tij,cjk->ctik", self.tilt_mats, candidates)
        axes = np.ascontiguousarray(mats[:, :, :2, :] * self.projector.pad, dtype=np.float32)
        out = np.empty(axes.shape[:2])
        _orientation_scores(self.projector.ft, axes, kx, ky, g, m2, out)
        return out.mean(axis=1)


def _band_radius(step_deg: float, r_lo: float, r_hi: float) -> float:
    """Band radius (Fourier px) an orientation step can resolve: 1.5 / step (rad), within [r_lo + 3, r_hi]."""
    return float(min(r_hi, max(r_lo + 3.0, 1.5 / math.radians(step_deg))))


def within_euler_range(candidates: ArrayLike, start: ArrayLike, range_deg: ArrayLike) -> NDArray[np.float64]:
    """Rotations ``candidates`` (C, 3, 3) moved into the box of Euler angles around ``start`` (3, 3): each ZYZ
    angle (phi, theta, psi) changed by at most its ``range_deg`` (3,) from the start's (module docstring)."""
    c = np.asarray(candidates, dtype=np.float64).reshape(-1, 3, 3)
    reach = np.asarray(range_deg, dtype=np.float64).reshape(3)
    origin = np.array(geometry.matrix_to_euler(np.asarray(start, dtype=np.float64)), dtype=np.float64)
    first = np.column_stack(geometry.matrix_to_euler(c))
    second = first * np.array([1.0, -1.0, 1.0]) + np.array([180.0, 0.0, 180.0])

    def change(angles: NDArray[np.float64]) -> NDArray[np.float64]:
        return (angles - origin + 180.0) % 360.0 - 180.0

    d1, d2 = change(first), change(second)
    d = np.where((np.abs(d1).sum(1) <= np.abs(d2).sum(1))[:, None], d1, d2)
    target = origin + np.clip(d, -reach, reach)
    return geometry.euler_to_matrix(target[:, 0], target[:, 1], target[:, 2])


def _local_search(score: _ParticleScorer, start: NDArray[np.float64], first_step: float, last_step: float,
                  max_range: float, r_lo: float, r_hi: float, euler_range: tuple[float, float, float] | None = None
                  ) -> tuple[NDArray[np.float64], float]:
    """Coarse-to-fine search around ``start`` (module docstring): within ``max_range`` degrees of rotation, or,
    given ``euler_range``, within those Euler-angle tolerances; returns the best ``A_p`` and its score."""
    current, step, best = start, first_step, -np.inf
    axes = np.concatenate([np.eye(3), -np.eye(3)])

    def bounded(rotations: NDArray[np.float64]) -> NDArray[np.float64]:
        return rotations if euler_range is None else within_euler_range(rotations, start, euler_range)

    while step >= last_step * (1 - 1e-9):
        radius = _band_radius(step, r_lo, r_hi)
        best = float(score(current[None], radius)[0])
        for _ in range(2):
            moves = bounded(geometry.rotvec_matrices(axes * math.radians(step)) @ current)
            s = score(moves, radius)
            plus, minus = s[:3], s[3:]
            curv = plus + minus - 2.0 * best
            with np.errstate(divide="ignore", invalid="ignore"):
                off = np.where(curv < 0, 0.5 * (minus - plus) / curv, np.sign(plus - minus))
            off = np.clip(np.nan_to_num(off), -1.0, 1.0)
            if s.max() < best and np.abs(off).max() < 0.25:
                break  # the centre is best and the predicted optimum is within a quarter step of it
            trial = bounded(geometry.rotvec_matrices(off * math.radians(step)) @ current[None])
            options = np.concatenate([current[None], moves, trial])
            values = np.concatenate([[best], s, score(trial, radius)])
            if euler_range is None:
                values[rotation_angle_deg(options, start[None]) > max_range] = -np.inf
            pick = int(np.argmax(values))
            moved = float(rotation_angle_deg(options[pick], current))
            current, best = options[pick], float(values[pick])
            if moved < 0.5 * step:
                break
        step /= 2.0
    return current, best


def _global_search(score: _ParticleScorer, options: RefineOptions, r_lo: float, r_hi: float
                   ) -> NDArray[np.float64]:
    """Best orientation from a grid search at low resolution followed by local searches from the best seeds."""
    grid = orientation_grid(options.global_step_deg)
    radius = _band_radius(options.global_step_deg, r_lo, r_hi)
    values = np.concatenate([score(grid[i:i + 256], radius) for i in range(0, len(grid), 256)])
    seeds: list[NDArray[np.float64]] = []
    for i in np.argsort(values)[::-1]:
        if all(rotation_angle_deg(grid[i], s) > options.global_step_deg for s in seeds):
            seeds.append(grid[i])
        if len(seeds) == _GLOBAL_SEEDS:
            break
    found = [_local_search(score, s, options.global_step_deg / 2, options.angle_precision_deg,
                           options.global_step_deg, r_lo, r_hi) for s in seeds]
    finals = np.stack([a for a, _ in found])
    return finals[int(np.argmax(score(finals, r_hi)))]


def _projectors(references: Any, box: int) -> list[Projector]:
    """One projector (a map) or two (half maps) from volumes or :class:`Projector` objects."""
    refs = list(references) if isinstance(references, (list, tuple)) else [references]
    if len(refs) not in (1, 2):
        raise CsptInputError(f"has {len(refs)} maps", field="references", expected="one map or two half maps")
    out = [r if isinstance(r, Projector) else Projector(r) for r in refs]
    for p in out:
        if p.box != box:
            raise CsptInputError(f"is a {p.box}³ map", field="references",
                                 expected=f"maps of the extracted box, {box}³ (extract_box)")
    return out


def _halves(half: ArrayLike | None, n: int, n_maps: int) -> NDArray[np.int64]:
    if n_maps == 1:
        return np.zeros(n, np.int64)
    if half is None:
        raise CsptInputError("is missing", field="half", expected="each projection's half set with two half maps")
    h = np.asarray(half, dtype=np.int64).reshape(-1)
    if h.shape != (n,) or np.any((h < 0) | (h > 1)):
        raise CsptInputError(f"has shape {h.shape} or values outside 0/1", field="half", expected=f"{n} values 0 or 1")
    return h


def _check_inputs(stack: Any, tracks: TrackSet, imaging: Imaging) -> NDArray:
    data = stack.data if isinstance(stack, TiltSeries) else stack
    if not hasattr(data, "ndim") or data.ndim != 3:
        raise CsptInputError(f"has shape {getattr(data, 'shape', None)}", field="stack",
                             expected="a tilt stack (n_tilts, ny, nx)")
    if tracks.image_shape_yx is None:
        raise CsptInputError("is unknown", field="tracks.image_shape_yx", expected="the tilt images' (ny, nx)")
    if tuple(data.shape[1:]) != tuple(tracks.image_shape_yx):
        raise CsptInputError(f"is {tracks.image_shape_yx} but the stack's images are {tuple(data.shape[1:])}",
                             field="tracks.image_shape_yx", expected="tracks of this stack")
    if len(tracks) and int(tracks.tilt.max()) >= data.shape[0]:
        raise CsptInputError(f"refers to section {int(tracks.tilt.max())} of a {data.shape[0]}-section stack",
                             field="projections.tind", expected="0-based sections of the stack")
    if imaging.box < 8 or imaging.bin < 1:
        raise CsptInputError(f"box {imaging.box}, bin {imaging.bin}", field="extract_box/extract_bin",
                             expected="box >= 8 and bin >= 1")
    return data


def refine_tracks(
    stack: Any,
    tracks: TrackSet,
    references: Any,
    options: RefineOptions,
    imaging: Imaging,
    *,
    half: ArrayLike | None = None,
    origin_px: ArrayLike | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> RefineResult:
    """One refinement round of every projection and particle of ``tracks`` (module docstring).

    Parameters
    ----------
    stack:
        Tilt stack ``(n_tilts, ny, nx)`` (memory map, array or :class:`~napari_cspt2d.model.tiltseries.TiltSeries`).
    tracks:
        The projections to refine (with ``image_shape_yx``); particles of both half sets may be mixed.
    references:
        The current map (``box``³, protein positive, origin at ``box // 2``), or its two half maps ``(half1,
        half2)`` for gold-standard refinement; volumes or :class:`Projector` objects.
    half:
        (N,) half set (0/1) of each projection, required with two half maps (:func:`reconstruct.half_split` of the
        whole data set, so that a bundle of particles keeps its global halves).
    options, imaging:
        :class:`RefineOptions` of this iteration and :class:`Imaging` (box, binning, pixel, optics).
    origin_px:
        (N, 2) image positions (x, y, unbinned px) the shift range is measured from (the picks); default: where the
        projections are now.
    progress, cancel:
        ``progress(stage, done, total)`` is called between particles; ``cancel()`` returning True stops the round
        with :class:`CsptCancelled`.
    """
    data = _check_inputs(stack, tracks, imaging)
    stage = _Stage(progress, cancel)
    n = imaging.box
    projectors = _projectors(references, n)
    positions = tracks.positions_px()
    origin = positions if origin_px is None else np.asarray(origin_px, dtype=np.float64)
    if origin.shape != positions.shape or not np.all(np.isfinite(origin)):
        raise CsptInputError(f"has shape {origin.shape}", field="origin_px",
                             expected=f"finite ({len(tracks)}, 2) positions")
    r_lo = n * imaging.pixel_A / options.low_resolution_A
    r_hi = min(n * imaging.pixel_A / options.resolution_A, n / 2.2)
    band = _Band.annulus(n, r_lo, r_hi)
    if band.iy.size < 10:
        raise CsptInputError(f"leave {band.iy.size} frequencies in a {n}-px box at {imaging.pixel_A:g} Å/px",
                             field="refine_rhref/refine_rlref", expected="a band of at least 10 frequencies")

    fimg = _extract_fourier(data, tracks, imaging, stage)
    models = _image_models(tracks, imaging)
    prow, trow = tracks.particle_rows(), tracks.tilt_rows()
    tilt_mats = geometry.tilt_matrices(tracks.tilts.angle_deg[trow], tracks.tilts.axis_deg[trow])
    particle_mats = _particle_matrices(tracks.particles.euler_deg)
    half = _halves(half, len(tracks), len(projectors))
    refined_particle = _enough_projections(prow, len(tracks.particles), len(tracks.tilts), options.min_projections)
    in_tilts = options.tilts.mask(tracks.tilts)[trow]
    in_range = in_tilts & refined_particle[prow]
    measured = (in_tilts | options.measure_all_tilts) & refined_particle[prow]
    centre = (origin - positions) / imaging.bin
    radius = options.shift_range_A / imaging.pixel_A
    unknown = has_no_angles(tracks.particles.euler_deg) & options.refine_angles

    def shift_pass(name: str, active: NDArray[np.bool_]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        d, score = np.zeros((len(tracks), 2)), np.zeros(len(tracks))
        active = active & measured & options.refine_shifts
        for h, proj in enumerate(projectors):
            rows = np.flatnonzero(half == h)
            for i in range(0, rows.size, _CHUNK):
                stage(name, int(i + (half < h).sum()), len(tracks))
                r = rows[i:i + _CHUNK]
                refs = proj.project_fourier(tilt_mats[r] @ particle_mats[prow[r]]) * models[r]
                d[r], score[r] = _refine_shift_batch(fimg[r], refs, band, n, centre[r], radius, active[r])
        return d, score

    usable = in_range & (tracks.occupancy > 0)
    order = np.argsort(prow, kind="stable")
    starts = np.searchsorted(prow[order], np.arange(len(tracks.particles) + 1))
    searched = np.zeros(len(tracks.particles), bool)

    def orientation_pass(name: str, particles: NDArray[np.bool_], search: NDArray[np.bool_]) -> None:
        """Local search of ``particles`` at the shifts ``d``; global search of those also in ``search``."""
        for p in np.flatnonzero(particles & refined_particle):
            stage(name, int(p), len(tracks.particles))
            rows = order[starts[p]:starts[p + 1]]
            rows = rows[usable[rows]]
            if rows.size == 0:
                continue
            scorer = _ParticleScorer(projectors[int(half[rows[0]])], fimg[rows], models[rows], tilt_mats[rows],
                                     d[rows], band)
            if search[p]:
                particle_mats[p] = _global_search(scorer, options, r_lo, r_hi)
                searched[p] = True
            else:
                particle_mats[p], _ = _local_search(scorer, particle_mats[p], options.angle_step_deg,
                                                    options.angle_precision_deg, options.angle_range_deg, r_lo, r_hi,
                                                    options.euler_range_deg)

    everything = np.ones(len(tracks), bool)
    d, score = shift_pass("shifts", ~unknown[prow])  # a made-up orientation would pull the shifts off
    if options.refine_angles:
        orientation_pass("orientations", np.ones(len(tracks.particles), bool), unknown)
        d, score = shift_pass("shifts (new orientations)", everything)
        if unknown.any() and options.refine_shifts:  # the global search scored the picks: again at refined shifts
            orientation_pass("orientations (after the global search)", unknown, np.zeros_like(unknown))
            d, score = shift_pass("shifts (new orientations)", everything)
    stage("scores", len(tracks), len(tracks))

    keep = projection_cutoff_mask(score, tracks.particle, options.projection_cutoff)
    used = in_range & keep
    sums = np.bincount(prow, weights=np.where(used, score, 0.0), minlength=len(tracks.particles))
    counts = np.bincount(prow, weights=used.astype(np.float64), minlength=len(tracks.particles))
    with np.errstate(invalid="ignore", divide="ignore"):
        particle_score = np.where(counts > 0, sums / counts, np.nan)
    particles = replace(tracks.particles, euler_deg=_euler_columns(particle_mats))
    refined = tracks.replace(shift_px=tracks.shift_px + d * imaging.bin, score=score,
                             occupancy=np.where(keep, 100.0, 0.0), particles=particles)
    return RefineResult(refined, particle_score, used, searched, float(n * imaging.pixel_A / r_hi))

