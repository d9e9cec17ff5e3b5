"""napari-cspt2d: constrained single-particle tomography from 2D tilt-series tracks, in napari and headless.

The core (``model``, ``io``, ``recon``, ``pyp``, ``cli``) never imports Qt or napari; ``_qt`` holds the dock widgets.
"""

from .errors import CsptError, CsptInputError, CsptRunError
from .model.tracks import ParticleTable, TiltTable, TrackSet

__version__ = "0.1.0"
__all__ = ["CsptError", "CsptInputError", "CsptRunError", "ParticleTable", "TiltTable", "TrackSet", "__version__"]
