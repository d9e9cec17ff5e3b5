"""The seed's ``track_data`` dict on disk, as JSON (``.json``) or pickle (``.pkl``/``.pickle``); writes are atomic.

Both hold the dict of :meth:`TrackSet.to_track_data` (``particles``, ``tilts``, ``projections``; shifts in tilt-stack
pixels, defocus in µm) plus ``image_shape_yx`` when the TrackSet knows it. JSON object keys are strings, so particle
and tilt ids are written as ``"1"`` and turned back into ints on reading; JSON files also carry ``"format"`` and
``"version"``. Pickles are the plain dict a seed script would ``pickle.dump`` and are read with the restricted
unpickler (:mod:`napari_cspt2d.io.safe_pickle`). Floats round-trip exactly in both formats.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CsptInputError
from ..model.tracks import TrackSet
from .atomic import atomic_open
from .safe_pickle import safe_load

__all__ = ["FORMAT", "write_track_data", "read_track_dict", "read_track_data"]

FORMAT = "napari-cspt2d track_data"
_VERSION = 1
_JSON, _PICKLE = (".json",), (".pkl", ".pickle")


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in _JSON:
        return "json"
    if suffix in _PICKLE:
        return "pickle"
    raise CsptInputError(f"has suffix {path.suffix!r}", file=path, expected="a .json, .pkl or .pickle file")


def write_track_data(path: str | os.PathLike[str], tracks: TrackSet | Mapping[str, Any]) -> Path:
    """Write a :class:`TrackSet` (or a seed ``track_data`` dict, which is checked first) as JSON or pickle,
    chosen by the suffix of ``path``, atomically."""
    path = Path(path)
    kind = _kind(path)
    try:
        ts = tracks if isinstance(tracks, TrackSet) else TrackSet.from_track_data(tracks)
    except CsptInputError as exc:
        raise CsptInputError(exc.reason, file=path, field=exc.field, expected=exc.expected) from None
    data: dict[str, Any] = ts.to_track_data()
    if ts.image_shape_yx is not None:
        data["image_shape_yx"] = list(ts.image_shape_yx)
    if kind == "pickle":
        with atomic_open(path, "wb") as fh:
            pickle.dump(data, fh, protocol=4)
        return path
    document = {
        "format": FORMAT,
        "version": _VERSION,
        **data,
        "particles": {str(k): v for k, v in data["particles"].items()},
        "tilts": {str(k): v for k, v in data["tilts"].items()},
    }
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(document, fh, allow_nan=False, indent=1)
        fh.write("\n")
    return path


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict; a key given twice raises (json would silently keep the last one)."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"key {reprlib.repr(key)} appears twice in one object")
        data[key] = value
    return data


def _int_keys(table: Any, name: str, path: Path) -> dict[int, Any]:
    if not isinstance(table, Mapping):
        raise CsptInputError(f"is a {type(table).__name__}", file=path, field=name, expected="an object {id: {...}}")
    out = {}
    for key, value in table.items():
        if isinstance(key, str) and not re.fullmatch(r"-?\d{1,18}", key):
            raise CsptInputError(f"has key {reprlib.repr(key)}", file=path, field=name, expected="integer ids")
        if isinstance(key, bool) or not isinstance(key, (int, str)) or not -(2**63) <= int(key) < 2**63:
            raise CsptInputError(f"has a key of type {type(key).__name__} that is not an int64", file=path,
                                 field=name, expected="integer ids")
        if int(key) in out:
            raise CsptInputError(f"has id {int(key)} twice", file=path, field=name, expected="unique ids")
        out[int(key)] = value
    return out


def read_track_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a track-data file (JSON or pickle by suffix) into the seed's dict, with integer particle and tilt ids."""
    path = Path(path)
    kind = _kind(path)
    if not path.is_file():
        raise CsptInputError("does not exist", file=path, expected="a track-data file")
    if kind == "pickle":
        data = safe_load(path)
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constants,
                              object_pairs_hook=_unique_keys)
        except (json.JSONDecodeError, ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise CsptInputError(f"is not valid JSON ({exc})", file=path, field="json") from None
        if isinstance(data, dict) and "format" in data and data.get("format") != FORMAT:
            raise CsptInputError(f"has format {reprlib.repr(data.get('format'))}", file=path, field="format",
                                 expected=repr(FORMAT))
    if not isinstance(data, dict):
        raise CsptInputError(f"holds a {type(data).__name__}", file=path, field="track_data",
                             expected="a dict with 'particles', 'tilts' and 'projections'")
    data = {k: v for k, v in data.items() if k not in ("format", "version")}
    for name in ("particles", "tilts"):
        if name in data:
            data[name] = _int_keys(data[name], name, path)
    return data


def read_track_data(path: str | os.PathLike[str], image_shape_yx: tuple[int, int] | None = None) -> TrackSet:
    """Read a track-data file into a :class:`TrackSet`; ``image_shape_yx`` defaults to the one stored in the file."""
    data = read_track_dict(path)
    shape = image_shape_yx if image_shape_yx is not None else data.get("image_shape_yx")
    try:
        return TrackSet.from_track_data(data, None if shape is None else tuple(shape))
    except (CsptInputError, TypeError) as exc:
        reason = exc.reason if isinstance(exc, CsptInputError) else str(exc)
        raise CsptInputError(reason, file=path, field=getattr(exc, "field", "image_shape_yx"),
                             expected=getattr(exc, "expected", None)) from None
