"""``python -m napari_cspt2d.pyp_names`` prints the folder that serves pyp's module names (for ``PYTHONPATH``)."""

from napari_cspt2d.pyp_names import PATH

print(PATH)
