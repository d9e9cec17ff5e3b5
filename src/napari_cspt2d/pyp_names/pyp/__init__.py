"""The names of nextPYP's ``pyp`` package that the seed's scripts import, implemented by napari-cspt2d (not nextPYP;
see :mod:`napari_cspt2d.pyp_names`)."""
