"""``{name}.pkl``: the tilt-series metadata pickle of a pyp project, written and read safely.

Content (plain Python containers only, so that :func:`~napari_cspt2d.io.safe_pickle.safe_load` can read it)::

    {"mode": "tomo",
     "tomo": {"x": [width_px], "y": [height_px], "z": [n_tilts]},   # the seed's layout (z = number of tilts)
     "frames": [...],                                               # frame list (may be empty)
     # when a tilt table is given:
     "tlt": [angle_deg, ...], "order": [...], "tilt_ids": [...], "defocus_um": [...], "axis_deg": [...],
     "dose": [...],
     ...extra keys}

Sizes are tilt-stack (unbinned) pixels. pyp itself stores pandas DataFrames in this file (``metadata["tomo"].at[0,
"x"]``); those pickles are refused by the safe reader, and pyp reading ours needs the seed's plain-dict layout.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CsptInputError
from ..model.tracks import TiltTable
from .atomic import atomic_open
from .safe_pickle import safe_load

__all__ = ["write_metadata", "read_metadata", "read_metadata_tilts", "metadata_shape"]

_TILT_KEYS = ("tlt", "order", "tilt_ids", "defocus_um", "axis_deg", "dose")
_RESERVED = ("mode", "tomo", "frames") + _TILT_KEYS


def _missing(path: Path, what: str) -> CsptInputError:
    """The seed's "Metadata is required" error; its message starts with those words and names file and gap."""
    exc = CsptInputError(f"Metadata is required: {path} {what}",
                         expected="{'tomo': {'x': [width], 'y': [height], 'z': [n_tilts]}}")
    exc.file, exc.field = os.fspath(path), "tomo"  # set after construction: the message keeps the seed's start
    return exc


def _check_plain(value: Any, where: str, path: Path) -> None:
    """Refuse anything the safe reader could not load back."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_plain(k, where, path)
            _check_plain(v, f"{where}.{k}", path)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]", path)
    elif not isinstance(value, (str, bytes, int, float, complex, bool, type(None), np.ndarray, np.generic)):
        raise CsptInputError(f"is a {type(value).__name__}", file=path, field=where,
                             expected="plain dicts, lists, numbers, strings or numpy arrays")


def write_metadata(
    path: str | os.PathLike[str],
    width: int,
    height: int,
    n_tilts: int,
    frames: Sequence[Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    *,
    tilts: TiltTable | None = None,
) -> Path:
    """Write ``{name}.pkl`` atomically: image ``width``/``height`` (px), ``n_tilts``, the frame list, and (if given)
    the tilt table (angles, order, ids, defocus, axis, dose). ``extra`` adds keys; it may not replace ours."""
    path = Path(path)
    for value, name in ((width, "width"), (height, "height"), (n_tilts, "n_tilts")):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise CsptInputError(f"is {value!r}", file=path, field=name, expected="a positive integer")
    data: dict[str, Any] = {
        "mode": "tomo",
        "tomo": {"x": [int(width)], "y": [int(height)], "z": [int(n_tilts)]},
        "frames": list(frames) if frames is not None else [],
    }
    if tilts is not None:
        data.update({"tlt": tilts.angle_deg.tolist(), "order": tilts.order.tolist(), "tilt_ids": tilts.id.tolist(),
                     "defocus_um": tilts.defocus_um.tolist(), "axis_deg": tilts.axis_deg.tolist(),
                     "dose": tilts.dose.tolist()})
    if extra:
        clash = [k for k in extra if k in _RESERVED]
        if clash:
            raise CsptInputError(f"would replace {', '.join(clash)}", file=path, field="extra",
                                 expected=f"keys other than {', '.join(_RESERVED)}")
        data.update(extra)
    _check_plain(data, "metadata", path)
    with atomic_open(path, "wb") as fh:
        pickle.dump(data, fh, protocol=4)
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``{name}.pkl`` with the safe unpickler and check its ``tomo`` sizes.

    A missing file, or a missing/incomplete ``tomo`` entry, raises :class:`CsptInputError` whose message starts with
    "Metadata is required" and says what is missing."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path, "does not exist")
    data = safe_load(path)
    if not isinstance(data, dict):
        raise _missing(path, f"holds a {type(data).__name__}, not a dict")
    tomo = data.get("tomo")
    if not isinstance(tomo, Mapping):
        raise _missing(path, "has no 'tomo' entry")
    gaps = [axis for axis in "xyz" if _first_positive_int(tomo.get(axis)) is None]
    if gaps:
        raise _missing(path, f"lacks a positive tomo {', '.join(repr(a) for a in gaps)}")
    return data


def _first_positive_int(value: Any) -> int | None:
    if isinstance(value, (list, tuple, np.ndarray)):
        value = value[0] if len(value) else None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return None
    return int(value) if 0 < value < 2**31 and value == int(value) else None


def metadata_shape(data: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(height, width, n_tilts)`` from metadata read by :func:`read_metadata`."""
    tomo = data["tomo"]
    return tuple(_first_positive_int(tomo[a]) for a in "yxz")  # type: ignore[return-value]


def read_metadata_tilts(path: str | os.PathLike[str]) -> TiltTable:
    """The tilt table stored in ``{name}.pkl`` (``tlt`` angles, with ``order``, ``tilt_ids``, ``defocus_um``,
    ``axis_deg``, ``dose`` when present)."""
    path = Path(path)
    data = safe_load(path)
    if not isinstance(data, dict) or "tlt" not in data:
        raise CsptInputError("has no tilt angles", file=path, field="tlt", expected="a 'tlt' list of angles (°)")
    try:
        angles = np.asarray(data["tlt"], dtype=np.float64).reshape(-1)
        columns = {k: np.asarray(data[k]).reshape(-1) for k in _TILT_KEYS[1:] if data.get(k) is not None}
    except (TypeError, ValueError, OverflowError) as exc:
        raise CsptInputError(f"has a malformed tilt entry ({exc})", file=path, field="tlt") from None
    for key, values in columns.items():
        if values.size != angles.size:
            raise CsptInputError(f"has {values.size} values for {angles.size} angles", file=path, field=key,
                                 expected="one value per tilt")
    try:
        return TiltTable.from_angles(
            angles, defocus_um=columns.get("defocus_um", 0.0), axis_deg=columns.get("axis_deg", 0.0),
            dose=columns.get("dose", 0.0), order=columns.get("order"), ids=columns.get("tilt_ids"),
        )
    except CsptInputError as exc:
        raise CsptInputError(exc.reason, file=path, field=exc.field, expected=exc.expected) from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise CsptInputError(f"has a malformed tilt entry ({exc})", file=path, field="tlt") from None
