"""Deterministic synthetic tilt series with ground truth, for tests, ``cspt2d sample OUT`` and napari's sample data.

The test object is a chiral cluster of isotropic 3D Gaussian blobs; copies of it sit at random positions and heights in
a slab, in random orientations, as particles do in a tomogram (:func:`slab_positions`). Its projections are rendered
*analytically* (a 3D Gaussian projects to a 2D Gaussian at the projected centre), which is independent of the
Fourier machinery in ``recon/``, so reconstructions can be checked against ``truth_map`` honestly. Each particle's box
gets the CTF at the particle's own defocus (tilt defocus minus its height along the beam), is pasted into the tilt
image (protein dark), and Gaussian noise is added at the requested SNR.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy.spatial.transform import Rotation

from .model.tracks import ParticleTable, TiltTable, TrackSet
from . import geometry
from .recon.ctf import ctf_2d

__all__ = ["Sample", "make_sample", "write_sample", "slab_positions", "blob_model", "render_map", "render_projections"]


@dataclass(frozen=True)
class BlobModel:
    """Gaussian blobs: ``centres_px`` (K, 3) as (x, y, z) relative to the box centre, ``sigma_px`` (K,),
    ``amplitude`` (K,) peak density."""

    centres_px: NDArray[np.float64]
    sigma_px: NDArray[np.float64]
    amplitude: NDArray[np.float64]


def blob_model(radius_px: float = 18.0, n_blobs: int = 14, seed: int = 7) -> BlobModel:
    """A fixed chiral object: a compact body, an arm along +x bending towards +y, and a knob at +z."""
    rng = np.random.default_rng(seed)
    body = rng.normal(0.0, 0.35 * radius_px, size=(n_blobs - 4, 3))
    arm = np.array([[0.55, 0.1, 0.0], [0.75, 0.3, 0.05], [0.85, 0.55, 0.1]]) * radius_px
    knob = np.array([[-0.2, -0.3, 0.8]]) * radius_px
    centres = np.concatenate([body, arm, knob])
    sigma = np.concatenate([rng.uniform(0.16, 0.26, n_blobs - 4), [0.12, 0.11, 0.10], [0.14]]) * radius_px
    amplitude = np.concatenate([rng.uniform(0.6, 1.0, n_blobs - 4), [1.0, 1.0, 1.2], [1.3]])
    return BlobModel(centres, sigma, amplitude)


def render_map(model: BlobModel, box: int) -> NDArray[np.float32]:
    """The model's density on a ``box``³ grid indexed ``[z, y, x]``, origin at voxel ``box // 2``."""
    r = np.arange(box, dtype=np.float64) - box // 2
    vol = np.zeros((box, box, box))
    for (cx, cy, cz), s, a in zip(model.centres_px, model.sigma_px, model.amplitude):
        gx = np.exp(-((r - cx) ** 2) / (2 * s * s))
        gy = np.exp(-((r - cy) ** 2) / (2 * s * s))
        gz = np.exp(-((r - cz) ** 2) / (2 * s * s))
        vol += a * gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
    return vol.astype(np.float32)


def render_projections(
    model: BlobModel, matrices: NDArray[np.float64], box: int, offsets_px: NDArray[np.float64] | None = None
) -> NDArray[np.float32]:
    """Analytic projections ``(B, box, box)`` of the model seen through rotation matrices ``(B, 3, 3)``.

    The model's origin lands at pixel ``box // 2 + offsets_px`` (``offsets_px`` (B, 2) as x, y; default 0)."""
    b = matrices.shape[0]
    offsets = np.zeros((b, 2)) if offsets_px is None else np.asarray(offsets_px, dtype=np.float64)
    centres = np.einsum("bij,kj->bki", matrices, model.centres_px)[..., :2] + offsets[:, None, :]  # (B, K, 2)
    r = np.arange(box, dtype=np.float64) - box // 2
    out = np.zeros((b, box, box))
    for k, (s, a) in enumerate(zip(model.sigma_px, model.amplitude)):
        weight = a * np.sqrt(2 * np.pi) * s
        gx = np.exp(-((r[None, :] - centres[:, k, 0:1]) ** 2) / (2 * s * s))  # (B, box)
        gy = np.exp(-((r[None, :] - centres[:, k, 1:2]) ** 2) / (2 * s * s))
        out += weight * gy[:, :, None] * gx[:, None, :]
    return out.astype(np.float32)


@dataclass(frozen=True, eq=False)
class Sample:
    """A synthetic tilt series: the stack, the picks a user would have, and the truth."""

    stack: NDArray[np.float32]  # (n_tilts, ny, nx), protein dark
    tracks: TrackSet  # picks with position error, zero 3D coordinates (the 2D-tracks situation)
    truth_tracks: TrackSet  # true 3D positions, zero shifts, true orientations
    truth_map: NDArray[np.float32]  # (box, box, box), protein positive
    model: BlobModel
    pixel_A: float
    params: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.params.get("data_set", "sample"))


def slab_positions(n_particles: int, shape_yx: tuple[int, int], box: int, thickness_px: float, max_tilt_deg: float,
                   rng: np.random.Generator) -> NDArray[np.float64]:
    """Particle centres ``(n, 3)`` as (x, y, z) px from the tomogram centre, as in a tomogram: uniformly random in a
    slab ``thickness_px`` thick, at least about a box apart (the spacing shrinks when they do not fit), and far
    enough from the edges that every box stays inside the images up to ``max_tilt_deg``."""
    ny, nx = shape_yx
    half_z = thickness_px / 2.0
    reach_x = max(nx / 2.0 - box / 2.0 - 2.0 - half_z * np.sin(np.deg2rad(abs(max_tilt_deg))), 1.0)
    reach_y = max(ny / 2.0 - box / 2.0 - 2.0, 1.0)
    spacing = 0.9 * box
    placed: list[NDArray[np.float64]] = []
    while len(placed) < n_particles:
        for _ in range(200):
            candidate = rng.uniform([-reach_x, -reach_y, -half_z], [reach_x, reach_y, half_z])
            if all(np.hypot(*(candidate[:2] - p[:2])) >= spacing for p in placed):
                placed.append(candidate)
                break
        else:
            spacing *= 0.9  # crowded: let them come closer
    return np.array(placed, dtype=np.float64).reshape(n_particles, 3)


def make_sample(
    *,
    n_particles: int = 40,
    n_tilts: int = 41,
    max_tilt_deg: float = 60.0,
    shape_yx: tuple[int, int] = (1024, 1024),
    box: int = 64,
    pixel_A: float = 4.0,
    defocus_um: float = 2.5,
    voltage_kV: float = 300.0,
    cs_mm: float = 2.7,
    amp_contrast: float = 0.07,
    dose_per_tilt: float = 3.0,
    snr: float = 0.5,
    pick_error_px: float = 2.0,
    thickness_px: float = 100.0,
    seed: int = 0,
) -> Sample:
    """Build a synthetic tilt series (about 2 s for the defaults: 40 particles × 41 tilts, 1k × 1k, box 64).

    ``snr`` is the ratio of signal variance (inside the particles' boxes) to noise variance; ``pick_error_px`` the
    standard deviation of the Gaussian error added to the true positions in ``tracks``."""
    rng = np.random.default_rng(seed)
    model = blob_model(radius_px=box * 0.28)
    tilts = TiltTable.from_angles(
        np.linspace(-max_tilt_deg, max_tilt_deg, n_tilts),
        defocus_um=defocus_um + rng.normal(0, 0.05, n_tilts),
        dose=dose_per_tilt,
    )
    ny, nx = shape_yx
    xyz = slab_positions(n_particles, shape_yx, box, thickness_px, max_tilt_deg, rng)
    phi, theta, psi = geometry.matrix_to_euler(Rotation.random(n_particles, random_state=seed).as_matrix())
    ids = np.arange(1, n_particles + 1)
    particles = ParticleTable(ids, xyz, np.column_stack([psi, theta, phi]))

    pid, tid = (a.ravel() for a in np.meshgrid(ids, tilts.id, indexing="ij"))
    n = pid.size
    truth = TrackSet(pid, tid, np.zeros((n, 2)), np.zeros(n), np.full(n, 100.0), particles, tilts, shape_yx)
    positions = truth.positions_px()
    prow, trow = truth.particle_rows(), truth.tilt_rows()
    euler = particles.euler_deg[prow]
    matrices = geometry.projection_matrices(euler[:, 2], euler[:, 1], euler[:, 0], tilts.angle_deg[trow],
                                            tilts.axis_deg[trow])
    height_A = truth.projected_px()[:, 2] * pixel_A
    defocus_A = tilts.defocus_um[trow] * 1e4 - height_A

    render_box = int(2 * box)
    corner = np.floor(positions).astype(np.int64) - render_box // 2  # (N, 2) x, y of the box's first pixel
    frac = positions - np.floor(positions)
    clean = np.zeros((tilts.id.size, ny, nx), np.float32)
    signal_var = []
    for start in range(0, n, 256):
        sl = slice(start, min(n, start + 256))
        proj = render_projections(model, matrices[sl], render_box, frac[sl])
        ctf = ctf_2d((render_box, render_box), pixel_A, defocus_A[sl], voltage_kV=voltage_kV, cs_mm=cs_mm,
                     amp_contrast=amp_contrast)
        images = np.fft.irfft2(np.fft.rfft2(proj) * ctf, s=(render_box, render_box)).astype(np.float32)
        for img, (cx, cy), t in zip(images, corner[sl], tid[sl]):
            x0, y0 = max(cx, 0), max(cy, 0)
            x1, y1 = min(cx + render_box, nx), min(cy + render_box, ny)
            if x1 > x0 and y1 > y0:
                clean[t, y0:y1, x0:x1] += img[y0 - cy:y1 - cy, x0 - cx:x1 - cx]
        signal_var.append(images[:, render_box // 4: -render_box // 4, render_box // 4: -render_box // 4].var())
    noise_sd = float(np.sqrt(np.mean(signal_var) / snr))
    stack = clean
    for t in range(stack.shape[0]):
        stack[t] += rng.normal(0.0, noise_sd, (ny, nx)).astype(np.float32)

    picks = positions + rng.normal(0.0, pick_error_px, positions.shape)
    tracks = TrackSet.from_positions(pid, tid, picks, tilts, shape_yx,
                                     particles=ParticleTable(ids, np.zeros((n_particles, 3)), particles.euler_deg))
    params = {
        "data_set": "sample", "data_mode": "tomo", "csp_no_3d_points": True, "csp_frame_refinement": True,
        "scope_pixel": pixel_A, "data_bin": 1, "extract_box": box, "extract_bin": 1,
        "particle_rad": float(box * 0.4 * pixel_A), "scope_voltage": voltage_kV, "scope_cs": cs_mm,
        "scope_wgh": amp_contrast, "scope_dose_rate": dose_per_tilt,
        # every exposure, in pyp's meaning (acquisition indices, -1 = up to the last): no notice on opening
        "csp_UseImagesForRefinementMin": 0, "csp_UseImagesForRefinementMax": -1, "refine_rhref": "20:16:12",
    }
    return Sample(stack, tracks, truth, render_map(model, box), model, pixel_A, params)


def write_sample(sample: Sample, out_dir: str | os.PathLike[str], name: str = "sample") -> dict[str, Path]:
    """Write ``sample`` as a pyp project in ``out_dir`` (see :func:`napari_cspt2d.pyp.create_project`) plus its
    ground truth: ``truth/{name}_truth.mrc`` (the map) and ``truth/{name}_truth_tracks.json`` (true 3D positions)."""
    from .io.mrc import write_map
    from .io.trackdata import write_track_data
    from .pyp import create_project

    params = dict(sample.params, data_set=name)
    paths = create_project(out_dir, name, sample.stack, sample.tracks, params, angles=sample.tracks.tilts)
    truth = Path(out_dir) / "truth"
    paths["truth_map"] = write_map(truth / f"{name}_truth.mrc", sample.truth_map, sample.pixel_A)
    paths["truth_tracks"] = write_track_data(truth / f"{name}_truth_tracks.json", sample.truth_tracks)
    return paths
