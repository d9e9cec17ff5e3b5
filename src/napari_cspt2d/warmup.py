"""Compile or load the numba kernels before the first run needs them: :func:`warm_kernels`.

The first Reconstruct of a new install otherwise spends 15-25 s compiling before its progress moves. The cockpit runs
``python -m napari_cspt2d.warmup`` in a child process when it opens: compiling there fills numba's on-disk cache
(every kernel is ``cache=True``) without holding the GUI process's interpreter lock; the GUI process then only loads
the cached kernels, in a worker thread, when the child is done.
"""

from __future__ import annotations

import sys

__all__ = ["warm_kernels"]


def warm_kernels() -> None:
    """Reconstruct and refine a tiny synthetic tilt series (2 particles × 3 tilts, box 16) through the public
    functions a run calls, so that every kernel is compiled (or loaded from numba's cache) with a run's types."""
    from .model.settings import Settings
    from .recon import arguments
    from .recon.backproject import Projector
    from .recon.reconstruct import reconstruct_tracks
    from .recon.refine import RefineOptions, refine_tracks
    from .sample import make_sample

    sample = make_sample(n_particles=2, n_tilts=3, shape_yx=(64, 64), box=16, thickness_px=4.0, snr=10.0)
    settings = Settings.parse(sample.params)
    result = reconstruct_tracks(sample.stack, sample.tracks, **arguments.reconstruction_options(settings))
    refine_tracks(sample.stack, sample.tracks, Projector(result.map), RefineOptions(resolution_A=20.0),
                  arguments.imaging(settings))


if __name__ == "__main__":  # pragma: no cover - run by the cockpit in a child process
    warm_kernels()
    sys.exit(0)
