"""``{name}.pkl``: the tilt-series metadata pickle of a pyp project, written as pyp writes it and read safely.

pyp's layout (``pyp/inout/metadata/pyp_metadata.py``: ``FILES_TOMO``, ``LocalMetadata.loadImageDim``/``loadTextFile``/
``write``): a plain ``pickle`` of a dict whose tables are pandas DataFrames with pyp's column names::

    {"mode": "tomo",
     "image": DataFrame x, y, z  (1 row, int)   # the tilt stack: width, height, number of sections (px)
     "tomo":  DataFrame x, y, z  (1 row, int)   # the reconstruction: width, height, thickness in *binned* voxels
     "tlt":   DataFrame tilt_angle   (one row per stack section, degrees)
     "order": DataFrame order        (acquisition index per section, 0 = first exposure, float as pyp loads it)
     "ctf":   DataFrame tilt_angle, df1, df2, ast, cc, est_res   (per section; df1/df2 in Å, ast in degrees)
     "frames": [str, ...]            # movie/frame names (may be empty)
     ...}

pyp reads ``metadata["tomo"].at[0, "x"]`` and multiplies by ``tomo_rec_binning`` to get the unbinned tomogram
(``pyp/inout/metadata/core.py`` ``tomo_extract_coordinates``, ``pyp/refine/csp/particle_cspt.py``), takes the
image size from ``metadata["image"].at[0, "x"]`` and the angles from ``metadata["tlt"].values``. The file written
here adds ``"cspt2d_tilts"`` (a DataFrame ``tilt_id, angle_deg, defocus_um, axis_deg, dose, order``: the model's
whole tilt table; pyp ignores keys it does not know).

Read here: pyp's form (the raw-to-aligned transforms ``ali``, columns ``m00 m01 m02 m03 dx dy``, give the tilt axis
as minus their rotation), and the seed's plain form, which the seed document writes with plain ``pickle``::

    {"tomo": {"x": [width_px], "y": [height_px], "z": [n_tilts]}, "frames": [...]}

(there ``tomo`` holds the *image* size and the number of tilts; the earlier plain ``tlt``/``order``/``tilt_ids``/
``defocus_um``/``axis_deg``/``dose`` lists are still read). Unpickling goes through
:func:`~napari_cspt2d.io.safe_pickle.safe_load` with DataFrames allowed and nothing else.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import CsptInputError
from ..model.tracks import TiltTable
from .atomic import atomic_open
from .safe_pickle import safe_load

__all__ = ["write_metadata", "read_metadata", "read_metadata_tilts", "metadata_shape", "metadata_tomogram_px",
           "pyp_tomogram_px", "PYP_THICKNESS_PX"]

#: pyp's default ``tomo_rec_thickness`` (unbinned voxels; ``config/pyp_config.toml`` ``[tabs.tomo_rec.thickness]``).
PYP_THICKNESS_PX = 2048
_TILT_TABLE = "cspt2d_tilts"
_TILT_COLUMNS = ("tilt_id", "angle_deg", "defocus_um", "axis_deg", "dose", "order")
_SEED_TILT_KEYS = ("tlt", "order", "tilt_ids", "defocus_um", "axis_deg", "dose")  # the plain form's lists
_RESERVED = ("mode", "tomo", "image", "tlt", "order", "ctf", "frames", _TILT_TABLE)


def _missing(path: Path, what: str) -> CsptInputError:
    """The seed's "Metadata is required" error; its message starts with those words and names file and gap."""
    exc = CsptInputError(f"Metadata is required: {path} {what}",
                         expected="pyp's {'image': DataFrame x, y, z, 'tomo': ...} or the seed's "
                                  "{'tomo': {'x': [width], 'y': [height], 'z': [n_tilts]}}")
    exc.file, exc.field = os.fspath(path), "tomo"  # set after construction: the message keeps the seed's start
    return exc


def _frame(columns: Mapping[str, Any]) -> pd.DataFrame:
    """A DataFrame as pyp's pickles hold them: a RangeIndex and an object-dtype column index (pandas 3's string
    columns would pickle as Arrow arrays that pyp's pandas may not read)."""
    return pd.DataFrame({k: np.asarray(v).reshape(-1) for k, v in columns.items()}).set_axis(
        pd.Index(list(columns), dtype=object), axis=1)


def _binned_tomogram(width: int, height: int, thickness_px: int, rec_binning: float) -> list[int]:
    return [max(1, int(round(v / rec_binning))) for v in (width, height, thickness_px)]


def pyp_tomogram_px(image_shape_yx: Sequence[int], thickness_px: int = PYP_THICKNESS_PX,
                    rec_binning: float = 1.0) -> tuple[float, float, float]:
    """Unbinned size ``(x, y, z)`` of the reconstruction :func:`write_metadata` records for images of
    ``image_shape_yx`` (``tomo`` x ``tomo_rec_binning``, as pyp reads it back; :func:`metadata_tomogram_px`)."""
    ny, nx = (int(v) for v in image_shape_yx)
    return tuple(float(v) * float(rec_binning)  # type: ignore[return-value]
                 for v in _binned_tomogram(nx, ny, int(thickness_px), rec_binning))


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
    thickness_px: int = PYP_THICKNESS_PX,
    rec_binning: float = 1.0,
) -> Path:
    """Write ``{name}.pkl`` atomically in pyp's layout (module docstring): the stack's ``width``/``height`` (px) and
    ``n_tilts`` sections under ``image``; the reconstruction (``width x height x thickness_px`` unbinned voxels,
    divided by ``rec_binning`` = pyp's ``tomo_rec_binning``) under ``tomo``; the frame list; and, when ``tilts`` is
    given, ``tlt``/``order``/``ctf`` (when it has one tilt per section, ids ``0..n_tilts-1``) and the whole table.
    ``extra`` adds keys (plain values); it may not replace ours."""
    path = Path(path)
    for value, name in ((width, "width"), (height, "height"), (n_tilts, "n_tilts"), (thickness_px, "thickness_px")):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise CsptInputError(f"is {value!r}", file=path, field=name, expected="a positive integer")
    if not (isinstance(rec_binning, (int, float, np.number)) and math.isfinite(rec_binning) and rec_binning > 0):
        raise CsptInputError(f"is {rec_binning!r}", file=path, field="rec_binning", expected="a number > 0")
    binned = _binned_tomogram(int(width), int(height), int(thickness_px), rec_binning)
    data: dict[str, Any] = {
        "mode": "tomo",
        "image": _frame({"x": [int(width)], "y": [int(height)], "z": [int(n_tilts)]}),
        "tomo": _frame(dict(zip("xyz", [np.int64(v) for v in binned]))),
        "frames": [str(f) for f in frames] if frames is not None else [],
    }
    if tilts is not None:
        data[_TILT_TABLE] = _frame({"tilt_id": tilts.id, "angle_deg": tilts.angle_deg, "defocus_um": tilts.defocus_um,
                                    "axis_deg": tilts.axis_deg, "dose": tilts.dose, "order": tilts.order})
        if np.array_equal(tilts.id, np.arange(n_tilts)):
            defocus_A = tilts.defocus_um * 1e4
            zeros = np.zeros(len(tilts))
            data["tlt"] = _frame({"tilt_angle": tilts.angle_deg})
            data["order"] = _frame({"order": tilts.order.astype(np.float64)})
            data["ctf"] = _frame({"tilt_angle": tilts.angle_deg, "df1": defocus_A, "df2": defocus_A, "ast": zeros,
                                  "cc": zeros, "est_res": zeros})
    if extra:
        clash = [k for k in extra if k in _RESERVED]
        if clash:
            raise CsptInputError(f"would replace {', '.join(clash)}", file=path, field="extra",
                                 expected=f"keys other than {', '.join(_RESERVED)}")
        _check_plain(dict(extra), "extra", path)
        data.update(extra)
    with atomic_open(path, "wb") as fh:
        pickle.dump(data, fh, protocol=4)
    return path


def _size(entry: Any, axis: str) -> int | None:
    """``entry[axis]`` as a positive int: from a pyp DataFrame (``.at[0, axis]``) or the seed's ``{axis: [v]}``."""
    if isinstance(entry, pd.DataFrame):
        value = entry[axis].iloc[0] if axis in entry.columns and len(entry) else None
    elif isinstance(entry, Mapping):
        value = entry.get(axis)
        if isinstance(value, (list, tuple, np.ndarray)):
            value = value[0] if len(value) else None
    else:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return None
    return int(value) if 0 < value < 2**31 and value == int(value) else None


def _image_entry(data: Mapping[str, Any]) -> Any:
    """Where the image size is: pyp's ``image`` table, else the seed's plain ``tomo``."""
    return data["image"] if isinstance(data.get("image"), pd.DataFrame) else data.get("tomo")


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``{name}.pkl`` (pyp's DataFrames or the seed's plain dicts) with the safe unpickler and check that it
    gives the image size.

    A missing file, or one without a complete image size (pyp's ``image`` x, y, z, or the seed's ``tomo``), raises
    :class:`CsptInputError` whose message starts with "Metadata is required" and says what is missing."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path, "does not exist")
    data = safe_load(path, dataframes=True)
    if not isinstance(data, dict):
        raise _missing(path, f"holds a {type(data).__name__}, not a dict")
    entry = _image_entry(data)
    if entry is None:
        raise _missing(path, "has no 'tomo' entry")
    if isinstance(data.get("tomo"), pd.DataFrame) and not isinstance(data.get("image"), pd.DataFrame):
        raise _missing(path, "has pyp's 'tomo' table but no 'image' table (the tilt stack's size)")
    if not isinstance(entry, (Mapping, pd.DataFrame)):
        raise _missing(path, f"has a {type(entry).__name__} as its image size")
    gaps = [axis for axis in "xyz" if _size(entry, axis) is None]
    if gaps:
        raise _missing(path, f"lacks a positive {'image' if entry is data.get('image') else 'tomo'} "
                             f"{', '.join(repr(a) for a in gaps)}")
    return data


def metadata_shape(data: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(height, width, n_sections)`` of the tilt stack from metadata read by :func:`read_metadata`."""
    entry = _image_entry(data)
    return tuple(_size(entry, a) for a in "yxz")  # type: ignore[return-value]


def metadata_tomogram_px(data: Mapping[str, Any], rec_binning: float = 1.0) -> tuple[float, float, float] | None:
    """Unbinned size ``(x, y, z)`` of pyp's reconstruction: ``tomo`` times ``rec_binning`` (``tomo_rec_binning``),
    as pyp computes it; None for the seed's plain form (its ``tomo`` is the image size and the number of tilts)."""
    tomo = data.get("tomo")
    if not isinstance(tomo, pd.DataFrame):
        return None
    sizes = [_size(tomo, a) for a in "xyz"]
    return None if None in sizes else tuple(float(v) * float(rec_binning) for v in sizes)  # type: ignore[return-value]


def _column(frame: Any, name: str, path: Path, key: str) -> np.ndarray:
    if not isinstance(frame, pd.DataFrame) or name not in frame.columns:
        raise CsptInputError(f"has no column {name!r}", file=path, field=key, expected=f"pyp's {key} table")
    values = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise CsptInputError("has values that are not finite numbers", file=path, field=f"{key}.{name}",
                             expected="finite numbers")
    return values


def _tilts_from_pyp(data: Mapping[str, Any], path: Path, dose_per_tilt: float) -> dict[str, Any]:
    """The tilt columns of pyp's own tables (``tlt``, ``order``, ``ctf``, ``ali``), one per stack section."""
    angles = _column(data["tlt"], data["tlt"].columns[0] if len(data["tlt"].columns) else "tilt_angle", path, "tlt")
    n = angles.size
    columns: dict[str, Any] = {"angle_deg": angles, "dose": np.full(n, float(dose_per_tilt))}
    if "order" in data:
        columns["order"] = _column(data["order"], "order", path, "order")
    if "ctf" in data:
        columns["defocus_um"] = 0.5 * (_column(data["ctf"], "df1", path, "ctf")
                                       + _column(data["ctf"], "df2", path, "ctf")) * 1e-4
    if "ali" in data:  # raw -> aligned transforms rotate by minus the tilt axis (pyp's tomo_extract_coordinates)
        columns["axis_deg"] = -np.degrees(np.arctan2(_column(data["ali"], "m02", path, "ali"),
                                                     _column(data["ali"], "m00", path, "ali")))
    return columns


def read_metadata_tilts(path: str | os.PathLike[str], *, dose_per_tilt: float = 0.0) -> TiltTable:
    """The tilt table stored in ``{name}.pkl``: this project's ``cspt2d_tilts`` table when present, else pyp's
    ``tlt`` (with ``order``, defocus from ``ctf`` and the axis from ``ali`` when present, ``dose_per_tilt`` e/Å²
    per tilt), else the plain form's ``tlt`` list (with ``order``, ``tilt_ids``, ``defocus_um``, ``axis_deg``,
    ``dose``)."""
    path = Path(path)
    data = safe_load(path, dataframes=True)
    if not isinstance(data, dict) or ("tlt" not in data and _TILT_TABLE not in data):
        raise CsptInputError("has no tilt angles", file=path, field="tlt", expected="a 'tlt' list of angles (°)")
    try:
        if isinstance(data.get(_TILT_TABLE), pd.DataFrame):
            table = data[_TILT_TABLE]
            columns = {k: _column(table, k, path, _TILT_TABLE) for k in _TILT_COLUMNS}
            columns["ids"] = columns.pop("tilt_id")
        elif isinstance(data["tlt"], pd.DataFrame):
            columns = _tilts_from_pyp(data, path, dose_per_tilt)
        elif data["tlt"] is None:
            raise CsptInputError("is None", file=path, field="tlt", expected="a list of angles (°)")
        else:
            plain = {k: np.asarray(data[k], dtype=np.float64).reshape(-1) for k in _SEED_TILT_KEYS
                     if data.get(k) is not None}
            names = {"tlt": "angle_deg", "tilt_ids": "ids"}
            columns = {names.get(k, k): v for k, v in plain.items()}
    except (TypeError, ValueError, OverflowError) as exc:
        raise CsptInputError(f"has a malformed tilt entry ({exc})", file=path, field="tlt") from None
    angles = columns.pop("angle_deg")
    for key, values in columns.items():
        if values.size != angles.size:
            raise CsptInputError(f"has {values.size} values for {angles.size} angles", file=path, field=key,
                                 expected="one value per tilt")
    try:
        return TiltTable.from_angles(
            angles, defocus_um=columns.get("defocus_um", 0.0), axis_deg=columns.get("axis_deg", 0.0),
            dose=columns.get("dose", 0.0), order=columns.get("order"), ids=columns.get("ids"),
        )
    except CsptInputError as exc:
        raise CsptInputError(exc.reason, file=path, field=exc.field, expected=exc.expected) from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise CsptInputError(f"has a malformed tilt entry ({exc})", file=path, field="tlt") from None
