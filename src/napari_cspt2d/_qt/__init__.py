"""napari widgets (the only package that imports Qt): the cockpit and its tabs."""

from ._curation import CurationWidget
from ._loader import TiltSeriesLoader
from .cockpit import Cockpit

__all__ = ["Cockpit", "CurationWidget", "TiltSeriesLoader"]
