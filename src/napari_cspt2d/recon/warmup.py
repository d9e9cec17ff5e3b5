"""Compile or load the numba kernels before the first run needs them: :func:`warm_kernels`.

A new install otherwise spends 15-25 s compiling before the first insertion or refinement moves. Two callers:

* the fork server of local dask workers (:mod:`.worker_preload`) runs it single-threaded once, so every worker
  forked from it starts with the kernels loaded;
* the cockpit runs ``python -m napari_cspt2d.recon.warmup`` in a child process when it opens: compiling there fills
  numba's on-disk cache (every kernel is ``cache=True``) without holding the GUI process's interpreter lock; the GUI
  process then only loads the cached kernels, in a worker thread, when the child is done. The child runs at a
  lower priority (:data:`CHILD_NICENESS`) so that, on a machine with few cores, the window's process wins them.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from ..model.tracks import ParticleTable, TiltTable, TrackSet
from . import refine
from .backproject import Projector
from .reconstruct import HalfMapInsertion, ReconstructionSettings

__all__ = ["CHILD_NICENESS", "tiny_tracks", "warm_kernels"]

#: How much lower the child's scheduling priority is than the window's (``os.nice``).
CHILD_NICENESS = 10


def tiny_tracks(rng: np.random.Generator, size: int = 64) -> TrackSet:
    """2 particles × 3 tilts (−30, 0, 30°) on ``size`` × ``size`` px images, small random shifts: the smallest track
    set that runs through every kernel."""
    tilts = TiltTable.from_angles([-30.0, 0.0, 30.0], defocus_um=2.0, dose=3.0)
    particles = ParticleTable(np.array([0, 1]), np.array([[-8.0, 0.0, 0.0], [8.0, 4.0, 0.0]]),
                              np.array([[0.0, 30.0, 0.0], [90.0, 60.0, 10.0]]))
    return TrackSet(np.repeat([0, 1], 3), np.tile(tilts.id, 2), rng.normal(size=(6, 2)), np.zeros(6), np.ones(6),
                    particles, tilts, (size, size))


def warm_kernels() -> None:
    """Insert and refine a tiny random tilt series (2 particles × 3 tilts, box 16) the way a bundle job and a
    reconstruction do (:class:`HalfMapInsertion`, :func:`refine.refine_tracks`), so that every kernel they call is
    compiled or loaded from numba's cache with the argument types of a run."""
    rng = np.random.default_rng(0)
    box, size, pixel_A, radius_A = 16, 64, 4.0, 24.0
    tracks = tiny_tracks(rng, size)
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


if __name__ == "__main__":  # pragma: no cover - run by the cockpit in a child process
    if hasattr(os, "nice"):
        os.nice(CHILD_NICENESS)
    warm_kernels()
    sys.exit(0)
