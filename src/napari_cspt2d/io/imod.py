"""IMOD files: fiducial models (``.fid``/``.mod``, binary, via imodmodel), ``.tlt``, and tiltalign's text outputs.

Conventions
-----------
* IMOD model coordinates put the origin at the corner of the first pixel: ``x_numpy = x_imod - 0.5`` (same for y).
  A model point's z is the 0-based section of the stack, i.e. the tilt id (``tind``) of the TrackSet.
* IMOD's image centre ``nx / 2`` (corner origin) is the numpy centre ``(nx - 1) / 2``; positions relative to the
  centre are the same in both.
* ``.xf`` / ``.tltxf`` lines ``A11 A12 A21 A22 DX DY`` map ``x`` to ``A (x - c) + D + c`` about the image centre
  ``c``; :func:`apply_xf` applies them in numpy coordinates (the half-pixel offsets cancel).
* tiltalign's ``.resid`` rows are ``x y view xres yres``: the observed bead position (IMOD coordinates of the stack
  tiltalign read, usually the prealigned one), the 0-based view, and the residual = projected - observed. Beads are
  not numbered: a new bead starts wherever the view index does not increase.
* ``fid.xyz`` rows are ``point X Y Z object contour`` (the first line adds ``Pix: <size> Dim: <nx> <ny>``); X and Y
  are IMOD coordinates of the aligned frame, Z is relative to the section centre (see :mod:`..recon.trackfit`).
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import CsptInputError, warn_input
from ..model.tracks import ParticleTable, TiltTable, TrackSet
from .. import geometry
from .atomic import atomic_open, atomic_path

__all__ = [
    "IMOD_PIXEL_OFFSET",
    "ImodResiduals",
    "ImodFidXYZ",
    "read_tlt",
    "write_tlt",
    "read_xf",
    "apply_xf",
    "read_resid",
    "read_fid_xyz",
    "tracks_from_resid",
    "read_fiducial_model",
    "write_fiducial_model",
]

#: ``x_numpy = x_imod - IMOD_PIXEL_OFFSET``
IMOD_PIXEL_OFFSET = 0.5


def _existing(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CsptInputError("does not exist", file=path, expected="an existing file")
    return path


def _numeric_rows(path: Path, min_cols: int, field: str, skip: int = 0) -> list[list[float]]:
    """Whitespace-separated numbers, one row per non-empty line after ``skip`` lines; ``min_cols`` numbers each."""
    rows = []
    lines = path.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines[skip:], start=skip + 1):
        words = line.split()
        if not words:
            continue
        try:
            values = [float(w) for w in words[:min_cols]]
        except ValueError:
            raise CsptInputError(f"line {number} is {line.strip()!r}", file=path, field=field,
                                 expected=f"{min_cols} numbers per line") from None
        if len(values) < min_cols or not np.all(np.isfinite(values)):
            raise CsptInputError(f"line {number} is {line.strip()!r}", file=path, field=field,
                                 expected=f"{min_cols} finite numbers per line")
        rows.append(values)
    return rows


# ---------------------------------------------------------------------------------------------- .tlt
def read_tlt(path: str | os.PathLike[str]) -> NDArray[np.float64]:
    """Tilt angles (degrees), one per section in stack order, from an IMOD ``.tlt``/``.rawtlt`` file."""
    path = _existing(path)
    rows = _numeric_rows(path, 1, "tilt angle")
    if not rows:
        raise CsptInputError("has no angles", file=path, field="tilt angle", expected="one angle per line")
    angles = np.array([r[0] for r in rows])
    if np.any(np.abs(angles) > 90):
        raise CsptInputError("has angles beyond ±90°", file=path, field="tilt angle", expected="degrees in [-90, 90]")
    return angles


def write_tlt(path: str | os.PathLike[str], angles_deg: ArrayLike) -> None:
    """Write one angle per line (IMOD's right-aligned layout; every value keeps its full precision)."""
    angles = np.asarray(angles_deg, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(angles)):
        raise CsptInputError("contains NaN or infinite values", field="angles_deg", expected="finite degrees")
    text = "".join(f"{np.format_float_positional(a, unique=True, trim='0'):>7}\n" for a in angles)
    with atomic_open(path, "w") as fh:
        fh.write(text)


# ---------------------------------------------------------------------------------------------- .xf / .tltxf
def read_xf(path: str | os.PathLike[str]) -> NDArray[np.float64]:
    """IMOD transforms ``(T, 2, 3)``: ``[[A11, A12, DX], [A21, A22, DY]]`` per view (``.xf``, ``.tltxf``,
    ``.prexg``)."""
    path = _existing(path)
    rows = np.array(_numeric_rows(path, 6, "transform"), dtype=np.float64).reshape(-1, 6)
    if not len(rows):
        raise CsptInputError("has no transforms", file=path, field="transform", expected="6 numbers per line")
    out = np.empty((len(rows), 2, 3))
    out[:, :, :2] = rows[:, :4].reshape(-1, 2, 2)
    out[:, :, 2] = rows[:, 4:6]
    return out


def apply_xf(xf: ArrayLike, xy_px: ArrayLike, image_shape_yx: tuple[int, int]) -> NDArray[np.float64]:
    """Apply IMOD transforms about the image centre: ``A (xy - c) + D + c``.

    ``xf`` is ``(2, 3)`` or ``(N, 2, 3)`` (one per point, e.g. ``read_xf(...)[view]``), ``xy_px`` ``(N, 2)`` numpy
    coordinates; returns ``(N, 2)``."""
    m = np.asarray(xf, dtype=np.float64)
    xy = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
    c = geometry.image_center_px(image_shape_yx)
    if m.ndim == 2:
        m = np.broadcast_to(m, (len(xy), 2, 3))
    return np.einsum("nij,nj->ni", m[:, :, :2], xy - c) + m[:, :, 2] + c


# ---------------------------------------------------------------------------------------------- .resid / fid.xyz
@dataclass(frozen=True, eq=False)
class ImodResiduals:
    """tiltalign ``.resid``: ``position_px`` (N, 2) numpy coordinates, ``view`` (N,) 0-based, ``residual_px`` (N, 2)
    projected - observed, ``contour`` (N,) 0-based bead index in file order."""

    position_px: NDArray[np.float64]
    view: NDArray[np.int64]
    residual_px: NDArray[np.float64]
    contour: NDArray[np.int64]

    @property
    def mean_residual_px(self) -> float:
        """tiltalign's "residual error mean": the mean residual length (px)."""
        return float(np.hypot(self.residual_px[:, 0], self.residual_px[:, 1]).mean())


def read_resid(path: str | os.PathLike[str]) -> ImodResiduals:
    """Read a tiltalign ``.resid`` file (count line, then ``x y view xres yres`` rows)."""
    path = _existing(path)
    lines = path.read_text(errors="replace").splitlines()
    header = re.match(r"\s*(\d+)\s+residuals", lines[0]) if lines else None
    if header is None:
        raise CsptInputError("does not start with '<count> residuals'", file=path, field="header",
                             expected="a tiltalign residual file")
    rows = np.array(_numeric_rows(path, 5, "residual", skip=1), dtype=np.float64).reshape(-1, 5)
    if len(rows) != int(header.group(1)):
        raise CsptInputError(f"announces {header.group(1)} residuals but has {len(rows)}", file=path,
                             field="header", expected="as many rows as announced")
    view = rows[:, 2]
    if np.any(view != np.round(view)) or np.any(view < 0):
        raise CsptInputError("has non-integer or negative views", file=path, field="view", expected="0-based views")
    view = view.astype(np.int64)
    contour = np.cumsum(np.concatenate([[0], (np.diff(view) <= 0).astype(np.int64)])) if len(view) else view
    return ImodResiduals(rows[:, :2] - IMOD_PIXEL_OFFSET, view, rows[:, 3:5].copy(), contour)


@dataclass(frozen=True, eq=False)
class ImodFidXYZ:
    """tiltalign ``fid.xyz``: ``point`` (P,), ``xyz_imod`` (P, 3) as written (X, Y in IMOD coordinates of the
    aligned frame, Z relative to the centre), ``object``/``contour`` (P,) 1-based, ``pixel_A``, ``size_xy``."""

    point: NDArray[np.int64]
    xyz_imod: NDArray[np.float64]
    object: NDArray[np.int64]
    contour: NDArray[np.int64]
    pixel_A: float | None
    size_xy: tuple[int, int] | None

    def xyz_px(self) -> NDArray[np.float64]:
        """3D points in napari-cspt2d's convention (relative to the tomogram centre, px):
        ``(X - nx/2, Y - ny/2, Z)``."""
        if self.size_xy is None:
            raise CsptInputError("is unknown", field="Dim", expected="the 'Dim: nx ny' entry of the first line")
        return self.xyz_imod - np.array([self.size_xy[0] / 2.0, self.size_xy[1] / 2.0, 0.0])


def read_fid_xyz(path: str | os.PathLike[str]) -> ImodFidXYZ:
    """Read tiltalign's ``fid.xyz`` (``point X Y Z object contour``, with ``Pix:``/``Dim:`` on the first line)."""
    path = _existing(path)
    rows = np.array(_numeric_rows(path, 6, "point"), dtype=np.float64).reshape(-1, 6)
    if not len(rows):
        raise CsptInputError("has no points", file=path, field="point", expected="'point X Y Z object contour' rows")
    first = path.read_text(errors="replace").splitlines()[0]
    pix = re.search(r"Pix:\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)", first)
    dim = re.search(r"Dim:\s*(\d{1,9})\s+(\d{1,9})\b", first)
    as_int = rows[:, [0, 4, 5]]
    if np.any(as_int != np.round(as_int)):
        raise CsptInputError("has non-integer point/object/contour numbers", file=path, field="point",
                             expected="integers in columns 1, 5 and 6")
    return ImodFidXYZ(
        rows[:, 0].astype(np.int64), rows[:, 1:4].copy(), rows[:, 4].astype(np.int64), rows[:, 5].astype(np.int64),
        float(pix.group(1)) if pix else None, (int(dim.group(1)), int(dim.group(2))) if dim else None,
    )


def _tilt_table(tilts: TiltTable | ArrayLike | str | os.PathLike[str] | None, n_sections: int,
                source: Path | None) -> TiltTable:
    if isinstance(tilts, TiltTable):
        return tilts
    if isinstance(tilts, (str, os.PathLike)):
        return TiltTable.from_angles(read_tlt(tilts))
    if tilts is None:
        warn_input("no tilt angles given; all angles set to 0", file=source, field="tilts")
        return TiltTable.from_angles(np.zeros(n_sections))
    angles = np.asarray(tilts, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(angles)):
        raise CsptInputError("contains NaN or infinite values", field="tilts", expected="finite degrees")
    return TiltTable.from_angles(angles)


def _check_sections(tilt_ids: NDArray[np.int64], tilts: TiltTable, source: Path | None, field: str) -> None:
    unknown = ~np.isin(tilt_ids, tilts.id)
    if unknown.any():
        raise CsptInputError(f"refers to section {int(tilt_ids[unknown][0])} which has no tilt angle", file=source,
                             field=field, expected=f"sections {int(tilts.id.min())}..{int(tilts.id.max())}")


def tracks_from_resid(
    resid: ImodResiduals | str | os.PathLike[str],
    tilts: TiltTable | ArrayLike | str | os.PathLike[str],
    image_shape_yx: tuple[int, int],
    *,
    xf: ArrayLike | None = None,
) -> TrackSet:
    """A TrackSet of the beads in a tiltalign ``.resid`` (particle id = 0-based bead index, tilt id = view).

    ``tilts`` is a TiltTable, angles (one per view) or a ``.tlt`` path. With ``xf`` (``(T, 2, 3)``, e.g. the
    ``.tltxf``) positions are mapped into the aligned frame first; the tilts must then describe that frame (axis 0)."""
    source = Path(resid) if isinstance(resid, (str, os.PathLike)) else None
    data = read_resid(resid) if source is not None else resid
    table = _tilt_table(tilts, int(data.view.max()) + 1 if len(data.view) else 0, source)
    _check_sections(data.view, table, source, "view")
    pos = data.position_px
    if xf is not None:
        m = np.asarray(xf, dtype=np.float64)
        if m.ndim != 3 or m.shape[1:] != (2, 3) or m.shape[0] <= int(data.view.max()):
            raise CsptInputError(f"has shape {m.shape}", field="xf", expected="(n_views, 2, 3) transforms")
        pos = apply_xf(m[data.view], pos, image_shape_yx)
    return TrackSet.from_positions(data.contour, data.view, pos, table, image_shape_yx).sorted()


# ---------------------------------------------------------------------------------------------- binary models
def _spec_bytes(spec: dict[str, str]) -> int:
    return struct.calcsize(">" + "".join(spec.values()))


def _check_model_chunks(path: Path, data: bytes) -> None:
    """Walk the chunks of an IMOD binary model exactly as imodmodel will read them and refuse any chunk that runs
    past the end of the file, before imodmodel sees it: it builds a ``'fff' * point count`` struct format before
    reading a contour (a corrupt count of 2³¹ allocates gigabytes) and loops for ever once it reads past the end.
    The walk must end at the IEOF marker that ends the file."""
    from imodmodel.binary_specification import ModFileSpecification as spec

    fixed = {b"OBJT": _spec_bytes(spec.OBJECT_HEADER), b"IMAT": 4 + _spec_bytes(spec.IMAT),
             b"SLAN": 4 + _spec_bytes(spec.SLAN), b"MINX": 4 + _spec_bytes(spec.MINX)}
    pos, points = _spec_bytes(spec.ID) + _spec_bytes(spec.MODEL_HEADER), None
    while True:
        tag, start = data[pos:pos + 4], pos
        pos += 4
        if tag == b"IEOF":
            if pos == len(data):
                return
            raise CsptInputError(f"has {len(data) - pos} bytes after its IEOF end marker at byte {start}",
                                 file=path, field="model", expected="IEOF at the end of the file")
        if tag in (b"CONT", b"MESH") and pos + 8 <= len(data):
            counts = struct.unpack_from(">ii", data, pos)  # points (contour); vertices and indices (mesh)
            if min(counts) < 0:
                raise CsptInputError(f"declares {min(counts)} items in the {tag.decode()} chunk at byte {start}",
                                     file=path, field="model", expected="counts >= 0")
            if tag == b"CONT":
                points = counts[0]
                size = _spec_bytes(spec.CONTOUR_HEADER) + 12 * points
            else:
                size = _spec_bytes(spec.MESH_HEADER) + 12 * counts[0] + 4 * counts[1]
        elif tag == b"SIZE" and points is not None:  # imodmodel reads one size per point of the last contour
            size = 4 + 4 * points
        elif tag in fixed:
            size = fixed[tag]
        else:  # MOST, OBST, COST, MEST and chunks imodmodel skips: a byte count, then that many bytes
            size = 4 + int.from_bytes(data[pos:pos + 4], "big") if pos + 4 <= len(data) else 4
        if len(tag) < 4 or pos + size > len(data):
            raise CsptInputError(f"declares a {size}-byte {tag.decode('latin-1')!r} chunk at byte {start}, past the "
                                 f"end of the file ({len(data)} bytes)", file=path, field="model",
                                 expected="chunk sizes and point counts that fit in the file")
        pos += size


def read_fiducial_model(
    path: str | os.PathLike[str],
    tilts: TiltTable | ArrayLike | str | os.PathLike[str] | None = None,
    *,
    image_shape_yx: tuple[int, int] | None = None,
) -> TrackSet:
    """Read an IMOD fiducial model (``.fid``/``.mod``): each non-empty contour becomes a particle (ids 0, 1, ... in
    object/contour order), each point a projection (z = section = tilt id).

    ``tilts``: TiltTable, angles, ``.tlt`` path, or None (angles 0, with a warning). ``image_shape_yx`` defaults to
    the model header's ``(ymax, xmax)``."""
    from imodmodel import ImodModel

    path = _existing(path)
    data = path.read_bytes()
    if data[:4] != b"IMOD" or data[-4:] != b"IEOF":  # imodmodel loops for ever on a model without its end marker
        raise CsptInputError("is not a complete IMOD model file (it must start with IMOD and end with IEOF)",
                             file=path, field="model", expected="an IMOD binary model written to the end")
    _check_model_chunks(path, data)
    try:
        model = ImodModel.from_file(path)
    except Exception as exc:  # imodmodel raises struct/pydantic/Unicode errors on damaged files
        raise CsptInputError(f"is not a readable IMOD model ({type(exc).__name__}: {exc})", file=path,
                             field="model", expected="an IMOD binary model") from exc
    header = model.header
    shape = image_shape_yx
    if shape is None:
        if header.xmax <= 0 or header.ymax <= 0:
            raise CsptInputError(f"is {header.xmax} x {header.ymax}", file=path, field="xmax/ymax",
                                 expected="the image size in the header, or pass image_shape_yx")
        shape = (int(header.ymax), int(header.xmax))
    particle, tilt, xy = [], [], []
    for o, obj in enumerate(model.objects):
        for c, contour in enumerate(obj.contours):
            pts = np.asarray(contour.points, dtype=np.float64).reshape(-1, 3)
            if not len(pts):
                continue
            z = np.round(pts[:, 2])
            where = f"object {o + 1} contour {c + 1}"
            if not np.all(np.isfinite(pts)) or np.any(np.abs(pts[:, 2] - z) > 0.25):
                raise CsptInputError("has non-finite points or points between sections", file=path, field=where,
                                     expected="one point per section at integer z")
            if np.unique(z).size != z.size:
                raise CsptInputError("has two points on the same section", file=path, field=where,
                                     expected="at most one point per section")
            particle.append(np.full(len(pts), len(particle)))
            tilt.append(z.astype(np.int64))
            xy.append(pts[:, :2] - IMOD_PIXEL_OFFSET)
    if not particle:
        raise CsptInputError("has no points", file=path, field="contours", expected="at least one fiducial point")
    tilt_ids = np.concatenate(tilt)
    n_sections = max(int(header.zmax), int(tilt_ids.max()) + 1)
    table = _tilt_table(tilts, n_sections, path)
    _check_sections(tilt_ids, table, path, "z")
    pids = np.concatenate(particle)
    return TrackSet.from_positions(pids, tilt_ids, np.concatenate(xy), table, shape,
                                   particles=ParticleTable.zeros(np.arange(len(particle)))).sorted()


def write_fiducial_model(
    path: str | os.PathLike[str], tracks: TrackSet, *, object_name: str = "fiducials"
) -> None:
    """Write ``tracks`` as an IMOD fiducial model: one object of open contours, one contour per particle (in id
    order), one point per projection at ``(x + 0.5, y + 0.5, tilt id)``; header size = image size x sections."""
    from imodmodel.models import Contour, ImodModel, ModelHeader, Object, ObjectFlags, ObjectHeader

    ny, nx = tracks._require_shape()
    positions = tracks.positions_px() + IMOD_PIXEL_OFFSET
    obj = Object(header=ObjectHeader(name=object_name[:63], flags=ObjectFlags(open=True)))
    order = np.lexsort((tracks.tilt, tracks.particle))
    particle, tilt, positions = tracks.particle[order], tracks.tilt[order], positions[order]
    starts = np.flatnonzero(np.concatenate([[True], np.diff(particle) != 0])) if len(particle) else []
    for start, stop in zip(starts, list(starts[1:]) + [len(particle)]):
        pts = np.column_stack([positions[start:stop], tilt[start:stop].astype(np.float64)]).astype(np.float32)
        obj.contours.append(Contour(points=pts))
    obj.update_sizes()
    n_sections = int(tracks.tilts.id.max()) + 1 if tracks.n_tilts else 0
    model = ImodModel(header=ModelHeader(xmax=int(nx), ymax=int(ny), zmax=n_sections), objects=[obj])
    model.update_sizes()
    with atomic_path(path) as tmp:
        model.to_file(tmp)
