"""pyp's ``pyp.inout.image``: see :mod:`napari_cspt2d.pyp_names`."""
