"""napari widgets (the only package that imports Qt): the cockpit and its tabs.

The names are imported when first asked for, so that importing the cockpit (napari's plugin loader, on the GUI
thread) does not import every tab's module with it.
"""

from __future__ import annotations

import importlib

__all__ = ["Cockpit", "CurationWidget", "TiltSeriesLoader"]

_HOMES = {"Cockpit": ".cockpit", "CurationWidget": "._curation", "TiltSeriesLoader": "._loader"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name], __name__), name)
