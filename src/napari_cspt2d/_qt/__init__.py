"""napari dock widgets (the only package that imports Qt): tilt-series loader and tracks curation."""

from ._curation import CurationWidget
from ._loader import TiltSeriesLoader

__all__ = ["CurationWidget", "TiltSeriesLoader"]
