"""Reconstruct a map from 2D tracks: streaming extraction → CTF/dose model → Fourier insertion → half maps → FSC.

:func:`reconstruct_tracks` is what ``pyp.run_reconstruction`` and the GUI call. Each projection is boxed at its
position in the tilt image (so no further shift is applied), seen through ``A = R_z(axis) R_y(tilt) A_particle``
(:func:`geometry.projection_matrices`), with defocus = tilt defocus − particle height × pixel size
(:func:`ctf.projection_defocus_A`), the exposure filter at its mid-exposure (:func:`ctf.mid_exposure`) and weight
cos(tilt). Particles are split into gold-standard halves by rank (even/odd position in the sorted particle ids) or at
random with a seed; every projection of a particle goes to the same half. Memory is the two Fourier grids plus one
batch, independent of the number of projections.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import CsptCancelled, CsptInputError
from ..io.mrc import write_map
from ..model.tracks import TrackSet
from . import ctf, geometry
from .backproject import Backprojector, apply_bfactor
from .extract import check_extraction, extract_particles, extracted_pixel_A
from .fsc import FscCurve, plot_fsc, write_fsc_table

__all__ = ["ReconstructionResult", "reconstruct_tracks", "select_projections", "half_split"]

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True, eq=False)
class ReconstructionResult:
    """``map``, ``half1``, ``half2`` (n³ float32, protein positive, origin at voxel n // 2), the half-map ``fsc``,
    ``resolution_A`` (FSC 0.143), ``resolution_05_A`` (FSC 0.5), ``voxel_A`` and run ``stats``."""

    map: NDArray[np.float32]
    half1: NDArray[np.float32]
    half2: NDArray[np.float32]
    fsc: FscCurve
    resolution_A: float
    resolution_05_A: float
    voxel_A: float
    stats: dict = field(default_factory=dict)

    def write(self, map_path: str | os.PathLike[str], *, halves: bool = True, fsc: bool = True) -> list[Path]:
        """Write the map to ``map_path`` and, beside it, ``{stem}_half1.mrc``/``_half2.mrc`` and the FSC table
        (``{stem}_fsc.csv``) and plot (``{stem}_fsc.png``); every file atomically. Returns the paths written."""
        path = Path(map_path)
        stem = path.with_suffix("")
        written = [write_map(path, self.map, self.voxel_A)]
        if halves:
            written += [write_map(f"{stem}_half{i + 1}.mrc", h, self.voxel_A)
                        for i, h in enumerate((self.half1, self.half2))]
        if fsc:
            write_fsc_table(f"{stem}_fsc.csv", self.fsc)
            plot_fsc(f"{stem}_fsc.png", self.fsc, title=f"{path.name}: {self.resolution_A:.1f} Å at FSC 0.143")
            written += [Path(f"{stem}_fsc.csv"), Path(f"{stem}_fsc.png")]
        return written


def select_projections(
    tracks: TrackSet, *, score_cutoff: float | None = None, min_tilt_deg: float = -90.0, max_tilt_deg: float = 90.0
) -> tuple[NDArray[np.int64], dict]:
    """Rows used for a reconstruction: tilt within ``[min_tilt_deg, max_tilt_deg]``, ``score >= score_cutoff`` (if
    given) and occupancy > 0. Returns the rows and counts of what was left out."""
    if min_tilt_deg > max_tilt_deg:
        raise CsptInputError(f"min {min_tilt_deg} > max {max_tilt_deg}", field="min_tilt_deg/max_tilt_deg",
                             expected="min_tilt_deg <= max_tilt_deg")
    angle = tracks.tilts.angle_deg[tracks.tilt_rows()]
    in_range = (angle >= min_tilt_deg) & (angle <= max_tilt_deg)
    scored = np.ones(len(tracks), bool) if score_cutoff is None else tracks.score >= score_cutoff
    occupied = tracks.occupancy > 0
    keep = in_range & scored & occupied
    counts = {"excluded_tilt": int((~in_range).sum()), "excluded_score": int((in_range & ~scored).sum()),
              "excluded_occupancy": int((in_range & scored & ~occupied).sum())}
    return np.flatnonzero(keep), counts


def half_split(tracks: TrackSet, method: Literal["rank", "random"] = "rank", seed: int = 0) -> NDArray[np.int64]:
    """Half (0/1) of every projection, by particle: even/odd rank of the particle id, or a seeded random half of
    the particles."""
    rank = tracks.particle_rows()
    if method == "rank":
        return (rank % 2).astype(np.int64)
    if method == "random":
        n = len(tracks.particles)
        halves = np.zeros(n, np.int64)
        halves[np.random.default_rng(seed).permutation(n)[n // 2:]] = 1
        return halves[rank]
    raise CsptInputError(f"is {method!r}", field="half_split", expected="'rank' or 'random'")


def reconstruct_tracks(
    stack: ArrayLike,
    tracks: TrackSet,
    *,
    pixel_A: float,
    extract_box: int,
    extract_bin: int = 1,
    particle_rad_A: float,
    voltage_kV: float = 300.0,
    cs_mm: float = 2.7,
    amp_contrast: float = 0.07,
    score_cutoff: float | None = None,
    min_tilt_deg: float = -90.0,
    max_tilt_deg: float = 90.0,
    batch_size: int = 256,
    pad: int = 2,
    pad_images: bool = True,
    ctf_mode: Literal["multiply", "flip", "none"] = "multiply",
    dose_weighting: bool = True,
    cos_weighting: bool = True,
    astigmatism_A: float = 0.0,
    astig_angle_deg: float = 0.0,
    phase_shift_deg: float = 0.0,
    split: Literal["rank", "random"] = "rank",
    seed: int = 0,
    mask: ArrayLike | None = None,
    bfactor_A2: float | None = None,
    progress: ProgressFn | None = None,
    cancel: Callable[[], bool] | None = None,
) -> ReconstructionResult:
    """Reconstruct the particles of ``tracks`` from ``stack`` (memory-mapped array ``(n_tilts, ny, nx)``, sections =
    tilt ids) with gold-standard half maps and their FSC.

    ``pixel_A`` is the stack's pixel size; the map's voxel is ``pixel_A × extract_bin`` and its box ``extract_box //
    extract_bin``. Tilts outside ``[min_tilt_deg, max_tilt_deg]`` and projections with ``score < score_cutoff`` or
    zero occupancy are left out. ``pad``/``pad_images``: see :class:`Backprojector`. ``ctf_mode`` "multiply"
    (Wiener-style), "flip" (phase flip) or "none"; ``dose_weighting`` uses the tilts' ``dose``/``order``;
    ``cos_weighting`` weights images by cos(tilt). ``mask``
    (n³, 0..1) is used for the FSC and applied to the final map, ``bfactor_A2`` (negative sharpens) to the final map.
    ``progress(stage, done, total)`` is called between batches ("backproject") and reconstruction steps
    ("reconstruct"); ``cancel()`` returning True raises :class:`CsptCancelled` at the next batch."""
    started = time.perf_counter()
    n = check_extraction(extract_box, extract_bin, particle_rad_A, pixel_A)
    if ctf_mode not in ("multiply", "flip", "none"):
        raise CsptInputError(f"is {ctf_mode!r}", field="ctf_mode", expected="'multiply', 'flip' or 'none'")
    voxel_A = extracted_pixel_A(pixel_A, extract_bin)
    if mask is not None and np.shape(mask) != (n, n, n):
        raise CsptInputError(f"has shape {np.shape(mask)}", field="mask", expected=f"({n}, {n}, {n})")
    rows, counts = select_projections(tracks, score_cutoff=score_cutoff, min_tilt_deg=min_tilt_deg,
                                      max_tilt_deg=max_tilt_deg)
    halves = half_split(tracks, split, seed)
    used_halves = np.bincount(halves[rows], minlength=2)
    if rows.size == 0 or np.any(used_halves == 0):
        raise CsptInputError(f"leaves {rows.size} projections ({used_halves.tolist()} per half)",
                             field="projections", expected="projections of at least two particles after selection")

    trow = tracks.tilt_rows()
    tilt_deg = tracks.tilts.angle_deg[trow]
    euler = tracks.particles.euler_deg[tracks.particle_rows()]  # (psi, theta, phi)
    matrices = geometry.projection_matrices(euler[:, 2], euler[:, 1], euler[:, 0], tilt_deg,
                                            tracks.tilts.axis_deg[trow])
    defocus_A = ctf.projection_defocus_A(tracks.tilts.defocus_um[trow], tracks.projected_px()[:, 2], pixel_A)
    dosed = dose_weighting and bool(np.any(tracks.tilts.dose > 0))
    exposure = ctf.mid_exposure(tracks.tilts.accumulated_dose(), tracks.tilts.dose)[trow] if dosed else None
    scale = np.cos(np.deg2rad(tilt_deg)) if cos_weighting else None

    bp = Backprojector(n, voxel_A, pad=pad, pad_images=pad_images)
    done, n_edge = 0, 0
    try:
        for batch in extract_particles(stack, tracks, extract_box=extract_box, extract_bin=extract_bin,
                                       particle_rad_A=particle_rad_A, pixel_A=pixel_A, rows=rows,
                                       batch_size=batch_size):
            if cancel is not None and cancel():
                raise CsptCancelled("reconstruction cancelled")
            r = batch.rows
            model = None
            if ctf_mode != "none" or exposure is not None or scale is not None:
                model = ctf.image_model(
                    n, voxel_A, None if ctf_mode == "none" else defocus_A[r], voltage_kV=voltage_kV, cs_mm=cs_mm,
                    amp_contrast=amp_contrast, phase_shift_deg=phase_shift_deg, astigmatism_A=astigmatism_A,
                    astig_angle_deg=astig_angle_deg, exposure_e_A2=None if exposure is None else exposure[r],
                    scale=None if scale is None else scale[r], mode="flip" if ctf_mode == "flip" else "multiply",
                )
            bp.insert(batch.images, matrices[r], half=halves[r], model=model)
            done += len(batch)
            n_edge += int(batch.at_edge.sum())
            if progress is not None:
                progress("backproject", done, rows.size)
        if cancel is not None and cancel():
            raise CsptCancelled("reconstruction cancelled")
        inserted = time.perf_counter()
        recon = bp.reconstruct(fsc_mask=mask, progress=progress)
    finally:
        bp.close()
    final = recon.full
    if mask is not None:
        final = final * np.asarray(mask, dtype=np.float32)
    if bfactor_A2:
        final = apply_bfactor(final, voxel_A, bfactor_A2)
    elapsed = time.perf_counter() - started
    stats = {
        "n_projections": len(tracks), "n_used": int(rows.size), "n_half": used_halves.tolist(),
        "n_particles": int(np.unique(tracks.particle[rows]).size), "n_at_edge": n_edge, **counts,
        "box": n, "pad": pad, "seconds": elapsed, "seconds_insert": inserted - started,
        "images_per_s": rows.size / max(inserted - started, 1e-9),
    }
    return ReconstructionResult(final.astype(np.float32), recon.half1, recon.half2, recon.fsc,
                                recon.fsc.resolution_A(0.143), recon.fsc.resolution_A(0.5), voxel_A, stats)
