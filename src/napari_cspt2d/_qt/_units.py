"""pint's application registry (the units napari gives every layer) built off the GUI thread, without a race.

pint makes its application registry lazily: the first use of it turns the lazy object into a ``UnitRegistry`` and
only then fills it (0.15–0.4 s of Python). Another thread that uses it meanwhile finds it empty: napari raised
``UndefinedUnitError: 'pixel' is not defined`` for a layer made on the GUI thread while the cockpit's import thread
made the GL warm-up's stand-in layers (``benchmarks/gui.py``, which opens a stack as the cockpit opens).
:func:`load_unit_registry` builds a registry of its own in the calling thread and installs it as the application
registry while the lazy one is still untouched; every thread then finds it whole.
"""

from __future__ import annotations

import pint
from pint.registry import LazyRegistry

__all__ = ["load_unit_registry"]


def load_unit_registry() -> bool:
    """Make pint's application registry whole from this (background) thread; True if it installed one, False if the
    application's registry was already in use (then it is left alone: units of two registries do not compare)."""
    application = pint.get_application_registry()
    if not isinstance(application.get(), LazyRegistry):
        return False
    registry = pint.UnitRegistry(on_redefinition="raise")  # what the lazy registry becomes when first used
    if not isinstance(application.get(), LazyRegistry):  # another thread began using the lazy one meanwhile
        return False
    pint.set_application_registry(registry)
    return True
