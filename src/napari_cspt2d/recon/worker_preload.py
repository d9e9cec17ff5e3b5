"""What local dask workers load before they are forked: importing this module runs :func:`warm_up`.

The fork server that local worker processes start from (:func:`napari_cspt2d.cluster.WORKER_PRELOAD`) imports it
once. Every worker forked from it then starts with the pipeline imported and its numba kernels loaded, instead of
each worker paying that (about 1 s on 2 cores) in its first job. Nothing else imports it. A warm-up that fails only
warns: the server must still start, and the workers then load the kernels in their first job.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..model.tracks import ParticleTable, TiltTable, TrackSet
from . import refine
from .backproject import Projector
from .pipeline import use_one_thread
from .reconstruct import HalfMapInsertion, ReconstructionSettings

__all__ = ["warm_up"]


def warm_up() -> None:
    """Insert and refine a tiny random tilt series (2 particles × 3 tilts, box 16) the way a bundle job does, single
    threaded (a process that forks must not hold threads), so that every kernel a job calls is compiled or loaded
    from numba's cache with the argument types the jobs use."""
    use_one_thread()
    rng = np.random.default_rng(0)
    box, size, pixel_A, radius_A = 16, 64, 4.0, 24.0
    tilts = TiltTable.from_angles([-30.0, 0.0, 30.0], defocus_um=2.0, dose=3.0)
    particles = ParticleTable(np.array([0, 1]), np.array([[-8.0, 0.0, 0.0], [8.0, 4.0, 0.0]]),
                              np.array([[0.0, 30.0, 0.0], [90.0, 60.0, 10.0]]))
    tracks = TrackSet(np.repeat([0, 1], 3), np.tile(tilts.id, 2), rng.normal(size=(6, 2)), np.zeros(6), np.ones(6),
                      particles, tilts, (size, size))
    stack = rng.normal(size=(3, size, size)).astype(np.float32)
    insertion = HalfMapInsertion(ReconstructionSettings(pixel_A=pixel_A, extract_box=box, extract_bin=1,
                                                        particle_rad_A=radius_A, dose_weighting=True))
    try:
        insertion.insert(stack, tracks, np.repeat([0, 1], 3))
        volume = insertion.finish().map
    finally:
        insertion.close()
    imaging = refine.Imaging(box, 1, pixel_A, radius_A, dose_weighting=True)
    refine.refine_tracks(stack, tracks, Projector(volume), refine.RefineOptions(resolution_A=10.0), imaging)


try:
    warm_up()
except Exception as exc:  # noqa: BLE001 - an optimisation: never keep the workers from starting
    warnings.warn(f"the workers' warm-up failed ({type(exc).__name__}: {exc}); they load the kernels in their first "
                  "job instead", RuntimeWarning, stacklevel=1)
