"""pyp's ``pyp.inout.metadata``: see :mod:`napari_cspt2d.pyp_names`."""
