"""cisTEM binary parameter files (``.cistem``), pyp's ``_extended.cistem``, and their mapping to a :class:`TrackSet`.

Binary layout (all little-endian; checked against cisTEM's ``cistem_star_file_reader.cpp``/``cistem_parameters.cpp``
and pyp's ``pyp/inout/metadata/cistem_star_file.py``)
--------------------------------------------------------------------------------------------------------------------
``.cistem`` (one table)::

    int32 n_columns, int32 n_rows
    n_columns x (int64 column code, int8 type code)
    n_rows x packed row (each column in header order, no padding)

Type codes: INTEGER=2 (int32), FLOAT=3 (float32), LONG=5 (int64), DOUBLE=6 (float64), CHAR=7 (int8), VARLEN=8
(int32 byte count followed by that many bytes, no terminator), UINT=9 (uint32). cisTEM reads known columns by code
with a fixed type and skips unknown codes using the type byte; pyp reads every column by code with a fixed type and
refuses unknown codes; pyp also addresses columns by *position* in its fixed 32-column list, so the writer below
always writes exactly :data:`MAIN_LAYOUT`, in that order, with pyp's types.

``_extended.cistem`` (pyp only): two blocks, particles first, then tilts; each block is::

    int64 block code (PIND=15 particles, TIND=35 tilts), int32 n_columns, int32 n_rows,
    n_columns x (int64 column code, int8 type code), n_rows x packed row

pyp reads the block columns by position (:data:`PARTICLE_LAYOUT`, :data:`TILT_LAYOUT`).

The pair (:func:`write_pair`, :func:`read_pair`): each file is written atomically, the ``.cistem`` first; the
``_extended.cistem`` then ends with a 40-byte trailer, :data:`PAIR_MAGIC` + the SHA-256 of the ``.cistem`` file
written with it. pyp reads its two blocks and stops, so it never sees the trailer. Reading a pair, a ``.cistem``
whose digest differs is either a write of ours torn between the two renames (each write first leaves
``.{name}.pair-writing`` beside the pair, :data:`PAIR_WRITING`, removed when both files are in place: refused) or a
``.cistem`` rewritten by another program (pyp rewrites only the main file: read, with a warning). Files without a
trailer (pyp's) are read as they are.

Meaning of the columns (pyp's rules, from nextpyp/pyp ``src/pyp/inout/metadata/core.py`` ``tomo_extract_coordinates``
and ``src/pyp/extract/core.py`` ``extract_particles_non_mpi``); :func:`tables_from_tracks` writes them,
:func:`tracks_from_tables` reads them
----------------------------------------------------------------------------------------------------------------------
* ``ORIGINAL_X/Y_POSITION`` = where pyp cuts the box: the integer ``floor`` of the projection's position in IMOD's
  corner-origin pixel coordinates (``x_numpy + 0.5``); pyp's extraction centres the box (pixel ``box // 2``) on
  that pixel. ``X/Y_SHIFT`` = only the sub-pixel remainder ``ORIGINAL - position`` (in ``(-1, 0]`` px), in Å
  scaled as pyp scales it, by ``scope_pixel * data_bin * extract_bin``, while ``PIXEL_SIZE`` = ``scope_pixel *
  data_bin`` (the tilt stack's pixel). Reading: position = ``ORIGINAL - X_SHIFT / (PIXEL_SIZE * extract_bin)``
  (corner origin), the track shift = position - image centre - projection of the 3D point.
* When the image size is not known (the seed's ``create_cistem_from_2d_tracks`` on a ``track_data`` dict, before
  ``{name}.pkl`` exists), ``ORIGINAL_X/Y_POSITION`` = 0 and ``X/Y_SHIFT`` = the whole track shift x ``PIXEL_SIZE``
  (the seed's meaning); a file whose ``ORIGINAL_*`` are all 0 (or not integers) is read that way.
* ``ORIGINAL_X/Y/Z_POSITION_3D`` (extended file) = the particle's absolute position in the unbinned reconstruction
  (pyp: ``x_position_3d``), i.e. the model's centre-relative point + half the reconstruction's size (``tomo`` of
  ``{name}.pkl`` x ``tomo_rec_binning``; :func:`napari_cspt2d.io.metadata.pyp_tomogram_px`). In the seed's form
  (no image size) they are the centre-relative point.
* ``TILTAXIS`` = minus the model's ``axis_deg`` (pyp stores ``-axis`` of the rotation of the inverse alignment
  transform, the rotation taking aligned coordinates into the raw image, which is ``axis_deg``).
* ``IMIND`` = tilt id = 0-based section of ``{name}_stack.mrc``; ``TIND`` = acquisition (scan) order, as in pyp
  (pyp's dose weighting and ``csp_UseImagesForRefinementMin/Max`` work on ``TIND``); the tilts block is keyed by
  ``TIND``. ``RIND`` (region) and ``FIND`` (frame) are 0.
* ``PSI/THETA/PHI`` = orientation of the projection, ``R_z(axis) R_y(tilt) A_particle`` (pyp composes them the
  same way); the particle's own angles are ``PPSI/PTHETA/PPHI`` in the particles block.
* ``DEFOCUS_1 = DEFOCUS_2`` (Å) = tilt defocus − height of the particle in that tilt (``z'`` of
  :func:`~napari_cspt2d.geometry.project_points` × pixel), like pyp's per-particle defocus offset.
* ``IMAGE_IS_ACTIVE`` = 0 (pyp uses it as the film index; cisTEM keeps every line with a value >= 0),
  ``SIGMA`` = 1, ``LOGP`` = 0, everything else pyp writes is 0.
* ``TSHIFT_X/Y`` (Å of the tilt-stack pixel) = per-tilt image shift refined by ``csp_refine_micrographs``
  (:mod:`napari_cspt2d.recon.constrained`); informational for the projections, whose positions already include it
  (read back with :func:`tilt_shifts_px`).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from difflib import get_close_matches
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import CsptInputError, warn_input
from ..model.tracks import ParticleTable, TiltTable, TrackSet
from .. import geometry
from .atomic import atomic_open
from .metadata import pyp_tomogram_px

__all__ = [
    "INTEGER", "FLOAT", "LONG", "DOUBLE", "CHAR", "VARLEN", "UINT",
    "COLUMNS", "MAIN_LAYOUT", "PARTICLE_LAYOUT", "TILT_LAYOUT", "PARTICLES_BLOCK", "TILTS_BLOCK", "DATA_COLUMNS",
    "PAIR_MAGIC", "PAIR_WRITING", "CistemTable", "column_code", "column_name", "read_cistem", "write_cistem",
    "read_extended", "write_extended", "read_pair", "write_pair", "extended_path",
    "tables_from_tracks", "tracks_from_tables", "tilt_shifts_px", "check_tables", "projection_data",
]

# ------------------------------------------------------------------------------------------------ codes and layouts
INTEGER, FLOAT, LONG, DOUBLE, CHAR, VARLEN, UINT = 2, 3, 5, 6, 7, 8, 9
_FIXED_DTYPES = {INTEGER: "<i4", FLOAT: "<f4", LONG: "<i8", DOUBLE: "<f8", CHAR: "i1", UINT: "<u4"}
_TYPE_NAMES = {INTEGER: "INTEGER", FLOAT: "FLOAT", LONG: "LONG", DOUBLE: "DOUBLE", CHAR: "CHAR", VARLEN: "VARLEN",
               UINT: "UINT"}

_STANDARD = (  # cisTEM's columns; the code of the i-th is 2**i
    "POSITION_IN_STACK", "IMAGE_IS_ACTIVE", "PSI", "X_SHIFT", "Y_SHIFT", "DEFOCUS_1", "DEFOCUS_2", "DEFOCUS_ANGLE",
    "PHASE_SHIFT", "OCCUPANCY", "LOGP", "SIGMA", "SCORE", "SCORE_CHANGE", "PIXEL_SIZE", "MICROSCOPE_VOLTAGE",
    "MICROSCOPE_CS", "AMPLITUDE_CONTRAST", "BEAM_TILT_X", "BEAM_TILT_Y", "IMAGE_SHIFT_X", "IMAGE_SHIFT_Y", "THETA",
    "PHI", "STACK_FILENAME", "ORIGINAL_IMAGE_FILENAME", "REFERENCE_3D_FILENAME", "BEST_2D_CLASS", "BEAM_TILT_GROUP",
    "PARTICLE_GROUP", "PRE_EXPOSURE", "TOTAL_EXPOSURE", "ASSIGNED_SUBSET", "ORIGINAL_X_POSITION",
    "ORIGINAL_Y_POSITION",
)
_NOT_FLOAT = {"POSITION_IN_STACK": UINT, "IMAGE_IS_ACTIVE": INTEGER, "BEST_2D_CLASS": INTEGER,
              "BEAM_TILT_GROUP": INTEGER, "PARTICLE_GROUP": INTEGER, "ASSIGNED_SUBSET": INTEGER,
              "STACK_FILENAME": VARLEN, "ORIGINAL_IMAGE_FILENAME": VARLEN, "REFERENCE_3D_FILENAME": VARLEN}

#: name -> (column code, type code): cisTEM's standard columns (powers of two) and pyp's additions.
COLUMNS: dict[str, tuple[int, int]] = {
    **{name: (1 << bit, _NOT_FLOAT.get(name, FLOAT)) for bit, name in enumerate(_STANDARD)},
    # pyp: per-projection indices and frame shifts
    "IMIND": (20, INTEGER), "PIND": (15, INTEGER), "TIND": (35, INTEGER), "RIND": (70, INTEGER), "FIND": (55, INTEGER),
    "FSHIFT_X": (11, FLOAT), "FSHIFT_Y": (121, FLOAT),
    # pyp extended file: particles block
    "PSHIFT_X": (3, FLOAT), "PSHIFT_Y": (9, FLOAT), "PSHIFT_Z": (27, FLOAT), "PPSI": (81, FLOAT),
    "PTHETA": (273, FLOAT), "PPHI": (819, FLOAT), "ORIGINAL_X_POSITION_3D": (2457, FLOAT),
    "ORIGINAL_Y_POSITION_3D": (7371, FLOAT), "ORIGINAL_Z_POSITION_3D": (22113, FLOAT), "PSCORE": (66339, FLOAT),
    "POCC": (199017, FLOAT),
    # pyp extended file: tilts block
    "TSHIFT_X": (7, FLOAT), "TSHIFT_Y": (49, FLOAT), "TILTANG": (343, FLOAT), "TILTAXIS": (2401, FLOAT),
}
_NAME_OF = {code: name for name, (code, _) in COLUMNS.items()}
_TYPE_OF = {code: typ for code, typ in COLUMNS.values()}

#: pyp's ``Parameters.HEADERS``: the columns (and order) of every ``.cistem`` file written here.
MAIN_LAYOUT = (
    "POSITION_IN_STACK", "PSI", "THETA", "PHI", "X_SHIFT", "Y_SHIFT", "DEFOCUS_1", "DEFOCUS_2", "DEFOCUS_ANGLE",
    "PHASE_SHIFT", "IMAGE_IS_ACTIVE", "OCCUPANCY", "LOGP", "SIGMA", "SCORE", "PIXEL_SIZE", "MICROSCOPE_VOLTAGE",
    "MICROSCOPE_CS", "AMPLITUDE_CONTRAST", "BEAM_TILT_X", "BEAM_TILT_Y", "IMAGE_SHIFT_X", "IMAGE_SHIFT_Y",
    "ORIGINAL_X_POSITION", "ORIGINAL_Y_POSITION", "IMIND", "PIND", "TIND", "RIND", "FIND", "FSHIFT_X", "FSHIFT_Y",
)
#: Columns of the extended file's particles block (pyp's ``HEADERS_PARTICLES``).
PARTICLE_LAYOUT = ("PIND", "PSHIFT_X", "PSHIFT_Y", "PSHIFT_Z", "PPSI", "PTHETA", "PPHI", "ORIGINAL_X_POSITION_3D",
                   "ORIGINAL_Y_POSITION_3D", "ORIGINAL_Z_POSITION_3D", "PSCORE", "POCC")
#: Columns of the extended file's tilts block (pyp's ``HEADERS_TILTS``).
TILT_LAYOUT = ("TIND", "RIND", "TSHIFT_X", "TSHIFT_Y", "TILTANG", "TILTAXIS")
PARTICLES_BLOCK, TILTS_BLOCK = COLUMNS["PIND"][0], COLUMNS["TIND"][0]
#: Start of the trailer of an ``_extended.cistem`` written by :func:`write_pair` (then the ``.cistem``'s SHA-256).
PAIR_MAGIC = b"CSPTMAIN"
#: Suffix of the marker ``.{name}{PAIR_WRITING}`` that :func:`write_pair` leaves beside a pair while writing it.
PAIR_WRITING = ".pair-writing"
_PAIR_TRAILER_BYTES = len(PAIR_MAGIC) + hashlib.sha256().digest_size

#: Columns of :func:`projection_data` (``Parameters.data``): ids, frame, shifts in tilt-stack pixels, score, occupancy.
DATA_COLUMNS = ("pind", "tind", "frame", "shift_x_px", "shift_y_px", "score", "occupancy")

_MAX_COLUMNS = 4096
_HEADER_DTYPE = np.dtype([("code", "<i8"), ("type", "i1")])  # packed: 9 bytes per column
_INT_RANGES = {INTEGER: (-(2**31), 2**31 - 1), LONG: (-(2**63), 2**63 - 1), CHAR: (-128, 127), UINT: (0, 2**32 - 1)}


def column_code(key: str | int) -> int:
    """Column code of a column name (``"X_SHIFT"``) or code; unknown names raise with the closest valid name."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return int(key)
    if isinstance(key, str) and key.upper() in COLUMNS:
        return COLUMNS[key.upper()][0]
    close = get_close_matches(str(key).upper(), COLUMNS, n=1)
    raise CsptInputError(f"is not a cisTEM/pyp column{f'; did you mean {close[0]!r}?' if close else ''}",
                         field=str(key), expected="a column name such as 'X_SHIFT' or a column code")


def column_name(code: int) -> str:
    """Name of a column code (``"code_<n>"`` for codes neither cisTEM nor pyp define)."""
    return _NAME_OF.get(int(code), f"code_{int(code)}")


# ------------------------------------------------------------------------------------------------ table
@dataclass(frozen=True, eq=False)
class CistemTable:
    """One table of a ``.cistem`` file: ``codes``/``types`` (file order) and one 1-D array per column (``arrays``).

    Index it by name or code: ``table["X_SHIFT"]``, ``table[8]``. VARLEN columns are object arrays of ``str``."""

    codes: tuple[int, ...]
    types: tuple[int, ...]
    arrays: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        codes = tuple(int(c) for c in self.codes)
        types = tuple(int(t) for t in self.types)
        if not (len(codes) == len(types) == len(self.arrays)):
            raise CsptInputError("codes, types and arrays differ in length", field="table")
        if len(set(codes)) != len(codes):
            raise CsptInputError("has a column twice", field="table", expected="unique column codes")
        arrays = [_cast_column(code, typ, arr) for code, typ, arr in zip(codes, types, self.arrays)]
        if len({a.size for a in arrays}) > 1:
            raise CsptInputError("columns differ in length", field="table", expected="one value per row in each column")
        object.__setattr__(self, "codes", codes)
        object.__setattr__(self, "types", types)
        object.__setattr__(self, "arrays", tuple(arrays))

    @classmethod
    def from_columns(cls, columns: Mapping[str | int, ArrayLike]) -> CistemTable:
        """Table from ``{name or code: values}`` in the given order, each column with its standard type."""
        codes = [column_code(k) for k in columns]
        missing = [c for c in codes if c not in _TYPE_OF]
        if missing:
            raise CsptInputError(f"column code {missing[0]} has no standard type", field="table",
                                 expected="cisTEM/pyp column codes (or build CistemTable with explicit types)")
        return cls(tuple(codes), tuple(_TYPE_OF[c] for c in codes), tuple(np.asarray(v) for v in columns.values()))

    def __len__(self) -> int:
        return int(self.arrays[0].size) if self.arrays else 0

    def __contains__(self, key: object) -> bool:
        try:
            return column_code(key) in self.codes  # type: ignore[arg-type]
        except CsptInputError:
            return False

    def __getitem__(self, key: str | int) -> np.ndarray:
        code = column_code(key)
        if code not in self.codes:
            raise CsptInputError("is not in this table", field=column_name(code),
                                 expected=f"one of {', '.join(self.names)}")
        return self.arrays[self.codes.index(code)]

    def get(self, key: str | int, default: float) -> np.ndarray:
        """Column ``key`` as float64, or ``default`` repeated when the table has no such column."""
        return self[key].astype(np.float64) if key in self else np.full(len(self), float(default))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(column_name(c) for c in self.codes)


def _cast_column(code: int, typ: int, values: ArrayLike) -> np.ndarray:
    """``values`` as the 1-D array type ``typ`` stores; refuses NaN/inf floats and integers that do not fit."""
    name = column_name(code)
    if typ not in _TYPE_NAMES:
        raise CsptInputError(f"has type code {typ}", field=name, expected="2, 3, 5, 6, 7, 8 or 9")
    arr = np.asarray(values).reshape(-1)
    if typ == VARLEN:
        return arr.astype(object)
    if arr.dtype.kind not in "biuf":
        raise CsptInputError(f"has {arr.dtype} values", field=name, expected="numbers")
    if arr.dtype.kind == "f" and arr.size and not np.all(np.isfinite(arr)):
        raise CsptInputError("contains NaN or infinite values", field=name, expected="finite numbers")
    if typ in _INT_RANGES and arr.size:
        lo, hi = _INT_RANGES[typ]
        if arr.dtype.kind == "f" and np.any(arr != np.round(arr)):
            raise CsptInputError("has non-integer values", field=name, expected=f"{_TYPE_NAMES[typ]} values")
        if arr.min() < lo or arr.max() > hi:
            raise CsptInputError(f"has values outside {lo}..{hi}", field=name,
                                 expected=f"values that fit {_TYPE_NAMES[typ]}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(_FIXED_DTYPES[typ])
    if typ in (FLOAT, DOUBLE) and not np.all(np.isfinite(out)):
        raise CsptInputError("overflows its type", field=name, expected=f"values that fit {_TYPE_NAMES[typ]}")
    return out


def _table_for_layout(layout: Sequence[str], values: Mapping[str, ArrayLike], n: int) -> CistemTable:
    """A table with exactly ``layout``'s columns; columns not in ``values`` are zero."""
    return CistemTable.from_columns({name: values.get(name, np.zeros(n)) for name in layout})


# ------------------------------------------------------------------------------------------------ binary reading
def _fail(path: os.PathLike[str] | str, where: str, message: str, expected: str | None = None) -> CsptInputError:
    return CsptInputError(message, file=path, field=where, expected=expected)


def _parse_table(buf: bytes, offset: int, n_cols: int, n_rows: int, path: Path, where: str) -> tuple[CistemTable, int]:
    """Parse column headers and rows starting at ``offset``; returns the table and the offset after it."""
    if not 0 < n_cols <= _MAX_COLUMNS:
        raise _fail(path, f"{where}.n_columns", f"is {n_cols}", f"1..{_MAX_COLUMNS}")
    if n_rows < 0:
        raise _fail(path, f"{where}.n_rows", f"is {n_rows}", ">= 0")
    if offset + n_cols * _HEADER_DTYPE.itemsize > len(buf):
        raise _fail(path, f"{where}.header", "is truncated", f"{n_cols} column headers")
    header = np.frombuffer(buf, _HEADER_DTYPE, count=n_cols, offset=offset)
    offset += n_cols * _HEADER_DTYPE.itemsize
    codes = tuple(int(c) for c in header["code"])
    types = tuple(int(t) for t in header["type"])
    for code, typ in zip(codes, types):
        name = column_name(code)
        if typ not in _TYPE_NAMES:
            raise _fail(path, f"{where}.{name}", f"has unknown type code {typ}", "2, 3, 5, 6, 7, 8 or 9")
        if code in _TYPE_OF and _TYPE_OF[code] != typ:
            raise _fail(path, f"{where}.{name}", f"has type {_TYPE_NAMES[typ]}", _TYPE_NAMES[_TYPE_OF[code]])
    if len(set(codes)) != n_cols:
        dup = next(c for c in codes if codes.count(c) > 1)
        raise _fail(path, f"{where}.{column_name(dup)}", "appears twice in the header", "unique columns")
    fixed = [np.dtype(_FIXED_DTYPES[t]).itemsize if t != VARLEN else 4 for t in types]
    min_row = sum(fixed)
    available = len(buf) - offset
    if n_rows * min_row > available:
        raise _fail(path, f"{where}.n_rows", f"claims {n_rows} rows of >= {min_row} bytes but only {available} "
                    "bytes follow (truncated or corrupt file)")
    if VARLEN in types:
        arrays, offset = _parse_varlen_rows(buf, offset, codes, types, n_rows, path, where)
    else:
        row_dtype = np.dtype([(f"c{i}", _FIXED_DTYPES[t]) for i, t in enumerate(types)])
        rows = np.frombuffer(buf, row_dtype, count=n_rows, offset=offset)
        arrays = [rows[f"c{i}"].copy() for i in range(n_cols)]
        offset += n_rows * row_dtype.itemsize
    for code, typ, arr in zip(codes, types, arrays):
        if typ in (FLOAT, DOUBLE) and arr.size and not np.all(np.isfinite(arr)):
            row = int(np.flatnonzero(~np.isfinite(arr))[0])
            raise _fail(path, f"{where}.{column_name(code)}", f"is {arr[row]} in row {row}", "finite numbers")
    return CistemTable(codes, types, tuple(arrays)), offset


def _parse_varlen_rows(buf: bytes, offset: int, codes: tuple[int, ...], types: tuple[int, ...], n_rows: int,
                       path: Path, where: str) -> tuple[list[np.ndarray], int]:
    """Row-by-row parser for tables with variable-length (string) columns."""
    formats = {t: struct.Struct("<" + {INTEGER: "i", FLOAT: "f", LONG: "q", DOUBLE: "d", CHAR: "b", UINT: "I"}[t])
               for t in _FIXED_DTYPES}
    length = struct.Struct("<i")
    columns: list[list] = [[] for _ in codes]
    for row in range(n_rows):
        for col, typ in enumerate(types):
            if typ == VARLEN:
                if offset + 4 > len(buf):
                    raise _fail(path, f"{where}.{column_name(codes[col])}", f"is truncated in row {row}")
                (size,) = length.unpack_from(buf, offset)
                offset += 4
                if size < 0 or offset + size > len(buf):
                    raise _fail(path, f"{where}.{column_name(codes[col])}",
                                f"declares a {size}-byte string in row {row} past the end of the file")
                columns[col].append(buf[offset:offset + size].decode("utf-8", errors="replace"))
                offset += size
            else:
                fmt = formats[typ]
                if offset + fmt.size > len(buf):
                    raise _fail(path, f"{where}.{column_name(codes[col])}", f"is truncated in row {row}")
                columns[col].append(fmt.unpack_from(buf, offset)[0])
                offset += fmt.size
    arrays = [np.array(vals, dtype=object if typ == VARLEN else _FIXED_DTYPES[typ])
              for vals, typ in zip(columns, types)]
    return arrays, offset


def _read_bytes(path: str | os.PathLike[str], what: str) -> tuple[Path, bytes]:
    path = Path(path)
    if not path.is_file():
        raise CsptInputError("does not exist", file=path, expected=what)
    return path, path.read_bytes()


def _check_end(buf: bytes, offset: int, path: Path) -> None:
    if offset != len(buf):
        raise _fail(path, "end of file", f"has {len(buf) - offset} unexpected trailing bytes",
                    "the file to end after the last row")


def read_cistem(path: str | os.PathLike[str]) -> CistemTable:
    """Read a ``.cistem`` binary parameter file (any columns; known codes must have their standard types)."""
    path, buf = _read_bytes(path, "a .cistem binary parameter file")
    return _parse_cistem(buf, path)


def _parse_cistem(buf: bytes, path: Path) -> CistemTable:
    if len(buf) < 8:
        raise _fail(path, "header", f"is only {len(buf)} bytes long", "int32 n_columns, int32 n_rows")
    n_cols, n_rows = struct.unpack_from("<ii", buf, 0)
    table, offset = _parse_table(buf, 8, n_cols, n_rows, path, "columns")
    _check_end(buf, offset, path)
    return table


def read_extended(path: str | os.PathLike[str]) -> tuple[CistemTable, CistemTable]:
    """Read pyp's ``_extended.cistem``: ``(particles, tilts)`` tables (a :func:`write_pair` trailer is checked for
    its form only; :func:`read_pair` checks it against the ``.cistem`` file)."""
    particles, tilts, _ = _read_extended(path)
    return particles, tilts


def _read_extended(path: str | os.PathLike[str]) -> tuple[CistemTable, CistemTable, bytes | None]:
    """``(particles, tilts, SHA-256 of the .cistem file it was written with, or None without a trailer)``."""
    path, buf = _read_bytes(path, "a pyp _extended.cistem file")
    main_sha256 = None
    if len(buf) >= _PAIR_TRAILER_BYTES and buf[-_PAIR_TRAILER_BYTES:].startswith(PAIR_MAGIC):
        main_sha256, buf = buf[-_PAIR_TRAILER_BYTES + len(PAIR_MAGIC):], buf[:-_PAIR_TRAILER_BYTES]
    blocks: dict[int, CistemTable] = {}
    names = {PARTICLES_BLOCK: "particles", TILTS_BLOCK: "tilts"}
    offset = 0
    while offset < len(buf):
        if offset + 16 > len(buf):
            raise _fail(path, "block header", "is truncated", "int64 block code, int32 n_columns, int32 n_rows")
        code, n_cols, n_rows = struct.unpack_from("<qii", buf, offset)
        if code not in names:
            raise _fail(path, "block code", f"is {code}", f"{PARTICLES_BLOCK} (particles) or {TILTS_BLOCK} (tilts)")
        if code in blocks:
            raise _fail(path, names[code], "block appears twice", "one particles and one tilts block")
        blocks[code], offset = _parse_table(buf, offset + 16, n_cols, n_rows, path, names[code])
    for code, name in names.items():
        if code not in blocks:
            raise _fail(path, name, "block is missing", "a particles block followed by a tilts block")
    return blocks[PARTICLES_BLOCK], blocks[TILTS_BLOCK], main_sha256


def _writing_marker(path: Path) -> Path:
    return path.with_name(f".{path.name}{PAIR_WRITING}")


def read_pair(path: str | os.PathLike[str], extended: str | os.PathLike[str] | None = None, *, strict: bool = False
              ) -> tuple[CistemTable, CistemTable, CistemTable]:
    """Read a ``.cistem`` file and its ``_extended.cistem`` (``extended``, default beside it) as ``(main,
    particles, tilts)``. When the extended file's trailer names another ``.cistem``: refused if our own write of the
    pair was interrupted (its marker is still there) or ``strict`` (a pipeline checking its own files), else read
    with a warning (the ``.cistem`` was rewritten by another program, as pyp does)."""
    path, buf = _read_bytes(path, "a .cistem binary parameter file")
    main = _parse_cistem(buf, path)
    ext = extended_path(path) if extended is None else Path(extended)
    particles, tilts, main_sha256 = _read_extended(ext)
    if main_sha256 is not None and main_sha256 != hashlib.sha256(buf).digest():
        if strict or _writing_marker(path).exists():
            raise _fail(ext, "pair", f"was written with another version of {path.name} (a write of the pair was "
                        "interrupted between its two files)", "the two files as written together: write them again "
                        "(rerunning the step that wrote them does)")
        warn_input(f"{path.name} was changed after this file was written with it (by another program?); read as "
                   "it is now", file=ext, field="pair")
    return main, particles, tilts


# ------------------------------------------------------------------------------------------------ binary writing
def _pack_table(table: CistemTable) -> bytes:
    header = np.empty(len(table.codes), _HEADER_DTYPE)
    header["code"] = table.codes
    header["type"] = table.types
    if VARLEN not in table.types:
        rows = np.empty(len(table), np.dtype([(f"c{i}", _FIXED_DTYPES[t]) for i, t in enumerate(table.types)]))
        for i, arr in enumerate(table.arrays):
            rows[f"c{i}"] = arr
        return header.tobytes() + rows.tobytes()
    out = bytearray(header.tobytes())
    for row in range(len(table)):
        for typ, arr in zip(table.types, table.arrays):
            if typ == VARLEN:
                data = str(arr[row]).encode("utf-8")
                out += struct.pack("<i", len(data)) + data
            else:
                out += np.asarray(arr[row], dtype=_FIXED_DTYPES[typ]).tobytes()
    return bytes(out)


def _cistem_bytes(table: CistemTable) -> bytes:
    return struct.pack("<ii", len(table.codes), len(table)) + _pack_table(table)


def _write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_cistem(path: str | os.PathLike[str], table: CistemTable) -> Path:
    """Write ``table`` as a ``.cistem`` binary file, atomically."""
    return _write_bytes(path, _cistem_bytes(table))


def write_extended(path: str | os.PathLike[str], particles: CistemTable, tilts: CistemTable, *,
                   main_sha256: bytes | None = None) -> Path:
    """Write pyp's ``_extended.cistem`` (particles block, then tilts block), atomically; with ``main_sha256`` (the
    digest of the ``.cistem`` file it goes with) the pair trailer follows (module docstring)."""
    blocks = [(PARTICLES_BLOCK, particles), (TILTS_BLOCK, tilts)]
    packed = [(struct.pack("<qii", code, len(t.codes), len(t)), _pack_table(t)) for code, t in blocks]
    with atomic_open(path, "wb") as fh:
        for head, body in packed:
            fh.write(head)
            fh.write(body)
        if main_sha256 is not None:
            fh.write(PAIR_MAGIC + main_sha256)
    return Path(path)


def write_pair(path: str | os.PathLike[str], main: CistemTable, particles: CistemTable, tilts: CistemTable
               ) -> tuple[Path, Path]:
    """Write ``path`` (``.cistem``) and then its ``_extended.cistem``, each atomically, the extended file ending
    with the digest of the ``.cistem`` file; a marker beside them while writing lets :func:`read_pair` tell a pair
    torn by a kill between the two writes (refused) from a ``.cistem`` rewritten later by another program (read).
    Returns both paths."""
    data = _cistem_bytes(main)
    marker = _writing_marker(Path(path))
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    _write_bytes(path, data)
    ext = write_extended(extended_path(path), particles, tilts, main_sha256=hashlib.sha256(data).digest())
    marker.unlink()
    return Path(path), ext


def extended_path(path: str | os.PathLike[str]) -> Path:
    """``{stem}_extended.cistem`` beside ``{stem}.cistem``."""
    path = Path(path)
    if path.suffix != ".cistem":
        raise CsptInputError(f"has suffix {path.suffix!r}", file=path, expected="a .cistem file")
    return path.with_name(path.stem + "_extended.cistem")


# ------------------------------------------------------------------------------------------------ TrackSet mapping
def tables_from_tracks(
    tracks: TrackSet, *, pixel_A: float, voltage_kV: float, cs_mm: float, amp_contrast: float,
    tilt_shift_px: ArrayLike | None = None, extract_bin: int = 1, tomogram_px: Sequence[float] | None = None,
) -> tuple[CistemTable, CistemTable, CistemTable]:
    """The ``(main, particles, tilts)`` tables pyp expects for ``tracks`` (column meanings: module docstring).

    ``pixel_A`` is the tilt-stack pixel (Å), ``voltage_kV``/``cs_mm``/``amp_contrast`` the microscope,
    ``tilt_shift_px`` (T, 2) the refined per-tilt image shifts (``TSHIFT_X/Y``; default 0), ``extract_bin`` pyp's
    extraction binning (it scales the Å of the sub-pixel shifts), ``tomogram_px`` the unbinned reconstruction
    ``(x, y, z)`` the 3D positions are absolute in (default: the image and pyp's default thickness,
    :func:`napari_cspt2d.io.metadata.pyp_tomogram_px`)."""
    if not (np.isfinite(pixel_A) and pixel_A > 0):
        raise CsptInputError(f"is {pixel_A}", field="pixel_A", expected="a pixel size > 0 Å")
    _check_extract_bin(extract_bin)
    t = tracks.tilts
    tshift = np.zeros((len(t), 2)) if tilt_shift_px is None else np.asarray(tilt_shift_px, dtype=np.float64)
    if tshift.shape != (len(t), 2) or not np.all(np.isfinite(tshift)):
        raise CsptInputError(f"has shape {tshift.shape}", field="tilt_shift_px",
                             expected=f"finite (x, y) shifts of the {len(t)} tilts")
    if np.unique(t.order).size != t.order.size or (t.order.size and t.order.min() < 0):
        raise CsptInputError("has repeated or negative values", field="tilts.order",
                             expected="a distinct acquisition index >= 0 per tilt (written as TIND)")
    n = len(tracks)
    prow, trow = tracks.particle_rows(), tracks.tilt_rows()
    projected = tracks.projected_px()
    euler = tracks.particles.euler_deg
    matrices = geometry.projection_matrices(euler[prow, 2], euler[prow, 1], euler[prow, 0],
                                            t.angle_deg[trow], t.axis_deg[trow])
    phi, theta, psi = geometry.matrix_to_euler(matrices)
    defocus_A = t.defocus_um[trow] * 1e4 - projected[:, 2] * pixel_A
    p = tracks.particles
    if tracks.image_shape_yx is None:  # the seed's form: the whole shift, no box position, centre-relative 3D
        original, shift_A, xyz = np.zeros((n, 2)), tracks.shift_px * pixel_A, p.xyz_px
    else:  # pyp's form: integer box position, sub-pixel remainder in Å of the extracted pixel, absolute 3D
        corner = tracks.positions_px() + 0.5
        original = np.floor(corner)
        shift_A = (original - corner) * (pixel_A * extract_bin)
        size = tomogram_px if tomogram_px is not None else pyp_tomogram_px(tracks.image_shape_yx)
        xyz = p.xyz_px + np.asarray(size, dtype=np.float64) / 2
    main = _table_for_layout(MAIN_LAYOUT, {
        "POSITION_IN_STACK": np.arange(1, n + 1), "PSI": psi, "THETA": theta, "PHI": phi,
        "X_SHIFT": shift_A[:, 0], "Y_SHIFT": shift_A[:, 1],
        "DEFOCUS_1": defocus_A, "DEFOCUS_2": defocus_A, "OCCUPANCY": tracks.occupancy, "SIGMA": np.ones(n),
        "SCORE": tracks.score, "PIXEL_SIZE": np.full(n, pixel_A), "MICROSCOPE_VOLTAGE": np.full(n, voltage_kV),
        "MICROSCOPE_CS": np.full(n, cs_mm), "AMPLITUDE_CONTRAST": np.full(n, amp_contrast),
        "ORIGINAL_X_POSITION": original[:, 0], "ORIGINAL_Y_POSITION": original[:, 1],
        "IMIND": tracks.tilt, "PIND": tracks.particle, "TIND": t.order[trow],
    }, n)
    counts = np.bincount(prow, minlength=len(p))
    mean = lambda v: np.bincount(prow, weights=v, minlength=len(p)) / np.maximum(counts, 1)  # noqa: E731
    particles = _table_for_layout(PARTICLE_LAYOUT, {
        "PIND": p.id, "PPSI": p.euler_deg[:, 0], "PTHETA": p.euler_deg[:, 1], "PPHI": p.euler_deg[:, 2],
        "ORIGINAL_X_POSITION_3D": xyz[:, 0], "ORIGINAL_Y_POSITION_3D": xyz[:, 1],
        "ORIGINAL_Z_POSITION_3D": xyz[:, 2], "PSCORE": mean(tracks.score), "POCC": mean(tracks.occupancy),
    }, len(p))
    tilts = _table_for_layout(TILT_LAYOUT, {"TIND": t.order, "TILTANG": t.angle_deg, "TILTAXIS": -t.axis_deg,
                                            "TSHIFT_X": tshift[:, 0] * pixel_A, "TSHIFT_Y": tshift[:, 1] * pixel_A},
                              len(t))
    return main, particles, tilts


def _check_extract_bin(extract_bin: int) -> None:
    if isinstance(extract_bin, bool) or not isinstance(extract_bin, (int, np.integer)) or extract_bin < 1:
        raise CsptInputError(f"is {extract_bin!r}", field="extract_bin", expected="an integer >= 1")


def has_box_positions(main: CistemTable) -> bool:
    """Whether ``main`` is in pyp's form: integer ``ORIGINAL_X/Y_POSITION`` (not all 0) with the sub-pixel remainder
    in ``X/Y_SHIFT``; otherwise ``X/Y_SHIFT`` hold the whole track shift (module docstring)."""
    if not len(main) or "ORIGINAL_X_POSITION" not in main or "ORIGINAL_Y_POSITION" not in main:
        return False
    xy = np.concatenate([main["ORIGINAL_X_POSITION"], main["ORIGINAL_Y_POSITION"]]).astype(np.float64)
    return bool(np.any(xy != 0) and np.all(xy == np.floor(xy)))


def _block_rows(tilts: CistemTable, order: NDArray[np.int64]) -> NDArray[np.int64]:
    """Row of each ``TIND`` of ``order`` in the tilts block (its first region), -1 where the block lacks it."""
    tind = tilts["TIND"].astype(np.int64) if "TIND" in tilts else np.zeros(0, np.int64)
    rind = tilts["RIND"] if "RIND" in tilts else np.zeros(len(tilts), np.int64)
    by = np.lexsort((rind, tind))
    first = by[np.r_[True, tind[by][1:] != tind[by][:-1]]] if by.size else by
    if not first.size:
        return np.full(order.size, -1, np.int64)
    k = np.minimum(np.searchsorted(tind[first], order), first.size - 1)
    return np.where(tind[first][k] == order, first[k], -1)


def tilt_shifts_px(tilts: CistemTable, order: ArrayLike, pixel_A: float) -> NDArray[np.float64]:
    """Per-tilt image shifts (T, 2, tilt-stack px) of the tilts with acquisition indices ``order`` (T,), from the
    tilts block's ``TSHIFT_X/Y`` (Å; the first region of each ``TIND``; 0 when the columns are absent)."""
    order = np.asarray(order, dtype=np.int64).reshape(-1)
    rows = _block_rows(tilts, order)
    if np.any(rows < 0):
        raise CsptInputError("lacks some tilts", field="tilts.TIND", expected=f"every TIND of {order.tolist()[:8]}")
    return np.column_stack([tilts.get("TSHIFT_X", 0.0)[rows], tilts.get("TSHIFT_Y", 0.0)[rows]]) / pixel_A


#: Tilt angles and axes of a file that differ from a given tilt table by more than this (°; float32 rounding is
#: ~1e-5°) are the file's own, refined geometry.
_REFINED_DEG = 1e-3


def _with_file_geometry(table: TiltTable, tilts: CistemTable) -> TiltTable:
    """``table`` with the tilts block's angles and axes where they differ from its own (module docstring)."""
    rows = _block_rows(tilts, table.order)
    have = rows >= 0
    columns = {}
    for name, column, sign in (("angle_deg", "TILTANG", 1.0), ("axis_deg", "TILTAXIS", -1.0)):  # TILTAXIS = -axis
        values = getattr(table, name).copy()
        if column in tilts:
            file = sign * tilts[column].astype(np.float64)[rows[have]]
            differ = np.abs(file - values[have]) > _REFINED_DEG
            values[np.flatnonzero(have)[differ]] = file[differ]
        columns[name] = values
    if all(np.array_equal(v, getattr(table, k)) for k, v in columns.items()):
        return table
    return replace(table, **columns)


def _pair_keys(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Unique int64 key of int32 pairs."""
    return (a.astype(np.int64) << 32) + (b.astype(np.int64) + 2**31)


def _first_duplicate(*columns: np.ndarray) -> int | None:
    """Row of the first repeated combination of ``columns`` (all the same length), or None."""
    if not columns[0].size:
        return None
    order = np.lexsort(columns[::-1])
    same = np.ones(order.size - 1, bool)
    for col in columns:
        s = col[order]
        same &= s[1:] == s[:-1]
    hits = np.flatnonzero(same)
    return int(order[hits[0] + 1]) if hits.size else None


def _require(table: CistemTable, names: Sequence[str], path: os.PathLike[str] | str | None, where: str) -> None:
    missing = [n for n in names if n not in table]
    if missing:
        raise CsptInputError(f"has no column {', '.join(missing)}", file=path, field=where,
                             expected=f"pyp tomography columns {', '.join(names)}")


def check_tables(main: CistemTable, particles: CistemTable | None, tilts: CistemTable | None,
                 path: os.PathLike[str] | str | None = None) -> None:
    """Check that a main table (and, if given, its extended tables) form a consistent pyp tomography file.

    Raises :class:`CsptInputError` naming the file and field for missing columns, bad pixel sizes, duplicate
    ``(PIND, TIND, FIND)``, a ``TIND`` that maps to several ``IMIND`` (or back), a ``PIND`` not in the particles
    block and a ``(TIND, RIND)`` not in the tilts block; warns when particle or tilt ids are not sequential."""
    _require(main, ("PIND", "TIND", "IMIND", "X_SHIFT", "Y_SHIFT", "PIXEL_SIZE"), path, "columns")
    pixel = main["PIXEL_SIZE"]
    if pixel.size and not np.all(pixel > 0):
        raise CsptInputError(f"is {pixel[np.flatnonzero(~(pixel > 0))[0]]}", file=path, field="PIXEL_SIZE",
                             expected="> 0 Å")
    pind, tind, imind = main["PIND"], main["TIND"], main["IMIND"]
    frame = main["FIND"] if "FIND" in main else np.zeros_like(pind)
    pairs = np.unique(_pair_keys(tind, imind))
    t_of, i_of = pairs >> 32, (pairs & 0xFFFFFFFF) - 2**31
    for ids, name, other in ((t_of, "TIND", "IMIND"), (i_of, "IMIND", "TIND")):
        values, counts = np.unique(ids, return_counts=True)
        if np.any(counts > 1):
            raise CsptInputError(f"{values[counts > 1][0]} goes with more than one {other}", file=path, field=name,
                                 expected=f"one {other} per {name} (one stack section per tilt)")
    dup = _first_duplicate(pind, tind, frame)
    if dup is not None:
        raise CsptInputError(f"row {dup} repeats (PIND {pind[dup]}, TIND {tind[dup]}, FIND {frame[dup]})",
                             file=path, field="PIND/TIND", expected="one line per particle, tilt and frame")
    if particles is None or tilts is None:
        return
    _require(particles, ("PIND",), path, "particles")
    _require(tilts, ("TIND", "TILTANG"), path, "tilts")
    ppind = particles["PIND"]
    rind_t = tilts["RIND"] if "RIND" in tilts else np.zeros_like(tilts["TIND"])
    for ids, where in ((ppind,), "particles.PIND"), ((tilts["TIND"], rind_t), "tilts.TIND/RIND"):
        dup = _first_duplicate(*ids)
        if dup is not None:
            raise CsptInputError(f"repeats {tuple(int(c[dup]) for c in ids)} in row {dup}", file=path, field=where,
                                 expected="unique ids")
    unknown = ~np.isin(pind, ppind)
    if unknown.any():
        raise CsptInputError(f"{pind[unknown][0]} is not in the particles block", file=path, field="PIND",
                             expected="particle ids listed in the _extended.cistem particles block")
    rind = main["RIND"] if "RIND" in main else np.zeros_like(tind)
    unknown = ~np.isin(_pair_keys(tind, rind), _pair_keys(tilts["TIND"], rind_t))
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise CsptInputError(f"(TIND {tind[row]}, RIND {rind[row]}) in row {row} is not in the tilts block",
                             file=path, field="TIND",
                             expected="tilt indices listed in the _extended.cistem tilts block")
    for ids, name in ((np.unique(ppind), "particles.PIND"), (np.unique(tilts["TIND"]), "tilts.TIND")):
        if ids.size and not np.array_equal(ids, np.arange(ids[0], ids[0] + ids.size)):
            warn_input("ids are not sequential", file=path, field=name)


def projection_data(main: CistemTable) -> NDArray[np.float64]:
    """``(N, 7)`` float64 view of a main table, columns :data:`DATA_COLUMNS`: PIND, tilt id (= IMIND, the stack
    section), FIND, shift x and y in tilt-stack pixels (``X/Y_SHIFT / PIXEL_SIZE``), SCORE, OCCUPANCY."""
    pixel = main.get("PIXEL_SIZE", 1.0)
    return np.column_stack([
        main.get("PIND", 0), main.get("IMIND", 0), main.get("FIND", 0),
        main.get("X_SHIFT", 0) / pixel, main.get("Y_SHIFT", 0) / pixel,
        main.get("SCORE", 0), main.get("OCCUPANCY", 100),
    ])


def _with_file(exc: CsptInputError, path: os.PathLike[str] | str | None) -> CsptInputError:
    return CsptInputError(exc.reason, file=path if exc.file is None else exc.file, field=exc.field,
                          expected=exc.expected)


def tracks_from_tables(
    main: CistemTable,
    particles: CistemTable,
    tilts: CistemTable,
    *,
    path: os.PathLike[str] | str | None = None,
    image_shape_yx: tuple[int, int] | None = None,
    tilt_table: TiltTable | None = None,
    dose_per_tilt: float = 0.0,
    extract_bin: int = 1,
    tomogram_px: Sequence[float] | None = None,
) -> TrackSet:
    """Rebuild a :class:`TrackSet` from the tables written by :func:`tables_from_tracks` (or by pyp).

    Without ``tilt_table``, tilts are the stack sections (``IMIND``) that have projections: angle and axis
    (``-TILTAXIS``) from the tilts block, ``order`` = ``TIND``, defocus (µm) = per-tilt mean of ``DEFOCUS_1`` +
    particle height, ``dose`` = ``dose_per_tilt``. A given ``tilt_table`` (e.g. from ``{name}.pkl``) supplies the
    tilts, except their angles and axes where the tilts block holds others (beyond float32 rounding,
    :data:`_REFINED_DEG`): the file's shifts are relative to its own geometry (e.g. refined by
    ``csp_refine_micrographs``). A file in pyp's form (:func:`has_box_positions`) needs ``image_shape_yx``, pyp's
    ``extract_bin`` and the reconstruction ``tomogram_px`` its 3D positions are absolute in (default as in
    :func:`tables_from_tracks`). Files with several frames per projection are refused (the model holds one position
    per particle and tilt)."""
    check_tables(main, particles, tilts, path)
    _check_extract_bin(extract_bin)
    n = len(main)
    frame = main.get("FIND", 0)
    if np.unique(frame).size > 1:
        raise CsptInputError(f"has {np.unique(frame).size} frames per projection", file=path, field="FIND",
                             expected="one frame (frame-resolved parameter files are not supported)")
    boxed = has_box_positions(main)
    if boxed and image_shape_yx is None:
        raise CsptInputError("holds pyp's box positions (ORIGINAL_X/Y_POSITION) but the tilt image size is unknown",
                             file=path, field="ORIGINAL_X_POSITION",
                             expected="the image size ({name}.pkl or the stack beside the file)")
    pixel = main["PIXEL_SIZE"].astype(np.float64)
    shift = np.column_stack([main["X_SHIFT"] / pixel, main["Y_SHIFT"] / pixel])
    p_ids = particles["PIND"].astype(np.int64)
    p_order = np.argsort(p_ids, kind="stable")
    xyz = np.column_stack([particles.get(f"ORIGINAL_{a}_POSITION_3D", 0) for a in "XYZ"])[p_order]
    if boxed:
        size = tomogram_px if tomogram_px is not None else pyp_tomogram_px(image_shape_yx)
        xyz = xyz - np.asarray(size, dtype=np.float64) / 2
        corner = np.column_stack([main["ORIGINAL_X_POSITION"], main["ORIGINAL_Y_POSITION"]]) - shift / extract_bin
        shift = np.zeros_like(shift)
    euler = np.column_stack([particles.get(k, 0) for k in ("PPSI", "PTHETA", "PPHI")])[p_order]
    try:
        ptable = ParticleTable(p_ids[p_order], xyz, euler)
        if tilt_table is None:
            tilt_table = _tilts_from_tables(main, particles, tilts, ptable, path, dose_per_tilt)
        else:
            tilt_table = _with_file_geometry(tilt_table, tilts)
        tracks = TrackSet(main["PIND"].astype(np.int64), main["IMIND"].astype(np.int64), shift,
                          main.get("SCORE", 0.0), main.get("OCCUPANCY", 100.0), ptable, tilt_table, image_shape_yx)
        if boxed:
            tracks = tracks.with_positions(np.arange(n), corner - 0.5)
    except CsptInputError as exc:
        raise _with_file(exc, path) from None
    return tracks.sorted() if n else tracks


def _tilts_from_tables(main: CistemTable, particles: CistemTable, tilts: CistemTable, ptable: ParticleTable,
                       path: os.PathLike[str] | str | None, dose_per_tilt: float) -> TiltTable:
    tind, imind = main["TIND"].astype(np.int64), main["IMIND"].astype(np.int64)
    section_ids, first = np.unique(imind, return_index=True)
    orders = tind[first]
    rind_t = tilts["RIND"] if "RIND" in tilts else np.zeros(len(tilts), np.int64)
    by_tind = np.lexsort((rind_t, tilts["TIND"]))  # first region of each TIND first
    t_sorted = tilts["TIND"][by_tind]
    first_region = by_tind[np.r_[True, t_sorted[1:] != t_sorted[:-1]]] if t_sorted.size else by_tind
    row_of = dict(zip(tilts["TIND"][first_region].tolist(), first_region.tolist()))
    rows = np.array([row_of[o] for o in orders.tolist()], dtype=np.int64)
    unused = np.setdiff1d(tilts["TIND"], orders)
    if unused.size:
        warn_input(f"{unused.size} tilt(s) have no projections and are left out (TIND {unused[:5].tolist()}...)",
                   file=path, field="tilts")
    angle = tilts["TILTANG"].astype(np.float64)[rows]
    axis = -tilts.get("TILTAXIS", 0.0)[rows]
    trow = np.searchsorted(section_ids, imind)
    height = geometry.project_points(ptable.xyz_px[np.searchsorted(ptable.id, main["PIND"])], angle[trow],
                                     axis[trow])[:, 2]
    defocus_A = main.get("DEFOCUS_1", 0.0) + height * main["PIXEL_SIZE"]
    defocus_um = np.bincount(trow, weights=defocus_A, minlength=section_ids.size) / np.bincount(trow) / 1e4
    return TiltTable(section_ids, angle, defocus_um, axis, np.full(section_ids.size, float(dose_per_tilt)), orders)
