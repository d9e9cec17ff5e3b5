"""SerialEM ``.mdoc`` tilt-series metadata → :class:`TiltTable` (via mdocfile).

* Tilt ids are the sections' ``ZValue`` (0-based section of the stack); angles ``TiltAngle``.
* Dose per tilt (e/Å²): ``ExposureDose``; where it is 0 or missing, the sum of ``FrameDosesAndNumber``; else the
  caller's ``dose_per_tilt``; else 0 with a warning (SerialEM writes 0 when the dose was not calibrated).
* Acquisition order: by ``DateTime`` when every section has a parsable one, else by ``ZValue``.
* Tilt axis: the ``Tilt axis angle = …`` title line (SerialEM reports it the way IMOD and RELION 5 ``rlnTomoZRot``
  use it: degrees CCW from the image y axis), else 0 with a warning.
* Defocus (µm, underfocus positive): ``-TargetDefocus`` (SerialEM's target, negative = underfocus), else 0. The
  ``Defocus`` entry is a lens readout, not the specimen's defocus, and is not used.
* ``SubFramePath`` may be a Windows path (mdocfile returns ``PureWindowsPath``); only its file name is kept.
"""

from __future__ import annotations

import ntpath
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pandas as pd

from ..errors import CsptInputError, warn_input
from ..model.tracks import TiltTable

__all__ = ["MdocInfo", "read_mdoc", "read_mdoc_info"]

_AXIS = re.compile(r"Tilt\s*axis\s*angle\s*=\s*([-+]?\d+(?:\.\d*)?)", re.IGNORECASE)
_DATE_FORMATS = ("%d-%b-%y %H:%M:%S", "%d-%b-%Y %H:%M:%S", "%Y-%m-%d %H:%M:%S", "%d-%b-%y %H:%M", "%Y-%b-%d %H:%M:%S")


@dataclass(frozen=True, eq=False)
class MdocInfo:
    """What an mdoc says about a tilt series: ``tilts`` (ids = ZValue), ``pixel_A`` (``PixelSpacing`` of the saved
    images), ``image_size_xy``, ``binning``, ``voltage_kV`` (None when absent), ``frame_names`` (file name of each
    tilt's movie, in tilt-table order; "" when absent), ``table`` (mdocfile's DataFrame, sorted by ZValue)."""

    tilts: TiltTable
    pixel_A: float | None
    image_size_xy: tuple[int, int] | None
    binning: float | None
    voltage_kV: float | None
    frame_names: list[str]
    table: pd.DataFrame


def _frame_name(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, PurePath):
        return value.name
    return ntpath.basename(str(value).replace("/", "\\"))


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    text = " ".join(value.split())
    for fmt in _DATE_FORMATS:
        try:
            return datetime.strptime(text, fmt)
        except ValueError:
            continue
    return None


def _column(df: pd.DataFrame, name: str) -> np.ndarray | None:
    if name not in df.columns:
        return None
    return pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=np.float64)


def _first(df: pd.DataFrame, name: str) -> Any:
    if name not in df.columns:
        return None
    values = df[name].dropna()
    return values.iloc[0] if len(values) else None


def _doses(df: pd.DataFrame, path: Path, dose_per_tilt: float | None) -> np.ndarray:
    n = len(df)
    dose = _column(df, "ExposureDose")
    dose = np.zeros(n) if dose is None else np.nan_to_num(dose, nan=0.0)
    if "FrameDosesAndNumber" in df.columns:
        for i, frames in enumerate(df["FrameDosesAndNumber"]):
            if dose[i] <= 0 and isinstance(frames, (list, tuple)) and frames:
                dose[i] = float(sum(float(d) * float(k) for d, k in frames))
    if np.any(dose < 0):
        raise CsptInputError("has negative values", file=path, field="ExposureDose", expected="doses >= 0 e/Å²")
    if np.all(dose <= 0):
        if dose_per_tilt is not None:
            return np.full(n, float(dose_per_tilt))
        warn_input("is 0 or missing in every section; doses set to 0 (pass dose_per_tilt)", file=path,
                   field="ExposureDose")
    return dose


def read_mdoc_info(path: str | os.PathLike[str], *, dose_per_tilt: float | None = None) -> MdocInfo:
    """Read a SerialEM tilt-series ``.mdoc`` (see the module docstring for where each value comes from)."""
    import mdocfile

    path = Path(path)
    if not path.is_file():
        raise CsptInputError("does not exist", file=path, expected="a SerialEM .mdoc file")
    if dose_per_tilt is not None and not (np.isfinite(dose_per_tilt) and dose_per_tilt >= 0):
        raise CsptInputError(f"is {dose_per_tilt}", field="dose_per_tilt", expected=">= 0 e/Å²")
    try:
        df = mdocfile.read(path)
    except Exception as exc:  # mdocfile raises pydantic/Value/Index errors on damaged files
        raise CsptInputError(f"is not a readable mdoc ({type(exc).__name__}: {exc})", file=path,
                             field="mdoc") from exc
    if len(df) == 0 or "TiltAngle" not in df.columns:
        raise CsptInputError("has no tilt sections", file=path, field="TiltAngle",
                             expected="[ZValue = n] sections with TiltAngle")
    angle = _column(df, "TiltAngle")
    if not np.all(np.isfinite(angle)) or np.any(np.abs(angle) > 90):
        bad = int(np.flatnonzero(~np.isfinite(angle) | (np.abs(np.nan_to_num(angle)) > 90))[0])
        raise CsptInputError(f"section {bad} has {df['TiltAngle'].iloc[bad]!r}", file=path, field="TiltAngle",
                             expected="degrees in [-90, 90]")
    zvalue = _column(df, "ZValue")
    if zvalue is None:
        zvalue = np.arange(len(df), dtype=np.float64)
    if np.any(~np.isfinite(zvalue)) or np.any(zvalue < 0) or np.unique(zvalue).size != len(zvalue):
        raise CsptInputError("is missing, negative or repeated", file=path, field="ZValue",
                             expected="unique 0-based section numbers")
    order_z = np.argsort(zvalue, kind="stable")
    df = df.iloc[order_z].reset_index(drop=True)
    angle, zvalue = angle[order_z], zvalue[order_z].astype(np.int64)

    times = [_parse_time(v) for v in df["DateTime"]] if "DateTime" in df.columns else [None]
    if all(t is not None for t in times) and len(times) == len(df):
        stamp = np.array([t.timestamp() for t in times])
        order = np.argsort(np.argsort(stamp, kind="stable"), kind="stable")
    else:
        order = np.arange(len(df))

    titles = _first(df, "titles") or []
    match = next((m for m in (_AXIS.search(str(t)) for t in titles) if m), None)
    if match is None:
        warn_input("has no 'Tilt axis angle' title line; tilt axis set to 0", file=path, field="titles")
    axis = float(match.group(1)) if match else 0.0
    target = _column(df, "TargetDefocus")
    defocus = np.zeros(len(df)) if target is None else -np.nan_to_num(target, nan=0.0)

    tilts = TiltTable.from_angles(angle, defocus_um=defocus, axis_deg=axis, dose=_doses(df, path, dose_per_tilt),
                                  order=order, ids=zvalue)
    size = _first(df, "ImageSize")
    pixel = _column(df, "PixelSpacing")
    binning, voltage = _first(df, "Binning"), _first(df, "Voltage")
    frames = [_frame_name(v) for v in df["SubFramePath"]] if "SubFramePath" in df.columns else [""] * len(df)
    return MdocInfo(
        tilts=tilts,
        pixel_A=float(np.nanmedian(pixel)) if pixel is not None and np.any(np.isfinite(pixel)) else None,
        image_size_xy=(int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) and len(size) == 2 else None,
        binning=None if binning is None else float(binning),
        voltage_kV=None if voltage is None else float(voltage),
        frame_names=frames,
        table=df,
    )


def read_mdoc(path: str | os.PathLike[str], *, dose_per_tilt: float | None = None) -> TiltTable:
    """The :class:`TiltTable` of a SerialEM ``.mdoc`` (ids = ZValue); see :func:`read_mdoc_info`."""
    return read_mdoc_info(path, dose_per_tilt=dose_per_tilt).tilts
