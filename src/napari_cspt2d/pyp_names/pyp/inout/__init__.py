"""pyp's ``pyp.inout``: see :mod:`napari_cspt2d.pyp_names`."""
