"""``.pyp_config.toml``: load and save a project's :class:`~napari_cspt2d.model.params.PypParameters` (atomic).

The file is a flat TOML table of ``key = value`` lines, as pyp writes it. Loading validates every key (unknown keys
raise with the closest valid name unless ``strict=False``, which keeps other pyp keys and writes them back).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from ..errors import CsptInputError
from ..model.params import PypParameters
from .atomic import atomic_open

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["CONFIG_NAME", "load_params", "save_params"]

CONFIG_NAME = ".pyp_config.toml"


def _config_path(path: str | os.PathLike[str]) -> Path:
    """``path`` itself, or ``path/.pyp_config.toml`` when ``path`` is a folder."""
    path = Path(path)
    return path / CONFIG_NAME if path.is_dir() else path


def load_params(path: str | os.PathLike[str], *, strict: bool = True, allow_unknown: bool = False) -> PypParameters:
    """Read ``.pyp_config.toml`` (the file or the project folder holding it) into validated parameters (``strict``
    and ``allow_unknown`` as in :class:`PypParameters`)."""
    path = _config_path(path)
    if not path.is_file():
        raise CsptInputError("does not exist", file=path, expected=f"a {CONFIG_NAME} parameter file")
    try:
        with open(path, "rb") as fh:
            values = tomllib.load(fh)
    except UnicodeDecodeError as exc:
        raise CsptInputError("is not UTF-8 text", file=path, field="toml") from exc
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError, integers beyond 4300 digits, deep nesting
        raise CsptInputError(f"is not valid TOML ({type(exc).__name__}: {exc})", file=path, field="toml") from exc
    return PypParameters(values, strict=strict, source=path, allow_unknown=allow_unknown)


def _plain(value: Any) -> Any:
    """TOML-writable copy: None dropped (as pyp's writer does), numpy scalars to Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def save_params(params: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Validate ``params`` (a mapping or :class:`PypParameters`) and write it as ``.pyp_config.toml``, atomically.

    ``path`` is the file or a project folder. Returns the path written."""
    if isinstance(params, PypParameters):
        params.validate()
        values = params.to_dict()
    else:
        values = PypParameters(params).to_dict()
    path = _config_path(path)
    try:
        text = tomli_w.dumps(_plain(values))
    except TypeError as exc:
        raise CsptInputError(f"cannot be written as TOML ({exc})", file=path, field="parameters") from exc
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path
