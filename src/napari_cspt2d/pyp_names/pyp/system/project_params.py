"""pyp's ``pyp.system.project_params`` loaders of ``.pyp_config.toml`` (napari-cspt2d, not nextPYP; see
:mod:`napari_cspt2d.pyp_names`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from napari_cspt2d.model.params import PypParameters
from napari_cspt2d.pyp import load_parameters, save_parameters

__all__ = ["load_pyp_parameters", "save_pyp_parameters"]


def load_pyp_parameters(path: str | os.PathLike[str] = ".") -> PypParameters:
    """The ``.pyp_config.toml`` of the project folder ``path`` (default: the current folder), validated."""
    return load_parameters(path)


def save_pyp_parameters(parameters: Mapping[str, Any], path: str | os.PathLike[str] = ".") -> Path:
    """Write ``parameters`` as ``.pyp_config.toml`` in the project folder ``path``, atomically."""
    return save_parameters(parameters, path)
