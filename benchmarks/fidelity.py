"""Map fidelity and refinement accuracy on an independent simulation: napari-cspt2d vs cryoDRGN ``backproject_voxel``.

The simulation shares nothing with ``napari_cspt2d.recon`` or ``napari_cspt2d.sample``: a pseudo-atomic model (a
few thousand Gaussian "atoms", 1-1.5 px wide, filling four lobes on a left-handed helix plus an arm: chiral and
asymmetric) is projected *analytically* (the line integral of a 3D Gaussian is a 2D Gaussian, so there is no
interpolation at all; the truth map samples the same Gaussians at the voxel centres), with its own CTF (the standard
formula, cryoDRGN's sign), its own tilt geometry (``x' = X cos t + Z sin t``, ``y' = Y``, IMOD's) and its own random
rotations. Particles sit at random heights in a slab and jittered grid positions; each projection gets the CTF at
its own defocus (tilt defocus minus height) in a box with room for the CTF's delocalisation, is pasted into its tilt
image (protein dark) and white noise is added. SNR = variance of the CTF-modulated projections inside the particle
box / noise variance. Picks are the true positions plus Gaussian error (``--pick-error``, per axis, stack px).

Per box and SNR, from the same boxes (napari-cspt2d's extraction at the picks; true angles, true heights):

* **ours (shipped)**: ``reconstruct_tracks``' map, what a user gets (gold-standard halves, Wiener filter with τ²
  from the FSC inside the default particle mask, solvent flattened outside it; each shell blended from the grids as
  inserted and the neighbourhood-averaged grids by the half maps' SNR, ``recon/apodise.py``);
* **ours (shell_damping 0.5)**: as shipped with ``reconstruct_shell_damping = 0.5`` (the square root of the Wiener
  filter's shell attenuation);
* **ours (unit gain)**: as shipped with ``reconstruct_shell_damping = 0`` (per-voxel Wiener weights, every shell
  at unit signal gain: the unfiltered map for validation);
* **ours (voxel-wise unfiltered)**: the grids as inserted divided voxel by voxel with a tiny constant regulariser
  (``Backprojector.reconstruct_single``; no neighbourhood averaging, no filter);
* **cryoDRGN**: ``cryodrgn backproject_voxel --ctf --uninvert-data`` on the same boxes, poses and per-projection CTF
  (run from its own venv, through ``backproject.cryodrgn_backproject``).

Reported: mean FSC vs the truth over shells 1..Nyquist inside a soft mask around the object
(``backproject.truth_mask``), the FSC-0.143 resolution vs truth (masked) and the real-space correlation with the truth
inside the mask (what the eye sees). With ``--refine``: the shift error (RMS per axis, stack px) of the picks and
after refinement (seed Option A through ``pyp.csp_split``, 3 iterations, serial) in free mode (the seed's
settings), constrained mode (``csp_refine_micrographs`` + ``csp_refine_particles``) and constrained mode with
``csp_transreg``, and the particles' orientation error; with ``--geometry-errors`` also from a stack whose tilt
images are shifted by 3 px each (a misalignment; the picks follow the images) with a tilt table whose angles are
off by ±1° and axis by 1°, and how
much of each error the refinement leaves (tilt angles after removing their common offset, per-tilt shifts after
removing what one 3D translation explains: those only move or turn the map).

A table is printed and JSON written to ``benchmarks/results/fidelity.json``. ``--quick`` runs box 64 with 24
particles × 31 tilts at SNR 1 and 0.01 (a few minutes on the shared 2-core machine).

Usage: ``python benchmarks/fidelity.py [--quick] [--boxes 64 128] [--snrs 1 0.1 0.01 0.001] [--refine]
[--geometry-errors] [--no-cryodrgn]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from backproject import CRYODRGN, cryodrgn_backproject, truth_mask  # noqa: E402 - the sibling benchmark, found above

PIXEL_A = 2.7
VOLTAGE_KV, CS_MM, AMP_CONTRAST = 300.0, 2.7, 0.07
DEFOCUS_UM = 2.5
BATCH = 128


# ------------------------------------------------------------------------------------------------ model
@dataclass(frozen=True)
class Atoms:
    """Pseudo-atoms: ``xyz_px`` (K, 3) relative to the map origin, ``sigma_px`` (K,), ``weight`` (K,) peak density."""

    xyz_px: np.ndarray
    sigma_px: np.ndarray
    weight: np.ndarray


def pseudo_atomic_model(box: int, seed: int = 11) -> Atoms:
    """Four lobes of different sizes on a left-handed helix and a thin arm, filled with atoms, within 0.3 box."""
    rng = np.random.default_rng(seed)
    radius = 0.3 * box
    turn = np.deg2rad([0.0, -100.0, -200.0, -300.0])  # left-handed: clockwise while rising in z
    centres = np.column_stack([0.45 * radius * np.cos(turn), 0.45 * radius * np.sin(turn),
                               np.linspace(-0.45, 0.45, 4) * radius])
    sizes = np.array([0.55, 0.45, 0.40, 0.30]) * radius
    n_total = int(1500 * (box / 64) ** 1.5)
    parts = []
    for c, s in zip(centres, sizes):
        n = int(n_total * 0.9 * s**3 / np.sum(sizes**3))
        d = rng.normal(size=(n, 3))
        d *= (s * rng.uniform(0, 1, n) ** (1 / 3) / np.linalg.norm(d, axis=1))[:, None]
        parts.append(c + d * np.array([1.0, 0.8, 1.2]))  # ellipsoids, not spheres
    t = rng.uniform(0, 1, n_total // 10)
    arm = centres[0] + t[:, None] * np.array([0.55, -0.2, 0.35]) * radius + rng.normal(0, 0.04 * radius, (t.size, 3))
    xyz = np.concatenate(parts + [arm])
    xyz = xyz[np.linalg.norm(xyz, axis=1) < radius]
    return Atoms(xyz, rng.uniform(1.0, 1.5, len(xyz)), rng.uniform(0.7, 1.0, len(xyz)))


def render_volume(atoms: Atoms, box: int) -> np.ndarray:
    """The atoms' density sampled at the voxel centres of a ``box``³ grid ``[z, y, x]``, origin at voxel box // 2."""
    r = np.arange(box) - box // 2
    vol = np.zeros((box * box, box))
    for sl in np.array_split(np.arange(len(atoms.weight)), max(1, len(atoms.weight) // 400)):
        g = [np.exp(-((r[None, :] - atoms.xyz_px[sl, i:i + 1]) ** 2) / (2 * atoms.sigma_px[sl, None] ** 2))
             for i in range(3)]
        zy = (atoms.weight[sl, None, None] * g[2][:, :, None] * g[1][:, None, :]).reshape(len(sl), -1)
        vol += zy.T @ g[0]
    return vol.reshape(box, box, box).astype(np.float32)


def render_projections(atoms: Atoms, views: np.ndarray, size: int, centre_xy: np.ndarray) -> np.ndarray:
    """Line integrals along the view z of the atoms seen through ``views`` (B, 3, 3), ``(B, size, size)``: the map
    origin lands at pixel ``centre_xy`` (B, 2; x, y, pixel centres at integers)."""
    xy = np.einsum("bij,kj->bki", views[:, :2], atoms.xyz_px) + centre_xy[:, None, :]  # (B, K, 2)
    r = np.arange(size, dtype=np.float64)
    s2 = 2 * atoms.sigma_px**2
    amp = atoms.weight * np.sqrt(2 * np.pi) * atoms.sigma_px
    gx = (amp[None, :, None] * np.exp(-((r[None, None, :] - xy[:, :, 0:1]) ** 2) / s2[None, :, None]))
    gy = np.exp(-((r[None, None, :] - xy[:, :, 1:2]) ** 2) / s2[None, :, None])
    return np.matmul(gy.transpose(0, 2, 1).astype(np.float32), gx.astype(np.float32))  # [y, x]


def ctf_rfft(size: int, defocus_A: np.ndarray) -> np.ndarray:
    """CTF on the ``rfft2`` grid of ``size``² images (B, size, size//2+1), cryoDRGN's sign (negative at low
    frequency in underfocus), no astigmatism."""
    volts = VOLTAGE_KV * 1e3
    lam = 12.2643247 / np.sqrt(volts * (1 + 0.978466e-6 * volts))
    fy = np.fft.fftfreq(size) / PIXEL_A
    fx = np.fft.rfftfreq(size) / PIXEL_A
    s2 = fy[:, None] ** 2 + fx[None, :] ** 2
    gamma = 2 * np.pi * (-0.5 * defocus_A[:, None, None] * lam * s2 + 0.25 * CS_MM * 1e7 * lam**3 * s2**2)
    return (np.sqrt(1 - AMP_CONTRAST**2) * np.sin(gamma) - AMP_CONTRAST * np.cos(gamma)).astype(np.float32)


def rotation_y(angle_deg: np.ndarray) -> np.ndarray:
    """``x' = X cos t + Z sin t``, ``z' = −X sin t + Z cos t`` (IMOD's tilt), shape (T, 3, 3)."""
    t = np.deg2rad(angle_deg)
    c, s, z, o = np.cos(t), np.sin(t), np.zeros_like(t), np.ones_like(t)
    return np.stack([np.stack([c, z, s], -1), np.stack([z, o, z], -1), np.stack([-s, z, c], -1)], -2)


# ------------------------------------------------------------------------------------------------ tilt series
@dataclass
class Series:
    """A simulated tilt series: clean stack (T, ny, nx), truth, picks and per-projection truth (rows = particle-major:
    row = p * T + t)."""

    clean: np.ndarray
    signal_var: float
    truth_map: np.ndarray
    angles_deg: np.ndarray
    tilt_defocus_um: np.ndarray
    xyz_px: np.ndarray  # (P, 3) relative to the tomogram centre
    particle_rot: np.ndarray  # (P, 3, 3)
    views: np.ndarray  # (N, 3, 3)
    positions_px: np.ndarray  # (N, 2) true, numpy pixel coordinates
    defocus_A: np.ndarray  # (N,)
    picks_px: np.ndarray  # (N, 2)
    box: int


def simulate(box: int, n_particles: int, n_tilts: int, pick_error_px: float, seed: int = 0) -> Series:
    """Render the clean tilt series (module docstring); noise is added per SNR by :func:`noisy_stack`."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    atoms = pseudo_atomic_model(box)
    angles = np.linspace(-60.0, 60.0, n_tilts)
    tilt_df = DEFOCUS_UM + rng.normal(0, 0.1, n_tilts)
    thickness = 0.75 * box
    n_cols = max(1, round(float(np.sqrt(n_particles / 2))))
    n_rows = -(-n_particles // n_cols)
    dx, dy = 1.6 * box, 1.05 * box
    margin = box + thickness
    nx, ny = int(n_cols * dx + 2 * margin), int(n_rows * dy + 2 * margin)
    cx, cy = (nx - 1) / 2, (ny - 1) / 2
    grid = np.stack(np.meshgrid((np.arange(n_cols) - (n_cols - 1) / 2) * dx,
                                (np.arange(n_rows) - (n_rows - 1) / 2) * dy), -1).reshape(-1, 2)[:n_particles]
    xyz = np.column_stack([grid + rng.uniform(-0.1, 0.1, grid.shape) * box,
                           rng.uniform(-thickness / 2, thickness / 2, n_particles)])
    prot = Rotation.random(n_particles, random_state=seed).as_matrix()
    tilt_rot = rotation_y(angles)
    p_idx, t_idx = (a.ravel() for a in np.meshgrid(np.arange(n_particles), np.arange(n_tilts), indexing="ij"))
    views = tilt_rot[t_idx] @ prot[p_idx]
    seen = np.einsum("nij,nj->ni", tilt_rot[t_idx], xyz[p_idx])
    positions = np.column_stack([cx + seen[:, 0], cy + seen[:, 1]])
    defocus = tilt_df[t_idx] * 1e4 - seen[:, 2] * PIXEL_A  # nearer the source: less underfocus
    size = box + 64  # room for the CTF's delocalisation at 2.5 µm
    clean = np.zeros((n_tilts, ny, nx), np.float32)
    corner = np.floor(positions).astype(int) - size // 2
    variances = []
    inner = slice(size // 2 - box // 2, size // 2 - box // 2 + box)
    for start in range(0, len(views), BATCH):
        sl = slice(start, min(len(views), start + BATCH))
        proj = render_projections(atoms, views[sl], size, positions[sl] - corner[sl])
        images = np.fft.irfft2(np.fft.rfft2(proj) * ctf_rfft(size, defocus[sl]), s=(size, size))
        variances.append(images[:, inner, inner].var(axis=(1, 2)))
        for img, (x0, y0), t in zip(images, corner[sl], t_idx[sl]):
            clean[t, y0:y0 + size, x0:x0 + size] += img
    picks = positions + rng.normal(0, pick_error_px, positions.shape)
    return Series(clean, float(np.mean(np.concatenate(variances))), render_volume(atoms, box), angles, tilt_df, xyz,
                  prot, views, positions, defocus, picks, box)


def noisy_stack(series: Series, snr: float, path: Path, seed: int = 1, tilt_shift_px: np.ndarray | None = None
                ) -> Path:
    """Write the clean stack plus white noise at ``snr`` to an MRC stack at ``path``; ``tilt_shift_px`` (T, 2; x, y)
    moves each clean tilt image first (Fourier shift: a stack misalignment)."""
    from scipy.ndimage import fourier_shift

    from napari_cspt2d.io.mrc import merge_images

    rng = np.random.default_rng(seed)
    sd = float(np.sqrt(series.signal_var / snr))

    def moved(t: int) -> np.ndarray:
        if tilt_shift_px is None:
            return series.clean[t]
        ft = fourier_shift(np.fft.fft2(series.clean[t]), tilt_shift_px[t, ::-1])
        return np.fft.ifft2(ft).real.astype(np.float32)

    images = (moved(t) + rng.normal(0, sd, series.clean.shape[1:]).astype(np.float32)
              for t in range(len(series.clean)))
    return merge_images(path, images, len(series.clean), PIXEL_A)


def track_set(series: Series, positions_px: np.ndarray, *, with_xyz: bool, angle_deg: np.ndarray | None = None,
              axis_deg: float = 0.0):
    """napari-cspt2d's TrackSet of the series: projections at ``positions_px``, true orientations, the true 3D
    positions (``with_xyz``) or zeros (the 2D-tracks situation), tilt angles ``angle_deg`` (default the true ones)."""
    from napari_cspt2d import geometry
    from napari_cspt2d.model.tracks import ParticleTable, TiltTable, TrackSet

    n_p, n_t = len(series.xyz_px), len(series.angles_deg)
    phi, theta, psi = geometry.matrix_to_euler(series.particle_rot)
    ids = np.arange(1, n_p + 1)
    tilts = TiltTable.from_angles(series.angles_deg if angle_deg is None else angle_deg,
                                  defocus_um=series.tilt_defocus_um, axis_deg=axis_deg)
    particles = ParticleTable(ids, series.xyz_px if with_xyz else np.zeros((n_p, 3)),
                              np.column_stack([psi, theta, phi]))
    pid, tid = np.repeat(ids, n_t), np.tile(np.arange(n_t), n_p)
    tracks = TrackSet.from_positions(pid, tid, positions_px, tilts, series.clean.shape[1:], particles=particles)
    return tracks


def check_conventions(series: Series) -> None:
    """The project's geometry must see the simulation's truth: projection matrices and positions of the true
    TrackSet equal the simulation's (else the comparison below would measure a convention mismatch)."""
    from napari_cspt2d import geometry

    truth = track_set(series, series.positions_px, with_xyz=True)
    e = truth.particles.euler_deg[truth.particle_rows()]
    mats = geometry.projection_matrices(e[:, 2], e[:, 1], e[:, 0], truth.tilts.angle_deg[truth.tilt_rows()])
    zero_shift = truth.with_particle_xyz(series.xyz_px, keep_positions=False)
    if not (np.allclose(mats, series.views, atol=1e-9)
            and np.allclose(zero_shift.positions_px(), series.positions_px, atol=1e-6)):
        raise RuntimeError("napari-cspt2d's geometry disagrees with the simulation's conventions")


# ------------------------------------------------------------------------------------------------ maps
def fsc_vs_truth(vol: np.ndarray, truth: np.ndarray) -> dict:
    """Mean masked FSC vs truth (shells 1..Nyquist), the masked FSC-0.143 resolution (Å) and the real-space
    correlation with the truth inside the mask (what the eye sees)."""
    from napari_cspt2d.recon.fsc import fsc_curve

    mask = truth_mask(truth)
    curve = fsc_curve(vol, truth, PIXEL_A, mask=mask)
    inside = mask > 0
    return {"mean_fsc": float(curve.fsc[1:].mean()), "fsc_0143_A": float(curve.resolution_A(0.143)),
            "corr": float(np.corrcoef((vol * mask)[inside], (truth * mask)[inside])[0, 1])}


def reconstruct_ours(stack_path: Path, tracks, box: int) -> dict[str, np.ndarray]:
    """The shipped map (``reconstruct_tracks``' path: HalfMapInsertion → finish), the same grids with
    ``shell_damping`` 0.5 and 0 (particle mask applied as shipped), and the voxel-wise unfiltered map."""
    from napari_cspt2d.io.mrc import open_stack
    from napari_cspt2d.recon.reconstruct import HalfMapInsertion, ReconstructionSettings, half_split

    stack, _ = open_stack(stack_path)
    settings = ReconstructionSettings(pixel_A=PIXEL_A, extract_box=box, particle_rad_A=0.4 * box * PIXEL_A,
                                      voltage_kV=VOLTAGE_KV, cs_mm=CS_MM, amp_contrast=AMP_CONTRAST)
    insertion = HalfMapInsertion(settings)
    try:
        insertion.insert(stack, tracks, half_split(tracks))
        shipped = insertion.finish()
        bp, mask = insertion.backprojector, settings.particle_mask()
        damped = {key: bp.reconstruct(fsc_mask=mask, shell_damping=d).full * mask
                  for key, d in (("sqrt", 0.5), ("unit", 0.0))}
        unfiltered = bp.reconstruct_single()
    finally:
        insertion.close()
    return {"shipped": shipped.map, **damped, "unfiltered": unfiltered, "half_map_fsc_0143_A": shipped.resolution_A}


def write_cryodrgn_inputs(stack_path: Path, tracks, series: Series, folder: Path) -> None:
    """The boxes napari-cspt2d inserts (same extraction, same rows), their poses and per-projection CTF, as
    cryoDRGN reads them."""
    from napari_cspt2d.io import cryodrgn
    from napari_cspt2d.io.mrc import merge_images, open_stack
    from napari_cspt2d.recon.extract import extract_particles

    stack, _ = open_stack(stack_path)
    box = series.box
    order, images = [], []
    for batch in extract_particles(stack, tracks, extract_box=box, extract_bin=1, particle_rad_A=0.4 * box * PIXEL_A,
                                   pixel_A=PIXEL_A, batch_size=256):
        order.append(batch.rows)
        images.append(batch.images)
    rows, images = np.concatenate(order), np.concatenate(images)
    merge_images(folder / "images.mrcs", iter(images), len(images), PIXEL_A)
    cryodrgn.write_poses(folder / "poses.pkl", series.views[rows], np.zeros((len(rows), 2)))
    params = np.zeros((len(rows), 9), np.float32)
    params[:, 0], params[:, 1] = box, PIXEL_A
    params[:, 2] = params[:, 3] = series.defocus_A[rows]
    params[:, 5], params[:, 6], params[:, 7] = VOLTAGE_KV, CS_MM, AMP_CONTRAST
    cryodrgn.write_ctf(folder / "ctf.pkl", params)


# ------------------------------------------------------------------------------------------------ refinement
def shift_error_px(tracks, truth_px: np.ndarray) -> float:
    """RMS per axis (stack px) of the projections' positions vs the true positions ``truth_px`` (N, 2)."""
    return float(np.sqrt(np.mean((tracks.positions_px() - truth_px) ** 2)))


def angle_error_deg(tracks, series: Series) -> float:
    """Median rotation angle (°) between the particles' orientations and the truth."""
    from napari_cspt2d import geometry
    from napari_cspt2d.recon.refine import rotation_angle_deg

    e = tracks.particles.euler_deg
    return float(np.median(rotation_angle_deg(geometry.euler_to_matrix(e[:, 2], e[:, 1], e[:, 0]),
                                              series.particle_rot)))


#: Our maps in the table, by key: column title.
VARIANTS = {"shipped": "ours shipped (Wiener)", "sqrt": "ours shell_damping 0.5", "unit": "ours unit gain",
            "unfiltered": "ours voxel-wise unfiltered"}

#: Refinement modes run by ``--refine``: pyp parameters on top of the seed's Option A settings.
MODES = {"free": {}, "constrained": {"csp_refine_micrographs": True, "csp_refine_particles": True},
         "constrained+transreg": {"csp_refine_micrographs": True, "csp_refine_particles": True, "csp_transreg": True}}


def refine(stack_path: Path, series: Series, folder: Path, tracks, mode: dict, iterations: int = 3):
    """Seed Option A (``csp_split`` from iteration 2, serial) for ``iterations`` iterations with the pyp parameters
    ``mode`` added, starting from ``tracks`` (2D picks, zero 3D coordinates); returns the refined tracks (with the
    refined tilt table)."""
    from napari_cspt2d import pyp

    box = series.box
    params = {"data_set": "fid", "data_mode": "tomo", "csp_no_3d_points": True, "csp_frame_refinement": True,
              "scope_pixel": PIXEL_A, "data_bin": 1, "extract_box": box, "extract_bin": 1,
              "particle_rad": 0.4 * box * PIXEL_A, "scope_voltage": VOLTAGE_KV, "scope_cs": CS_MM,
              "scope_wgh": AMP_CONTRAST, "refine_iter": 2, "refine_maxiter": 1 + iterations,
              "csp_RefineProjectionCutoff": 0.5, "csp_UseImagesForRefinementMin": -60,
              "csp_UseImagesForRefinementMax": 60, "refine_rhref": "20:16:12",
              "refine_projection_score_cutoff": 0.5,  # what the seed's cutoff 0.5 meant here before pyp's meaning
              **mode}
    pyp.create_project(folder, "fid", stack_path, tracks, params, angles=tracks.tilts)
    out = pyp.csp_split(pyp.load_parameters(folder), 2, project_dir=folder, serial=True)
    _, refined, _ = pyp.load_project(folder, "fid", out["iterations"][-1]["iteration"])
    return refined


def inject_geometry_errors(series: Series, seed: int = 5) -> tuple[np.ndarray, float, np.ndarray]:
    """Tilt-angle offsets of ±1° (random sign per tilt), a tilt-axis error of 1° and per-tilt image shifts of 3 px
    (random direction), the tilt nearest 0° exact: ``(angles given, axis given, image shift (T, 2))``."""
    rng = np.random.default_rng(seed)
    n_t = len(series.angles_deg)
    ref = int(np.argmin(np.abs(series.angles_deg)))
    offset = rng.choice([-1.0, 1.0], n_t)
    direction = rng.uniform(0, 2 * np.pi, n_t)
    shift = 3.0 * np.column_stack([np.cos(direction), np.sin(direction)])
    offset[ref], shift[ref] = 0.0, 0.0
    return series.angles_deg + offset, 1.0, shift


def _without_translation(per_tilt: np.ndarray, angles_deg: np.ndarray) -> np.ndarray:
    """Per-tilt shifts (T, 2) minus what one 3D translation of every particle explains (x: X cos t + Z sin t,
    y: Y): that part only moves the map."""
    t = np.deg2rad(angles_deg)
    basis = np.column_stack([np.cos(t), np.sin(t)])
    fit_x = basis @ np.linalg.lstsq(basis, per_tilt[:, 0], rcond=None)[0]
    return np.column_stack([per_tilt[:, 0] - fit_x, per_tilt[:, 1] - per_tilt[:, 1].mean()])


def geometry_left(refined, series: Series, truth_px: np.ndarray, given_angle: np.ndarray, given_axis: float,
                  tilt_shift: np.ndarray) -> dict:
    """How much of each injected error is left after refinement (1 = none recovered, 0 = all): the tilt angles'
    RMS error after removing the common offset (it only turns the map), the axis error, and the per-tilt mean
    position error without what a 3D translation explains, each over its injected size."""
    def rms(a: np.ndarray) -> float:
        return float(np.sqrt(np.mean(np.square(a))))

    def angle_rms(angle: np.ndarray) -> float:
        d = angle - series.angles_deg
        return rms(d - d.mean())

    err = refined.positions_px() - truth_px
    per_tilt = np.array([err[refined.tilt == t].mean(axis=0) for t in range(len(series.angles_deg))])
    return {"tilt_angle_left": angle_rms(refined.tilts.angle_deg) / angle_rms(given_angle),
            "tilt_axis_left": rms(refined.tilts.axis_deg) / given_axis,
            "tilt_shift_left": rms(_without_translation(per_tilt, series.angles_deg))
            / rms(_without_translation(tilt_shift, series.angles_deg))}


def refinement_rows(stack: Path, series: Series, folder: Path, snr: float, args: argparse.Namespace) -> dict:
    """Every mode from the picks, and (``--geometry-errors``) from a stack with per-tilt image shifts, picks that
    follow them and a wrong tilt table."""
    n_t = len(series.angles_deg)
    picks2d = track_set(series, series.picks_px, with_xyz=False)
    out: dict = {"shift_picks_px": shift_error_px(picks2d, series.positions_px)}
    if args.geometry_errors:
        angle, axis, tilt_shift = inject_geometry_errors(series)
        moved = tilt_shift[np.tile(np.arange(n_t), len(series.xyz_px))]
        shifted_stack = noisy_stack(series, snr, folder / "shifted.mrc", tilt_shift_px=tilt_shift)
        given = track_set(series, series.picks_px + moved, with_xyz=False, angle_deg=angle, axis_deg=axis)
    for name, mode in MODES.items():
        refined = refine(stack, series, folder / name, picks2d, mode)
        out[f"{name}_shift_px"] = shift_error_px(refined, series.positions_px)
        out[f"{name}_angle_deg"] = angle_error_deg(refined, series)
        if args.geometry_errors:
            refined_g = refine(shifted_stack, series, folder / f"{name}_geometry", given, mode)
            out.update({f"{name}_geometry_{k}": v for k, v in geometry_left(
                refined_g, series, series.positions_px + moved, angle, axis, tilt_shift).items()})
            out[f"{name}_geometry_shift_px"] = shift_error_px(refined_g, series.positions_px + moved)
    return out


# ------------------------------------------------------------------------------------------------ main
def run_box(box: int, snrs: list[float], args: argparse.Namespace, tmp: Path) -> list[dict]:
    started = time.perf_counter()
    series = simulate(box, args.particles, args.tilts, args.pick_error)
    check_conventions(series)
    print(f"box {box}: simulated {len(series.views)} projections in {time.perf_counter() - started:.0f} s",
          flush=True)
    picks = track_set(series, series.picks_px, with_xyz=True)
    rows = []
    for snr in snrs:
        folder = tmp / f"{box}_{snr:g}"
        folder.mkdir()
        stack = noisy_stack(series, snr, folder / "stack.mrc")
        ours = reconstruct_ours(stack, picks, box)
        row = {"box": box, "snr": snr, "half_map_fsc_0143_A": ours["half_map_fsc_0143_A"]}
        for key in VARIANTS:
            row.update({f"ours_{key}_{k}": v for k, v in fsc_vs_truth(ours[key], series.truth_map).items()})
        if args.cryodrgn_exe is not None:
            write_cryodrgn_inputs(stack, picks, series, folder)
            vol, _ = cryodrgn_backproject(folder, args.cryodrgn_exe)
            row.update({f"cryodrgn_{k}": v for k, v in fsc_vs_truth(vol, series.truth_map).items()})
        if args.refine and snr in args.refine_snrs and box == min(args.boxes):
            row.update(refinement_rows(stack, series, folder, snr, args))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    titles = " | ".join(VARIANTS.values())
    print(f"\n| box | SNR | {titles} | cryoDRGN | half-map FSC-0.143 Å |\n"
          "(each cell: mean masked FSC vs truth / masked FSC-0.143 Å / masked real-space correlation)")
    print("|---" * (len(VARIANTS) + 4) + "|")

    def cell(r: dict, key: str) -> str:
        return (f"{r[f'{key}_mean_fsc']:.3f} / {r[f'{key}_fsc_0143_A']:.1f} / {r[f'{key}_corr']:.3f}"
                if f"{key}_mean_fsc" in r else "-")

    for r in rows:
        cells = " | ".join(cell(r, f"ours_{key}") for key in VARIANTS)
        print(f"| {r['box']} | {r['snr']:g} | {cells} | {cell(r, 'cryodrgn')} | {r['half_map_fsc_0143_A']:.1f} |")
    refined = [r for r in rows if "free_shift_px" in r]
    if refined:
        print("\n| box | SNR | picks: RMS px per axis | mode | after 3 iterations: RMS px | median angle error ° | "
              "injected geometry left (fraction): tilt angle / axis / per-tilt shift | RMS px with injected geometry |")
        print("|---|---|---|---|---|---|---|---|")
        for r in refined:
            for name in MODES:
                geo = (f"{r[f'{name}_geometry_tilt_angle_left']:.2f} / {r[f'{name}_geometry_tilt_axis_left']:.2f} / "
                       f"{r[f'{name}_geometry_tilt_shift_left']:.2f} | {r[f'{name}_geometry_shift_px']:.2f}"
                       if f"{name}_geometry_tilt_angle_left" in r else "- | -")
                print(f"| {r['box']} | {r['snr']:g} | {r['shift_picks_px']:.2f} | {name} | "
                      f"{r[f'{name}_shift_px']:.2f} | {r[f'{name}_angle_deg']:.2f} | {geo} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="box 64, 24 particles × 31 tilts, SNR 1 and 0.01")
    parser.add_argument("--boxes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--snrs", type=float, nargs="+", default=[1.0, 0.1, 0.01, 0.001])
    parser.add_argument("--particles", type=int, default=50)
    parser.add_argument("--tilts", type=int, default=41)
    parser.add_argument("--pick-error", type=float, default=2.0, help="Gaussian pick error per axis (stack px)")
    parser.add_argument("--refine", action="store_true", help="free and constrained refinement (smallest box)")
    parser.add_argument("--refine-snrs", type=float, nargs="+", default=[0.1, 0.01])
    parser.add_argument("--geometry-errors", action="store_true", help="also refine with injected tilt errors")
    parser.add_argument("--cryodrgn", type=Path, default=CRYODRGN)
    parser.add_argument("--no-cryodrgn", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "fidelity.json")
    args = parser.parse_args()
    if args.quick:
        args.boxes, args.snrs, args.particles, args.tilts = [64], [1.0, 0.01], 24, 31
        args.refine_snrs = [0.01]
    args.cryodrgn_exe = None if args.no_cryodrgn or not args.cryodrgn.exists() else args.cryodrgn
    if args.cryodrgn_exe is None:
        print(f"cryoDRGN not run ({args.cryodrgn} missing or --no-cryodrgn)")
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_fidelity_") as tmp:
        for box in args.boxes:
            rows += run_box(box, args.snrs, args, Path(tmp))
    print_table(rows)
    from napari_cspt2d.io.atomic import atomic_open

    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "pixel_A": PIXEL_A, "defocus_um": DEFOCUS_UM, "particles": args.particles, "tilts": args.tilts,
            "pick_error_px": args.pick_error, "quick": args.quick, "seconds": time.perf_counter() - started,
            "load_avg_at_end": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
