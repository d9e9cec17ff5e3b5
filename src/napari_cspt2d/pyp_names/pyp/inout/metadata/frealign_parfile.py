"""pyp's ``pyp.inout.metadata.frealign_parfile``: :class:`napari_cspt2d.pyp.Parameters` (napari-cspt2d, not
nextPYP; see :mod:`napari_cspt2d.pyp_names`)."""

from napari_cspt2d.pyp import Parameters

__all__ = ["Parameters"]
