"""pyp's ``pyp_main`` as the seed's Option A uses it: :func:`napari_cspt2d.pyp.csp_split` (napari-cspt2d, not
nextPYP; see :mod:`napari_cspt2d.pyp_names`)."""

from napari_cspt2d.pyp import csp_split

__all__ = ["csp_split"]
