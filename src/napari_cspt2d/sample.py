"""Deterministic synthetic tilt series with ground truth, for tests, ``cspt2d sample OUT`` and napari's sample data.

The test object is a chiral cluster of isotropic 3D Gaussian blobs; copies of it sit at random positions and heights in
a slab, in random orientations, as particles do in a tomogram (:func:`slab_positions`). Its projections are rendered
*analytically* (a 3D Gaussian projects to a 2D Gaussian at the projected centre), which is independent of the
Fourier machinery in ``recon/``, so reconstructions can be checked against ``truth_map`` honestly. Each particle's box
gets the CTF at the particle's own defocus (tilt defocus minus its height along the beam), is pasted into the tilt
image (protein dark), and Gaussian noise is added at the requested SNR.

A tilt image depends on nothing but the seed and its own section (:class:`SamplePlan`: each tilt draws its noise from
its own child of the seed's ``SeedSequence``; the noise level comes from the tilt shown first), so napari can show the
first tilt a tenth of a second after asking and have the others made in the background, in any order.
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
from .recon.ctf import ctf_params

__all__ = ["Sample", "SamplePlan", "make_sample", "write_sample", "first_tilt", "tilt_order", "slab_positions",
           "blob_model", "render_map", "render_projections"]


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


def _ctf_rfft(size: int, pixel_A: float, defocus_A: NDArray[np.float64], **optics: float) -> NDArray[np.float32]:
    """CTFs ``(B, size, size // 2 + 1)`` on the rfft grid of ``size``² images, one per defocus (Å): the expression of
    :func:`napari_cspt2d.recon.ctf.ctf_params`'s coefficients (no astigmatism) evaluated with numpy, so the sample
    needs no compiled kernel (its first tilt shows before any is compiled)."""
    c = ctf_params(defocus_A, **optics)[:, :, None, None]  # (B, 6, 1, 1)
    fy = np.fft.fftfreq(size, d=pixel_A)[:, None]
    fx = np.fft.rfftfreq(size, d=pixel_A)[None, :]
    s2 = fx * fx + fy * fy
    gamma = c[:, 0] * s2 + c[:, 1] * (c[:, 2] * (fx * fx - fy * fy) + c[:, 3] * 2.0 * fx * fy) + c[:, 4] * s2 * s2
    return np.sin(gamma - c[:, 5]).astype(np.float32)


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


def first_tilt(n_tilts: int) -> int:
    """The section napari shows first when a stack of ``n_tilts`` opens (its slider starts at the middle step)."""
    return int((n_tilts - 1) / 2)


def tilt_order(n_tilts: int) -> list[int]:
    """Sections from :func:`first_tilt` outwards (f, f+1, f-1, f+2, ...): the order a streamed sample is made in."""
    first = first_tilt(n_tilts)
    return sorted(range(n_tilts), key=lambda t: (abs(t - first), t < first))


class SamplePlan:
    """Everything of a sample but its images, which :meth:`render_tilt` makes one tilt at a time (in any order:
    each tilt's noise has its own random stream, so a tilt's image does not depend on which were made before).

    Arguments as :func:`make_sample`'s; made in milliseconds. :meth:`sample` assembles a :class:`Sample` from the
    stack."""

    def __init__(self, *, n_particles: int = 40, n_tilts: int = 41, max_tilt_deg: float = 60.0,
                 shape_yx: tuple[int, int] = (1024, 1024), box: int = 64, pixel_A: float = 4.0,
                 defocus_um: float = 2.5, voltage_kV: float = 300.0, cs_mm: float = 2.7, amp_contrast: float = 0.07,
                 dose_per_tilt: float = 3.0, snr: float = 0.5, pick_error_px: float = 2.0,
                 thickness_px: float = 100.0, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.model = blob_model(radius_px=box * 0.28)
        self.box, self.pixel_A, self.shape_yx = box, float(pixel_A), tuple(int(v) for v in shape_yx)
        self._ctf = {"voltage_kV": voltage_kV, "cs_mm": cs_mm, "amp_contrast": amp_contrast}
        tilts = TiltTable.from_angles(
            np.linspace(-max_tilt_deg, max_tilt_deg, n_tilts),
            defocus_um=defocus_um + rng.normal(0, 0.05, n_tilts),
            dose=dose_per_tilt,
        )
        xyz = slab_positions(n_particles, self.shape_yx, box, thickness_px, max_tilt_deg, rng)
        phi, theta, psi = geometry.matrix_to_euler(Rotation.random(n_particles, random_state=seed).as_matrix())
        ids = np.arange(1, n_particles + 1)
        particles = ParticleTable(ids, xyz, np.column_stack([psi, theta, phi]))

        pid, tid = (a.ravel() for a in np.meshgrid(ids, tilts.id, indexing="ij"))
        n = pid.size
        self.truth_tracks = TrackSet(pid, tid, np.zeros((n, 2)), np.zeros(n), np.full(n, 100.0), particles, tilts,
                                     self.shape_yx)
        positions = self.truth_tracks.positions_px()
        picks = positions + rng.normal(0.0, pick_error_px, positions.shape)
        self.tracks = TrackSet.from_positions(
            pid, tid, picks, tilts, self.shape_yx,
            particles=ParticleTable(ids, np.zeros((n_particles, 3)), particles.euler_deg))
        prow, trow = self.truth_tracks.particle_rows(), self.truth_tracks.tilt_rows()
        euler = particles.euler_deg[prow]
        self._matrices = geometry.projection_matrices(euler[:, 2], euler[:, 1], euler[:, 0], tilts.angle_deg[trow],
                                                      tilts.axis_deg[trow])
        self._defocus_A = tilts.defocus_um[trow] * 1e4 - self.truth_tracks.projected_px()[:, 2] * pixel_A
        self._render_box = int(2 * box)
        self._corner = np.floor(positions).astype(np.int64) - self._render_box // 2  # (N, 2) x, y of a box's corner
        self._frac = positions - np.floor(positions)
        self._tid = tid
        self._noise_seeds = np.random.SeedSequence(seed).spawn(n_tilts)
        # signal variance inside the boxes of the tilt shown first (what the user judges the noise against); its
        # boxes are kept for its image, which is asked for first
        self._first = (first_tilt(n_tilts), self._boxes(first_tilt(n_tilts)))
        middle = self._first[1][1]
        core = slice(self._render_box // 4, -(self._render_box // 4))
        self.noise_sd = float(np.sqrt(middle[:, core, core].var() / snr)) if len(middle) else 1.0
        self.params = {
            "data_set": "sample", "data_mode": "tomo", "csp_no_3d_points": True, "csp_frame_refinement": True,
            "scope_pixel": pixel_A, "data_bin": 1, "extract_box": box, "extract_bin": 1,
            "particle_rad": float(box * 0.4 * pixel_A), "scope_voltage": voltage_kV, "scope_cs": cs_mm,
            "scope_wgh": amp_contrast, "scope_dose_rate": dose_per_tilt,
            # every exposure, in pyp's meaning (acquisition indices, -1 = up to the last): no notice on opening
            "csp_UseImagesForRefinementMin": 0, "csp_UseImagesForRefinementMax": -1, "refine_rhref": "20:16:12",
        }

    @property
    def n_tilts(self) -> int:
        return int(self.tracks.tilts.id.size)

    def _boxes(self, section: int) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """The rows of tilt ``section`` and their CTF-filtered projections ``(n, 2 box, 2 box)`` (protein positive)."""
        rows = np.flatnonzero(self._tid == section)
        size = self._render_box
        proj = render_projections(self.model, self._matrices[rows], size, self._frac[rows])
        ctf = _ctf_rfft(size, self.pixel_A, self._defocus_A[rows], **self._ctf)
        return rows, np.fft.irfft2(np.fft.rfft2(proj) * ctf, s=(size, size)).astype(np.float32)

    def render_tilt(self, section: int) -> NDArray[np.float32]:
        """Tilt image ``section`` ``(ny, nx)``: its particles' CTF-filtered projections pasted in plus its noise."""
        ny, nx = self.shape_yx
        image = np.zeros((ny, nx), np.float32)
        rows, boxes = self._first[1] if section == self._first[0] else self._boxes(section)
        size = self._render_box
        for box, (cx, cy) in zip(boxes, self._corner[rows]):
            x0, y0 = max(cx, 0), max(cy, 0)
            x1, y1 = min(cx + size, nx), min(cy + size, ny)
            if x1 > x0 and y1 > y0:
                image[y0:y1, x0:x1] += box[y0 - cy:y1 - cy, x0 - cx:x1 - cx]
        noise = np.random.default_rng(self._noise_seeds[section]).standard_normal((ny, nx), dtype=np.float32)
        image += noise * np.float32(self.noise_sd)
        return image

    def sample(self, stack: NDArray[np.float32]) -> Sample:
        """The :class:`Sample` of this plan with its rendered ``stack`` ``(n_tilts, ny, nx)``."""
        return Sample(stack, self.tracks, self.truth_tracks, render_map(self.model, self.box), self.model,
                      self.pixel_A, dict(self.params))


def make_sample(**kwargs) -> Sample:
    """Build a synthetic tilt series (about 2 s for the defaults: 40 particles × 41 tilts, 1k × 1k, box 64).

    Arguments (:class:`SamplePlan`): ``n_particles``, ``n_tilts``, ``max_tilt_deg``, ``shape_yx``, ``box`` (px),
    ``pixel_A``, ``defocus_um``, ``voltage_kV``, ``cs_mm``, ``amp_contrast``, ``dose_per_tilt``, ``snr`` (the ratio
    of signal variance inside the boxes of the middle tilt to noise variance), ``pick_error_px`` (the standard
    deviation of the Gaussian error added to the true positions in ``tracks``), ``thickness_px``, ``seed`` (every
    random draw follows from it: the same seed gives the same sample, whatever order its tilts are made in)."""
    plan = SamplePlan(**kwargs)
    ny, nx = plan.shape_yx
    stack = np.empty((plan.n_tilts, ny, nx), np.float32)
    for section in range(plan.n_tilts):
        stack[section] = plan.render_tilt(section)
    return plan.sample(stack)


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
