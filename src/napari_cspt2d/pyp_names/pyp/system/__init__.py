"""pyp's ``pyp.system``: see :mod:`napari_cspt2d.pyp_names`."""
