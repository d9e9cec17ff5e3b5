"""STAR files: RELION 5 tomography projects and Warp/RELION-3 particle-series stars (cryoDRGN-ET input).

RELION 5 projection model (``Tomogram::setProjectionMatrix`` / ``TomoBackprojectProgram::getProjectMatrices``)
-------------------------------------------------------------------------------------------------------------
A particle's ``rlnCenteredCoordinate{X,Y,Z}Angst`` ``c`` (Å from the tomogram centre) becomes tomogram pixels
``p = c / pixel + size / 2`` (float division, ``ParticleSet::getParticleCoordDecenteredPixel``), and the tilt image
position is ``P p`` with::

    P = S(int(nx/2), int(ny/2)) . S(xshift/pixel, yshift/pixel) . R_z(ZRot) . R_y(YTilt) . R_x(XTilt)
        . S(-int(w/2), -int(h/2), -int(d/2))

``R_*`` are right-handed rotations (gravis ``t3Matrix::rotation(axis, degrees)``), ``S`` translations, ``pixel`` =
``rlnTomoTiltSeriesPixelSize``, ``(w, h, d)`` = ``rlnTomoSize{X,Y,Z}``, ``(nx, ny)`` the tilt images' size, pixel
centres at integer positions (as numpy). Mapping onto :mod:`napari_cspt2d.geometry`:

* tilt angle = ``rlnTomoYTilt``, tilt axis = ``rlnTomoZRot`` (same right-handed ``R_y`` and ``R_z``);
* 3D point ``X = R_x(XTilt) (c / pixel + f)`` with ``f = size/2 - int(size/2)`` (0.5 along odd tomogram sizes);
  when XTilt varies per tilt its median is used here and each projection's exact RELION position is kept;
* a projection's shift = the tilt's ``(xshift, yshift) / pixel`` + ``(int(nx/2) - (nx-1)/2, int(ny/2) - (ny-1)/2)``
  (RELION's integer image centre vs ours), plus whatever the XTilt approximation leaves.

The projections' positions therefore equal RELION's exactly. Writing back, each tilt's shift is the median over its
projections of ``shift - centre offset`` (RELION has no per-particle 2D offsets in a coordinate star). Per-tilt
metadata: defocus = mean of ``rlnDefocusU/V`` (Å → µm); dose from ``rlnMicrographPreExposure``: the acquisition order
is its ranking and each tilt's dose the step to the next exposure, so the accumulated dose reproduces the pre-exposure
exactly (an excluded tilt's dose folds into the one before it; the last tilt gets the median step). Columns the model
does not hold are carried through from the file that was read.

Warp / RELION-3 particle-series star (one row per particle per tilt image, e.g. cryoDRGN-ET's test set)
------------------------------------------------------------------------------------------------------
Particles are grouped by ``rlnGroupName``, tilts by ``rlnMicrographName``; ``rlnCoordinateX/Y`` is the particle's
position in that tilt image (pixel centres at integers). The tilt angle is ``acos(rlnCtfScalefactor)`` signed by the
micrographs' trailing frame number (numbers below the least-tilted frame are negative), unless given. The tilt
axis is derived from the per-image orientations ``rlnAngleRot/Tilt/Psi`` (consecutive tilts of one particle differ
by a rotation about the tilt axis, which also fixes the hand); the particle orientation is that of its least-tilted
image brought back to zero tilt. Dose from ``rlnCtfBfactor`` = -4 x accumulated exposure (Warp's convention).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray

from ..errors import CsptInputError
from ..model.tracks import ParticleTable, TiltTable, TrackSet
from .. import geometry
from .atomic import atomic_path

__all__ = [
    "Relion5TiltSeries",
    "ParticleSeriesStar",
    "read_star_blocks",
    "write_star_blocks",
    "read_relion5_tomograms",
    "read_relion5_particles",
    "read_relion5_particle_table",
    "relion5_tracks",
    "relion5_series",
    "relion5_series_from_tracks",
    "write_relion5_tomograms",
    "write_relion5_particles",
    "read_particle_series_star",
]

_COORDS = ("rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst", "rlnCenteredCoordinateZAngst")
_ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")


# ---------------------------------------------------------------------------------------------- helpers
def read_star_blocks(path: str | os.PathLike[str]) -> dict[str, pd.DataFrame]:
    """Every data block of a STAR file as a DataFrame (single-row blocks too), keyed by block name."""
    import starfile

    path = Path(path)
    if not path.is_file():
        raise CsptInputError("does not exist", file=path, expected="a STAR file")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises many kinds of parse errors
        raise CsptInputError(f"is not a readable STAR file ({type(exc).__name__}: {exc})", file=path,
                             field="STAR") from exc
    out = {}
    for name, block in blocks.items():
        out[name] = block if isinstance(block, pd.DataFrame) else pd.DataFrame([block])
    if not out:
        raise CsptInputError("has no data block", file=path, field="STAR", expected="a data_ block")
    return out


def _block(path: Path, blocks: dict[str, pd.DataFrame], name: str | None, required: tuple[str, ...]) -> pd.DataFrame:
    if name is not None and name in blocks:
        df = blocks[name]
    elif name is None or len(blocks) == 1:
        df = next(iter(blocks.values()))
    else:
        raise CsptInputError(f"has no data_{name} block (found {sorted(blocks)})", file=path, field=f"data_{name}")
    repeated = df.columns[df.columns.duplicated()]
    if len(repeated):
        raise CsptInputError("appears twice", file=path, field=str(repeated[0]),
                             expected="each column once per data block")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise CsptInputError("is missing", file=path, field=missing[0], expected=f"columns {', '.join(required)}")
    return df


def _numbers(df: pd.DataFrame, column: str, path: Path | None) -> NDArray[np.float64]:
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(values)):
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise CsptInputError(f"row {bad + 1} is {df[column].iloc[bad]!r}", file=path, field=column,
                             expected="finite numbers")
    return values


def _rotation_x(angle_deg: ArrayLike) -> NDArray[np.float64]:
    """Right-handed rotation about X, built from geometry's R_z and R_y: ``R_z(-90) R_y(a) R_z(90)``."""
    return geometry.rotation_z(-90.0) @ geometry.rotation_y(angle_deg) @ geometry.rotation_z(90.0)


def write_star_blocks(path: str | os.PathLike[str], blocks: Mapping[str, pd.DataFrame]) -> None:
    """Write data blocks (``{name: DataFrame}``) as a STAR file, atomically, floats with 6 decimals."""
    import starfile

    with atomic_path(path) as tmp:
        starfile.write(dict(blocks), tmp, float_format="%.6f")


def _relion_centre_offset(shape_yx: tuple[int, int]) -> NDArray[np.float64]:
    """RELION's integer image centre minus ours: ``(int(nx/2) - (nx-1)/2, int(ny/2) - (ny-1)/2)``."""
    ny, nx = shape_yx
    return np.array([nx // 2 - (nx - 1) / 2.0, ny // 2 - (ny - 1) / 2.0])


# ---------------------------------------------------------------------------------------------- RELION 5
@dataclass(frozen=True, eq=False)
class Relion5TiltSeries:
    """One row of a RELION 5 ``tomograms.star`` with its tilt-series star.

    ``tilts`` (T rows, ids = row order of the tilt-series star), ``shift_px`` (T, 2) = ``rlnTomoX/YShiftAngst`` /
    ``pixel_A``, ``x_tilt_deg`` (T,), ``pixel_A`` = ``rlnTomoTiltSeriesPixelSize``, ``tomogram_size`` (w, h, d) or
    None, ``global_row`` (every column of the tomograms.star row) and ``table`` (the tilt-series star as read), kept so
    that writing back loses nothing."""

    name: str
    tilts: TiltTable
    shift_px: NDArray[np.float64]
    x_tilt_deg: NDArray[np.float64]
    pixel_A: float
    tomogram_size: tuple[int, int, int] | None
    global_row: dict[str, Any]
    table: pd.DataFrame

    @property
    def hand(self) -> float:
        return float(self.global_row.get("rlnTomoHand", 1.0))

    def _tomogram_fraction(self) -> NDArray[np.float64]:
        if self.tomogram_size is None:
            return np.zeros(3)
        size = np.asarray(self.tomogram_size, dtype=np.float64)
        return size / 2.0 - np.floor(size / 2.0)

    def _x_rotation(self) -> NDArray[np.float64]:
        return _rotation_x(float(np.median(self.x_tilt_deg))) if len(self.x_tilt_deg) else np.eye(3)


def _series_tilts(table: pd.DataFrame, path: Path) -> tuple[TiltTable, NDArray, NDArray]:
    n = len(table)
    if n == 0:
        raise CsptInputError("has no tilts", file=path, field="tilt series", expected="one row per tilt image")
    aligned = all(c in table.columns for c in ("rlnTomoYTilt", "rlnTomoZRot"))
    if aligned:
        angle, axis = _numbers(table, "rlnTomoYTilt", path), _numbers(table, "rlnTomoZRot", path)
    elif "rlnTomoNominalStageTiltAngle" in table.columns:
        angle = _numbers(table, "rlnTomoNominalStageTiltAngle", path)
        axis = (_numbers(table, "rlnTomoNominalTiltAxisAngle", path) if "rlnTomoNominalTiltAxisAngle" in table
                else np.zeros(n))
    else:
        raise CsptInputError("is missing", file=path, field="rlnTomoYTilt",
                             expected="rlnTomoYTilt/rlnTomoZRot or rlnTomoNominalStageTiltAngle")
    shift = np.zeros((n, 2))
    for k, col in enumerate(("rlnTomoXShiftAngst", "rlnTomoYShiftAngst")):
        if col in table.columns:
            shift[:, k] = _numbers(table, col, path)
    x_tilt = _numbers(table, "rlnTomoXTilt", path) if "rlnTomoXTilt" in table.columns else np.zeros(n)
    defocus = np.zeros(n)
    if "rlnDefocusU" in table.columns:
        dfv = "rlnDefocusV" if "rlnDefocusV" in table.columns else "rlnDefocusU"
        defocus = 0.5 * (_numbers(table, "rlnDefocusU", path) + _numbers(table, dfv, path)) * 1e-4
    order, dose = None, np.zeros(n)
    if "rlnMicrographPreExposure" in table.columns:
        pre = _numbers(table, "rlnMicrographPreExposure", path)
        order = np.argsort(np.argsort(pre, kind="stable"), kind="stable")
        by_order = np.argsort(order)
        steps = np.diff(pre[by_order])
        last = float(np.median(steps)) if len(steps) else 0.0
        dose[by_order] = np.append(steps, last)
    tilts = TiltTable.from_angles(angle, defocus_um=defocus, axis_deg=axis, dose=dose, order=order)
    return tilts, shift, x_tilt


def read_relion5_tomograms(
    path: str | os.PathLike[str], *, project_dir: str | os.PathLike[str] | None = None
) -> dict[str, Relion5TiltSeries]:
    """Read a RELION 5 ``tomograms.star`` and the tilt-series star of each tomogram, keyed by ``rlnTomoName``.

    ``rlnTomoTiltSeriesStarFile`` paths are relative to the RELION project directory: ``project_dir`` or, by
    default, the nearest folder above ``path`` from which they resolve."""
    path = Path(path)
    blocks = read_star_blocks(path)
    table = _block(path, blocks, "global", ("rlnTomoName", "rlnTomoTiltSeriesPixelSize", "rlnTomoTiltSeriesStarFile"))
    out: dict[str, Relion5TiltSeries] = {}
    for i, row in enumerate(table.to_dict("records")):
        name = str(row["rlnTomoName"])
        pixel = float(_numbers(table.iloc[[i]], "rlnTomoTiltSeriesPixelSize", path)[0])
        if not pixel > 0:
            raise CsptInputError(f"is {pixel} for {name}", file=path, field="rlnTomoTiltSeriesPixelSize",
                                 expected="> 0 Å")
        ts_path = _resolve_project_path(path, str(row["rlnTomoTiltSeriesStarFile"]), project_dir)
        ts_table = _block(ts_path, read_star_blocks(ts_path), name, ())
        tilts, shift_A, x_tilt = _series_tilts(ts_table, ts_path)
        size = None
        if all(f"rlnTomoSize{a}" in table.columns for a in "XYZ"):
            size = tuple(int(v) for v in _numbers(table.iloc[[i]], "rlnTomoSizeX", path).tolist()
                         + _numbers(table.iloc[[i]], "rlnTomoSizeY", path).tolist()
                         + _numbers(table.iloc[[i]], "rlnTomoSizeZ", path).tolist())
            size = size if min(size) > 0 else None
        out[name] = Relion5TiltSeries(name, tilts, shift_A / pixel, x_tilt, pixel, size, dict(row), ts_table)
    return out


def _resolve_project_path(star_path: Path, relative: str, project_dir: str | os.PathLike[str] | None) -> Path:
    rel = Path(relative)
    if rel.is_absolute():
        candidates = [rel]
    elif project_dir is not None:
        candidates = [Path(project_dir) / rel]
    else:
        candidates = [parent / rel for parent in star_path.resolve().parents]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise CsptInputError(f"{relative} not found", file=star_path, field="rlnTomoTiltSeriesStarFile",
                         expected="a tilt-series star relative to the RELION project directory (pass project_dir)")


def relion5_tracks(
    series: Relion5TiltSeries,
    centered_A: ArrayLike,
    image_shape_yx: tuple[int, int],
    *,
    euler_deg: ArrayLike | None = None,
) -> TrackSet:
    """2D tracks of particles at ``centered_A`` (P, 3) (``rlnCenteredCoordinate*Angst``) in every tilt of
    ``series``, by RELION 5's projection (see the module docstring). ``euler_deg`` (P, 3) optional RELION
    ``(rot, tilt, psi)``. Particle ids are ``0..P-1``."""
    c = np.asarray(centered_A, dtype=np.float64).reshape(-1, 3)
    n_p, n_t = len(c), len(series.tilts)
    rel = c / series.pixel_A + series._tomogram_fraction()
    t = series.tilts
    full = geometry.tilt_matrices(t.angle_deg, t.axis_deg) @ _rotation_x(series.x_tilt_deg)  # (T, 3, 3)
    pid = np.repeat(np.arange(n_p), n_t)
    trow = np.tile(np.arange(n_t), n_p)
    centre = geometry.image_center_px(image_shape_yx) + _relion_centre_offset(image_shape_yx)
    positions = centre + series.shift_px[trow] + np.einsum("nij,nj->ni", full[trow], rel[pid])[:, :2]
    xyz = rel @ series._x_rotation().T
    eul = np.zeros((n_p, 3))
    if euler_deg is not None:
        e = np.asarray(euler_deg, dtype=np.float64).reshape(-1, 3)
        eul = e[:, ::-1].copy()  # RELION (rot, tilt, psi) -> stored (psi, theta, phi)
    particles = ParticleTable(np.arange(n_p), xyz, eul)
    return TrackSet.from_positions(pid, t.id[trow], positions, t, image_shape_yx, particles=particles)


def read_relion5_particle_table(
    path: str | os.PathLike[str], tomograms: Sequence[str] | None = None
) -> pd.DataFrame:
    """The particles block of a RELION 5 particles star (``rlnTomoName`` + ``rlnCenteredCoordinate*Angst`` and any
    other columns), only the rows of ``tomograms`` when given (each must have rows), in file order."""
    path = Path(path)
    df = _block(path, read_star_blocks(path), "particles", ("rlnTomoName",) + _COORDS)
    if tomograms is None:
        return df
    names = df["rlnTomoName"].astype(str)
    missing = [t for t in tomograms if not (names == t).any()]
    if missing:
        raise CsptInputError(f"has no particles of {missing[0]!r}", file=path, field="rlnTomoName",
                             expected=f"one of {sorted(dict.fromkeys(names))}")
    return df[names.isin(list(tomograms)).to_numpy()].reset_index(drop=True)


def read_relion5_particles(
    path: str | os.PathLike[str],
    series: Mapping[str, Relion5TiltSeries],
    image_shape_yx: tuple[int, int] | Mapping[str, tuple[int, int]],
    *,
    tomograms: Sequence[str] | None = None,
) -> dict[str, TrackSet]:
    """Read a RELION 5 particles star (``rlnTomoName`` + ``rlnCenteredCoordinate*Angst``, optional
    ``rlnAngleRot/Tilt/Psi``) into one TrackSet per tomogram (in order of first appearance; particle ids = order
    within the tomogram). ``tomograms``: only these (the star may name others); default every tomogram it names.
    ``image_shape_yx``: the tilt images' ``(ny, nx)``, one for all or per tomogram name."""
    path = Path(path)
    df = read_relion5_particle_table(path, tomograms)
    names = df["rlnTomoName"].astype(str).to_numpy()
    coords = np.column_stack([_numbers(df, col, path) for col in _COORDS])
    has_angles = all(a in df.columns for a in _ANGLES)
    angles = np.column_stack([_numbers(df, a, path) for a in _ANGLES]) if has_angles else None
    out = {}
    for name in dict.fromkeys(names):
        if name not in series:
            raise CsptInputError(f"names tomogram {name!r}, which the tomograms star does not list", file=path,
                                 field="rlnTomoName", expected=f"one of {sorted(series)}")
        shape = image_shape_yx[name] if isinstance(image_shape_yx, Mapping) else image_shape_yx
        rows = names == name
        out[name] = relion5_tracks(series[name], coords[rows], tuple(shape),
                                   euler_deg=None if angles is None else angles[rows])
    return out


def relion5_series_from_tracks(series: Relion5TiltSeries, tracks: TrackSet) -> Relion5TiltSeries:
    """``series`` with the tilts of ``tracks`` and per-tilt shifts from its projections (median of
    ``shift - centre offset`` per tilt; tilts without projections keep theirs)."""
    if not np.array_equal(tracks.tilts.id, series.tilts.id):
        raise CsptInputError("has different tilt ids than the tilt series", field="tracks.tilts",
                             expected=f"ids 0..{len(series.tilts) - 1} (rows of the tilt-series star)")
    shift = series.shift_px.copy()
    if len(tracks):
        offset = tracks.shift_px - _relion_centre_offset(tracks._require_shape())
        trow = tracks.tilt_rows()
        for row in np.unique(trow):
            shift[row] = np.median(offset[trow == row], axis=0)
    return replace(series, tilts=tracks.tilts, shift_px=shift)


def relion5_series(
    name: str,
    tracks: TrackSet,
    pixel_A: float,
    *,
    tomogram_size: tuple[int, int, int] | None = None,
    micrograph_names: list[str] | None = None,
    voltage_kV: float = 300.0,
    cs_mm: float = 2.7,
    amp_contrast: float = 0.1,
    hand: float = -1.0,
) -> Relion5TiltSeries:
    """A new RELION 5 tilt series for ``tracks`` (tilts, per-tilt shifts from the projections, optics).

    ``micrograph_names``: one image per tilt (default ``"<section>@<name>.mrcs"``, RELION's image-in-stack syntax,
    section = tilt id + 1); ``tomogram_size`` (w, h, d) px defaults to the image size and an even depth holding every
    particle with 32 px to spare."""
    if not (np.isfinite(pixel_A) and pixel_A > 0):
        raise CsptInputError(f"is {pixel_A}", field="pixel_A", expected="> 0 Å")
    ny, nx = tracks._require_shape()
    t = tracks.tilts
    if micrograph_names is None:
        micrograph_names = [f"{int(i) + 1:06d}@{name}.mrcs" for i in t.id]
    if len(micrograph_names) != len(t):
        raise CsptInputError(f"has {len(micrograph_names)} names for {len(t)} tilts", field="micrograph_names",
                             expected="one name per tilt")
    if tomogram_size is None:
        depth = 2 * int(np.ceil(np.abs(tracks.particles.xyz_px[:, 2]).max(initial=0.0) + 32))
        tomogram_size = (int(nx), int(ny), depth)
    table = pd.DataFrame({"rlnMicrographName": list(micrograph_names), "rlnTomoNominalStageTiltAngle": t.angle_deg})
    row = {"rlnTomoName": name, "rlnVoltage": voltage_kV, "rlnSphericalAberration": cs_mm,
           "rlnAmplitudeContrast": amp_contrast, "rlnMicrographOriginalPixelSize": pixel_A, "rlnTomoHand": hand,
           "rlnTomoTiltSeriesPixelSize": pixel_A}
    blank = Relion5TiltSeries(name, t, np.zeros((len(t), 2)), np.zeros(len(t)), float(pixel_A),
                              tuple(int(v) for v in tomogram_size), row, table)
    return relion5_series_from_tracks(blank, tracks)


def _tilt_series_table(series: Relion5TiltSeries) -> pd.DataFrame:
    table = series.table.copy()
    t = series.tilts
    table["rlnTomoXTilt"] = series.x_tilt_deg
    table["rlnTomoYTilt"] = t.angle_deg
    table["rlnTomoZRot"] = t.axis_deg
    table["rlnTomoXShiftAngst"] = series.shift_px[:, 0] * series.pixel_A
    table["rlnTomoYShiftAngst"] = series.shift_px[:, 1] * series.pixel_A
    table["rlnMicrographPreExposure"] = t.accumulated_dose()
    if "rlnDefocusU" in table.columns:
        dfv = "rlnDefocusV" if "rlnDefocusV" in table.columns else "rlnDefocusU"
        old = 0.5 * (pd.to_numeric(table["rlnDefocusU"]) + pd.to_numeric(table[dfv])).to_numpy()
        change = t.defocus_um * 1e4 - old
        if np.any(np.abs(change) > 1e-3):
            table["rlnDefocusU"] = pd.to_numeric(table["rlnDefocusU"]) + change
            if dfv != "rlnDefocusU":
                table[dfv] = pd.to_numeric(table[dfv]) + change
    else:
        table["rlnDefocusU"] = table["rlnDefocusV"] = t.defocus_um * 1e4
    return table


def write_relion5_tomograms(
    path: str | os.PathLike[str],
    series: Mapping[str, Relion5TiltSeries],
    *,
    project_dir: str | os.PathLike[str] | None = None,
) -> list[Path]:
    """Write ``tomograms.star`` at ``path`` and each tilt series to ``<path's folder>/tilt_series/<name>.star``.

    ``rlnTomoTiltSeriesStarFile`` is written relative to ``project_dir`` (default: ``path``'s folder). Returns the
    files written."""
    path = Path(path)
    base = Path(project_dir) if project_dir is not None else path.parent
    written, rows = [], []
    for name, s in series.items():
        ts_path = path.parent / "tilt_series" / f"{name}.star"
        write_star_blocks(ts_path, {name: _tilt_series_table(s)})
        written.append(ts_path)
        row = dict(s.global_row)
        row.update(rlnTomoName=name, rlnTomoTiltSeriesPixelSize=s.pixel_A,
                   rlnTomoTiltSeriesStarFile=os.path.relpath(ts_path, base))
        if s.tomogram_size is not None:
            row.update(zip(("rlnTomoSizeX", "rlnTomoSizeY", "rlnTomoSizeZ"), s.tomogram_size))
        rows.append(row)
    write_star_blocks(path, {"global": pd.DataFrame(rows)})
    return [path, *written]


def write_relion5_particles(
    path: str | os.PathLike[str], tracks: Mapping[str, TrackSet], series: Mapping[str, Relion5TiltSeries],
    *, base: Mapping[str, pd.DataFrame] | None = None,
) -> None:
    """Write a RELION 5 particles star: ``rlnTomoName`` and ``rlnCenteredCoordinate*Angst`` of every particle (in
    tomogram order, then particle id), plus ``rlnAngleRot/Tilt/Psi`` when any particle has an orientation.

    ``base`` (per tomogram, the rows as read by :func:`read_relion5_particle_table`, row k = particle id k): every
    column of those rows is carried through and only the coordinates (and angles, when the rows had them or a
    particle has an orientation) are replaced; particles the rows do not have get 0 (numbers) or "" (text) there."""
    frames = []
    for name, ts in tracks.items():
        if name not in series:
            raise CsptInputError(f"is {name!r}, which has no tilt series", field="tracks", expected=f"{sorted(series)}")
        s = series[name]
        rel = ts.particles.xyz_px @ s._x_rotation()  # undo R_x (orthonormal)
        centered = (rel - s._tomogram_fraction()) * s.pixel_A
        frame = _base_rows(base.get(name) if base else None, ts.particles.id, name)
        for k, col in enumerate(_COORDS):
            frame[col] = centered[:, k]
        had_angles = all(a in frame.columns for a in _ANGLES)
        if had_angles or np.any(ts.particles.euler_deg):
            frame[list(_ANGLES)] = ts.particles.euler_deg[:, ::-1]
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["rlnTomoName", *_COORDS])
    write_star_blocks(path, {"particles": df})


def _base_rows(rows: pd.DataFrame | None, ids: NDArray[np.int64], name: str) -> pd.DataFrame:
    """The carried-through rows of particles ``ids`` (row k of ``rows`` = id k); new ids get blank values."""
    if rows is None:
        return pd.DataFrame({"rlnTomoName": [name] * len(ids)})
    rows = rows.reset_index(drop=True)
    known = ids < len(rows)
    out = rows.iloc[ids[known]].reset_index(drop=True)
    if not known.all():
        blank = {c: (0 if rows[c].dtype.kind in "biuf" else "") for c in rows.columns}
        blank["rlnTomoName"] = name
        extra = pd.DataFrame([blank] * int((~known).sum()), columns=rows.columns)
        out = pd.concat([out, extra], ignore_index=True)
        out = out.iloc[np.argsort(np.r_[np.flatnonzero(known), np.flatnonzero(~known)])]
    return out.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- particle series
@dataclass(frozen=True, eq=False)
class ParticleSeriesStar:
    """A Warp/RELION-3 particle-series star as tracks. ``tracks``: particles = groups (ids ``0..P-1`` in order of
    appearance, names in ``group_names``), tilts = micrographs (ids ``0..T-1`` by frame number, names in
    ``micrographs``). Per star row (R): ``projection_row`` (row in ``tracks``), ``image_name``, ``euler_deg`` (R, 3)
    RELION ``(rot, tilt, psi)`` of the tilt image, ``defocus_u_A``/``defocus_v_A``/``defocus_angle_deg`` (R,).
    ``pixel_A``: ``rlnDetectorPixelSize * 1e4 / rlnMagnification`` (None if absent); ``optics``: voltage_kV, cs_mm,
    amp_contrast, phase_shift_deg; ``table``: the star as read."""

    tracks: TrackSet
    projection_row: NDArray[np.int64]
    group_names: list[str]
    micrographs: list[str]
    image_name: NDArray[np.str_]
    euler_deg: NDArray[np.float64]
    defocus_u_A: NDArray[np.float64]
    defocus_v_A: NDArray[np.float64]
    defocus_angle_deg: NDArray[np.float64]
    pixel_A: float | None
    optics: dict[str, float]
    table: pd.DataFrame


def _frame_number(name: str) -> int | None:
    match = re.search(r"(\d+)(?=\.[A-Za-z0-9]+$)", PurePath(name).name)
    return int(match.group(1)) if match else None


def _micrograph_angles(df: pd.DataFrame, micrographs: list[str], mic_of_row: NDArray, path: Path,
                       angles_deg: Mapping[str, float] | None) -> NDArray[np.float64]:
    if angles_deg is not None:
        missing = [m for m in micrographs if m not in angles_deg]
        if missing:
            raise CsptInputError(f"has no angle for {missing[0]!r}", field="angles_deg",
                                 expected="an angle for every rlnMicrographName")
        return np.array([float(angles_deg[m]) for m in micrographs])
    if "rlnCtfScalefactor" not in df.columns:
        raise CsptInputError("is missing", file=path, field="rlnCtfScalefactor",
                             expected="per-image cos(tilt), or pass angles_deg={micrograph: angle}")
    scale = _numbers(df, "rlnCtfScalefactor", path)
    if np.any(scale <= 0) or np.any(scale > 1 + 1e-6):
        raise CsptInputError("has values outside (0, 1]", file=path, field="rlnCtfScalefactor",
                             expected="cos(tilt angle)")
    magnitude = np.degrees(np.arccos(np.clip(scale, -1, 1)))
    per_mic = np.array([np.median(magnitude[mic_of_row == k]) for k in range(len(micrographs))])
    pivot = int(np.argmin(per_mic))  # micrographs are sorted by frame number
    return np.where(np.arange(len(micrographs)) < pivot, -per_mic, per_mic)


def _axis_and_orientations(euler: NDArray, angle_row: NDArray, particle_row: NDArray,
                           n_particles: int) -> tuple[float, NDArray[np.float64]]:
    """Tilt axis (deg) from how each particle's image orientation turns with tilt, and the particles' own
    orientations ``(P, 3)`` as stored in a TrackSet (psi, theta, phi)."""
    mats = geometry.euler_to_matrix(euler[:, 0], euler[:, 1], euler[:, 2])
    ref_row = np.array([np.flatnonzero(particle_row == p)[np.argmin(np.abs(angle_row[particle_row == p]))]
                        for p in range(n_particles)])
    rel = mats @ np.swapaxes(mats[ref_row[particle_row]], -1, -2)
    delta = angle_row - angle_row[ref_row[particle_row]]
    rotvec = 0.5 * np.stack([rel[:, 2, 1] - rel[:, 1, 2], rel[:, 0, 2] - rel[:, 2, 0], rel[:, 1, 0] - rel[:, 0, 1]], 1)
    direction = (rotvec[:, :2] * np.sign(delta)[:, None]).sum(axis=0)
    axis = float(np.degrees(np.arctan2(-direction[0], direction[1]))) if np.any(direction) else 0.0
    ref_mats = mats[ref_row]
    undo = np.swapaxes(geometry.tilt_matrices(angle_row[ref_row], axis), -1, -2)
    phi, theta, psi = geometry.matrix_to_euler(undo @ ref_mats)
    return axis, np.column_stack([psi, theta, phi])


def read_particle_series_star(
    path: str | os.PathLike[str],
    image_shape_yx: tuple[int, int],
    *,
    angles_deg: Mapping[str, float] | None = None,
) -> ParticleSeriesStar:
    """Read a Warp/RELION-3 particle-series star (see the module docstring) into tracks.

    ``image_shape_yx``: size of the tilt images the coordinates refer to; ``angles_deg``: optional tilt angle per
    ``rlnMicrographName`` (default from ``rlnCtfScalefactor`` and the frame numbers)."""
    path = Path(path)
    blocks = read_star_blocks(path)
    required = ("rlnGroupName", "rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY")
    df = _block(path, blocks, "particles" if "particles" in blocks else None, required)
    if df.empty:
        raise CsptInputError("has no rows", file=path, field="data_particles",
                             expected="one row per particle per tilt image")
    groups = df["rlnGroupName"].astype(str).to_numpy()
    mics = df["rlnMicrographName"].astype(str).to_numpy()
    group_names = list(dict.fromkeys(groups))
    numbers = {m: _frame_number(m) for m in dict.fromkeys(mics)}
    if angles_deg is None and any(v is None for v in numbers.values()):
        bad = next(m for m, v in numbers.items() if v is None)
        raise CsptInputError(f"{bad!r} has no frame number", file=path, field="rlnMicrographName",
                             expected="names ending in a number (or pass angles_deg)")
    micrographs = sorted(numbers, key=lambda m: (numbers[m] is None, numbers[m] or 0, m))
    particle_row = pd.Index(group_names).get_indexer(groups)
    mic_row = pd.Index(micrographs).get_indexer(mics)
    angle = _micrograph_angles(df, micrographs, mic_row, path, angles_deg)
    xy = np.column_stack([_numbers(df, "rlnCoordinateX", path), _numbers(df, "rlnCoordinateY", path)])
    n_rows, n_p, n_t = len(df), len(group_names), len(micrographs)

    def col(name: str, default: float) -> NDArray[np.float64]:
        return _numbers(df, name, path) if name in df.columns else np.full(n_rows, default)

    dfu, dfv, dfa = col("rlnDefocusU", 0.0), col("rlnDefocusV", np.nan), col("rlnDefocusAngle", 0.0)
    dfv = np.where(np.isnan(dfv), dfu, dfv)
    euler = np.column_stack([col(a, 0.0) for a in _ANGLES])
    axis, particle_euler = (_axis_and_orientations(euler, angle[mic_row], particle_row, n_p) if
                            all(a in df.columns for a in _ANGLES) else (0.0, np.zeros((n_p, 3))))
    defocus_um = np.array([np.median(0.5 * (dfu + dfv)[mic_row == k]) for k in range(n_t)]) * 1e-4
    bfac = col("rlnCtfBfactor", 0.0)
    exposure = np.array([np.median(-bfac[mic_row == k]) for k in range(n_t)]) / 4.0
    order = np.argsort(np.argsort(exposure, kind="stable"), kind="stable")
    by_order = np.argsort(order)
    steps = np.diff(exposure[by_order])
    dose = np.zeros(n_t)
    dose[by_order] = np.append(steps, np.median(steps) if len(steps) else 0.0)
    tilts = TiltTable.from_angles(angle, defocus_um=defocus_um, axis_deg=axis, dose=dose, order=order)
    pairs = particle_row.astype(np.int64) * n_t + mic_row
    if np.unique(pairs).size != n_rows:
        raise CsptInputError("has two rows for the same particle and micrograph", file=path,
                             field="rlnGroupName/rlnMicrographName", expected="one row per particle per tilt image")
    particles = ParticleTable(np.arange(n_p), np.zeros((n_p, 3)), particle_euler)
    tracks = TrackSet.from_positions(particle_row, mic_row, xy, tilts, image_shape_yx, particles=particles)
    order_rows = np.lexsort((mic_row, particle_row))
    projection_row = np.empty(n_rows, np.int64)
    projection_row[order_rows] = np.arange(n_rows)
    tracks = tracks.sorted()
    optics = {key: float(col(name, default)[0]) for key, name, default in (
        ("voltage_kV", "rlnVoltage", 300.0), ("cs_mm", "rlnSphericalAberration", 2.7),
        ("amp_contrast", "rlnAmplitudeContrast", 0.1), ("phase_shift_deg", "rlnPhaseShift", 0.0))}
    pixel = None
    if "rlnDetectorPixelSize" in df.columns and "rlnMagnification" in df.columns:
        pixel = float(col("rlnDetectorPixelSize", 0.0)[0] * 1e4 / col("rlnMagnification", 1.0)[0])
    names = df["rlnImageName"].astype(str).to_numpy() if "rlnImageName" in df.columns else np.full(n_rows, "")
    return ParticleSeriesStar(tracks, projection_row, group_names, micrographs, names, euler, dfu, dfv, dfa,
                              pixel, optics, df)
