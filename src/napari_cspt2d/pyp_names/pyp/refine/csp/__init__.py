"""pyp's ``pyp.refine.csp``: see :mod:`napari_cspt2d.pyp_names`."""
