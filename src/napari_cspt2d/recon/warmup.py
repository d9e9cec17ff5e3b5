"""Compile or load the numba kernels before the first run needs them: :func:`warm_kernels`.

A new install otherwise spends 15-25 s compiling before the first insertion or refinement moves. Two callers:

* the fork server of local dask workers (:mod:`.worker_preload`) runs it single-threaded once, so every worker
  forked from it starts with the kernels loaded;
* the cockpit runs ``python -m napari_cspt2d.recon.warmup`` in a child process when it opens: compiling there fills
  numba's on-disk cache (every kernel is ``cache=True``) without holding the GUI process's interpreter lock; the GUI
  process then only loads the cached kernels, in a worker thread, when the child is done. The child runs at a
  lower priority (:data:`CHILD_NICENESS`) so that, on a machine with few cores, the window's process wins them.
  It compiles in :data:`PIECES` (the reconstruction's kernels first: about half of the compile time) and prints
  each piece's name once it is in the cache, so that a first Reconstruct can start before the refinement's kernels
  are compiled.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from ..model.tracks import ParticleTable, TiltTable, TrackSet
from . import refine
from .backproject import Projector
from .reconstruct import HalfMapInsertion, ReconstructionSettings

__all__ = ["CHILD_NICENESS", "PIECES", "tiny_tracks", "warm_kernels", "warm_reconstruction", "warm_refinement"]

#: The child's scheduling niceness once its imports are done: the lowest (``os.nice`` stops at 19), so its
#: compiling yields the cores to the window. The cockpit sets the child to niceness 10 when it starts it
#: (:data:`napari_cspt2d._qt._warmup.CHILD_NICENESS`), and the child's own step of 10 took it to 19, which is
#: what was measured. At 10, the cockpit's opening stalled 144-154 ms in 2 of 3 first-session runs
#: (``benchmarks/gui.py``), against 60-64 ms in 2 of 3 at 19.
CHILD_NICENESS = 19


def tiny_tracks(rng: np.random.Generator, size: int = 64) -> TrackSet:
    """2 particles × 3 tilts (−30, 0, 30°) on ``size`` × ``size`` px images, small random shifts: the smallest track
    set that runs through every kernel."""
    tilts = TiltTable.from_angles([-30.0, 0.0, 30.0], defocus_um=2.0, dose=3.0)
    particles = ParticleTable(np.array([0, 1]), np.array([[-8.0, 0.0, 0.0], [8.0, 4.0, 0.0]]),
                              np.array([[0.0, 30.0, 0.0], [90.0, 60.0, 10.0]]))
    return TrackSet(np.repeat([0, 1], 3), np.tile(tilts.id, 2), rng.normal(size=(6, 2)), np.zeros(6), np.ones(6),
                    particles, tilts, (size, size))


#: The pieces the kernels are warmed in, in order; each includes the ones before it.
PIECES = ("reconstruct", "refine")


def warm_reconstruction() -> tuple[np.ndarray, TrackSet, np.ndarray]:
    """Insert a tiny random tilt series (2 particles × 3 tilts, box 16) the way a bundle job and a reconstruction do
    (:class:`HalfMapInsertion`), so that every kernel they call is compiled or loaded from numba's cache with the
    argument types of a run; ``(stack, tracks, map)`` for :func:`warm_refinement`."""
    rng = np.random.default_rng(0)
    tracks = tiny_tracks(rng, _SIZE)
    stack = rng.normal(size=(3, _SIZE, _SIZE)).astype(np.float32)
    insertion = HalfMapInsertion(ReconstructionSettings(pixel_A=_PIXEL_A, extract_box=_BOX, extract_bin=1,
                                                        particle_rad_A=_RADIUS_A, dose_weighting=True))
    try:
        insertion.insert(stack, tracks, np.repeat([0, 1], 3))
        volume = insertion.finish().map
    finally:
        insertion.close()
    return stack, tracks, volume


def warm_refinement() -> None:
    """:func:`warm_reconstruction`, then refine its tracks against its map (:func:`refine.refine_tracks`)."""
    stack, tracks, volume = warm_reconstruction()
    imaging = refine.Imaging(_BOX, 1, _PIXEL_A, _RADIUS_A, dose_weighting=True)
    refine.refine_tracks(stack, tracks, Projector(volume), refine.RefineOptions(resolution_A=10.0), imaging)


def warm_kernels(piece: str = "refine") -> None:
    """Compile or load the kernels a reconstruction needs (``piece="reconstruct"``) or every kernel (``"refine"``)."""
    if piece not in PIECES:
        raise ValueError(f"piece {piece!r} is not one of {PIECES}")
    if piece == "reconstruct":
        warm_reconstruction()
    else:
        warm_refinement()


_BOX, _SIZE, _PIXEL_A, _RADIUS_A = 16, 64, 4.0, 24.0


if __name__ == "__main__":  # pragma: no cover - run by the cockpit in a child process
    if hasattr(os, "nice"):
        os.nice(CHILD_NICENESS)
    for name in PIECES:  # each piece's line tells the cockpit it can load that piece from the cache
        warm_kernels(name)
        print(name, flush=True)
    sys.exit(0)
