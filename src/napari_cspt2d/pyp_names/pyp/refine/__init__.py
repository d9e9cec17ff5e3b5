"""pyp's ``pyp.refine``: see :mod:`napari_cspt2d.pyp_names`."""
