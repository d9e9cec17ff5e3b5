"""pyp's ``pyp.refine.csp.particle_cspt`` as the seed uses it, from :mod:`napari_cspt2d.pyp` (napari-cspt2d, not
nextPYP; see :mod:`napari_cspt2d.pyp_names`)."""

from napari_cspt2d.pyp import (create_cistem_from_2d_tracks, prepare_particle_cspt, run_reconstruction,
                               sort_particles_regions)

__all__ = ["create_cistem_from_2d_tracks", "prepare_particle_cspt", "run_reconstruction", "sort_particles_regions"]
