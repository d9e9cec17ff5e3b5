"""``TrackSet``: 2D particle tracks through one tilt series, stored as columnar numpy arrays.

Three tables, no per-row Python objects:

projections (N rows, one per particle per tilt image)
    ``particle`` (int64 id), ``tilt`` (int64 tilt id = 0-based section of the tilt stack), ``shift_px`` (N, 2) float64
    (x, y), ``score`` float64, ``occupancy`` float64 (pyp/cisTEM percent, 0..100; the seed's 1.0 is kept as given).
particles (P rows)
    ``id`` int64 (sorted, unique), ``xyz_px`` (P, 3) float64 relative to the tomogram centre (zero when unknown),
    ``euler_deg`` (P, 3) float64 cisTEM ``(psi, theta, phi)`` (zero when unknown).
tilts (T rows)
    ``id`` int64 (sorted, unique), ``angle_deg``, ``defocus_um``, ``axis_deg`` (tilt-axis angle, 0 = along image y),
    ``dose`` (e/Å² received by this tilt image), ``order`` (int64 acquisition order, 0 = first exposure).

Meaning of a projection (pinned, see :mod:`napari_cspt2d.geometry`): its position in the tilt image, in unbinned
pixels, is ``image centre + projection of the particle's 3D point at that tilt + shift_px``. With zero 3D coordinates
``shift_px`` is simply the position relative to the image centre. The shift is stored (not the position) so that a
round trip through the seed's ``track_data`` dict is exact; :meth:`TrackSet.positions_px` computes positions.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import CsptInputError, warn_input
from .. import geometry

__all__ = ["TrackSet", "ParticleTable", "TiltTable"]


def _column(values: ArrayLike, dtype: Any, n: int, name: str, width: int | None = None) -> np.ndarray:
    arr = np.asarray(values, dtype=dtype)
    shape = (n,) if width is None else (n, width)
    if arr.shape != shape:
        raise CsptInputError(f"has shape {arr.shape}", field=name, expected=f"shape {shape}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise CsptInputError("contains NaN or infinite values", field=name, expected="finite numbers")
    return arr


def _unique_ids(ids: np.ndarray, name: str) -> None:
    if ids.size and np.any(np.diff(ids) <= 0):
        if np.unique(ids).size != ids.size:
            raise CsptInputError("has duplicate ids", field=name, expected="unique ids")
        raise CsptInputError("is not sorted", field=name, expected="ascending ids")


@dataclass(frozen=True, eq=False)
class ParticleTable:
    """Per-particle columns (P rows). ``euler_deg`` is cisTEM ``(psi, theta, phi)`` in degrees."""

    id: NDArray[np.int64]
    xyz_px: NDArray[np.float64]
    euler_deg: NDArray[np.float64]

    def __post_init__(self) -> None:
        ids = np.asarray(self.id, dtype=np.int64).reshape(-1)
        n = ids.size
        object.__setattr__(self, "id", ids)
        object.__setattr__(self, "xyz_px", _column(self.xyz_px, np.float64, n, "particles.xyz_px", 3))
        object.__setattr__(self, "euler_deg", _column(self.euler_deg, np.float64, n, "particles.euler_deg", 3))
        _unique_ids(ids, "particles.id")

    @classmethod
    def zeros(cls, ids: ArrayLike) -> ParticleTable:
        ids = np.asarray(ids, dtype=np.int64)
        return cls(ids, np.zeros((ids.size, 3)), np.zeros((ids.size, 3)))

    def __len__(self) -> int:
        return int(self.id.size)

    def take(self, rows: ArrayLike) -> ParticleTable:
        return ParticleTable(self.id[rows], self.xyz_px[rows], self.euler_deg[rows])


@dataclass(frozen=True, eq=False)
class TiltTable:
    """Per-tilt columns (T rows): angle (deg), defocus (µm, underfocus positive), axis (deg), dose (e/Å²), order."""

    id: NDArray[np.int64]
    angle_deg: NDArray[np.float64]
    defocus_um: NDArray[np.float64]
    axis_deg: NDArray[np.float64]
    dose: NDArray[np.float64]
    order: NDArray[np.int64]

    def __post_init__(self) -> None:
        ids = np.asarray(self.id, dtype=np.int64).reshape(-1)
        n = ids.size
        object.__setattr__(self, "id", ids)
        for name in ("angle_deg", "defocus_um", "axis_deg", "dose"):
            object.__setattr__(self, name, _column(getattr(self, name), np.float64, n, f"tilts.{name}"))
        object.__setattr__(self, "order", _column(self.order, np.int64, n, "tilts.order"))
        _unique_ids(ids, "tilts.id")

    @classmethod
    def from_angles(
        cls,
        angle_deg: ArrayLike,
        *,
        defocus_um: ArrayLike | float = 0.0,
        axis_deg: ArrayLike | float = 0.0,
        dose: ArrayLike | float = 0.0,
        order: ArrayLike | None = None,
        ids: ArrayLike | None = None,
    ) -> TiltTable:
        """Tilt table with ids ``0..T-1`` (stack sections) unless given; ``order`` defaults to dose-symmetric
        order (smallest |angle| first), the usual acquisition scheme."""
        angles = np.asarray(angle_deg, dtype=np.float64).reshape(-1)
        n = angles.size
        full = lambda v: np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)).copy()  # noqa: E731
        if order is None:
            order = np.argsort(np.argsort(np.abs(angles), kind="stable"), kind="stable")
        return cls(
            np.arange(n) if ids is None else ids,
            angles,
            full(defocus_um),
            full(axis_deg),
            full(dose),
            np.asarray(order, dtype=np.int64),
        )

    def __len__(self) -> int:
        return int(self.id.size)

    def take(self, rows: ArrayLike) -> TiltTable:
        fields = ("id", "angle_deg", "defocus_um", "axis_deg", "dose", "order")
        return TiltTable(*(getattr(self, f)[rows] for f in fields))

    def accumulated_dose(self) -> NDArray[np.float64]:
        """Dose (e/Å²) received *before* each tilt image, from the acquisition order and the per-tilt dose."""
        by_order = np.argsort(self.order, kind="stable")
        before = np.zeros(len(self))
        before[by_order] = np.concatenate([[0.0], np.cumsum(self.dose[by_order])[:-1]])
        return before


@dataclass(frozen=True, eq=False)
class TrackSet:
    """2D tracks of particles through a tilt series (see the module docstring for the meaning of each column).

    Instances are immutable values: every edit returns a new ``TrackSet`` (the arrays are shared where unchanged),
    which makes undo/redo trivial and lets layers be views of the model."""

    particle: NDArray[np.int64]
    tilt: NDArray[np.int64]
    shift_px: NDArray[np.float64]
    score: NDArray[np.float64]
    occupancy: NDArray[np.float64]
    particles: ParticleTable
    tilts: TiltTable
    image_shape_yx: tuple[int, int] | None = None
    _row_of_pair: dict | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        particle = np.asarray(self.particle, dtype=np.int64).reshape(-1)
        n = particle.size
        object.__setattr__(self, "particle", particle)
        object.__setattr__(self, "tilt", _column(self.tilt, np.int64, n, "projections.tind"))
        object.__setattr__(self, "shift_px", _column(self.shift_px, np.float64, n, "projections.shift", 2))
        object.__setattr__(self, "score", _column(self.score, np.float64, n, "projections.score"))
        object.__setattr__(self, "occupancy", _column(self.occupancy, np.float64, n, "projections.occupancy"))
        if self.image_shape_yx is not None:
            try:
                shape = tuple(int(v) for v in self.image_shape_yx)
            except (TypeError, ValueError, OverflowError):
                shape = ()
            if len(shape) != 2 or min(shape) <= 0 or max(shape) >= 2**31:
                raise CsptInputError(f"is {_shown(self.image_shape_yx)}", field="image_shape_yx",
                                     expected="(ny, nx), each 1 .. 2**31 - 1")
            object.__setattr__(self, "image_shape_yx", shape)
        unknown_p = ~np.isin(particle, self.particles.id)
        if unknown_p.any():
            raise CsptInputError(
                f"refers to particle {particle[unknown_p][0]} which is not in 'particles'",
                field="projections.pind",
                expected="ids listed in 'particles'",
            )
        unknown_t = ~np.isin(self.tilt, self.tilts.id)
        if unknown_t.any():
            raise CsptInputError(
                f"refers to tilt {self.tilt[unknown_t][0]} which is not in 'tilts'",
                field="projections.tind",
                expected="ids listed in 'tilts'",
            )
        if n:
            key = particle * (int(self.tilt.max()) + 1) + self.tilt if self.tilt.min() >= 0 else None
            pairs = np.unique(np.stack([particle, self.tilt], axis=1), axis=0) if key is None else np.unique(key)
            if len(pairs) != n:
                raise CsptInputError(
                    "has the same (pind, tind) pair more than once",
                    field="projections",
                    expected="one projection per particle per tilt",
                )

    # ---------------------------------------------------------------- construction
    @classmethod
    def empty(cls, tilts: TiltTable, image_shape_yx: tuple[int, int] | None = None) -> TrackSet:
        z = np.zeros(0)
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2)), z, z,
                   ParticleTable.zeros([]), tilts, image_shape_yx)

    @classmethod
    def from_positions(
        cls,
        particle: ArrayLike,
        tilt: ArrayLike,
        position_xy_px: ArrayLike,
        tilts: TiltTable,
        image_shape_yx: tuple[int, int],
        *,
        particles: ParticleTable | None = None,
        score: ArrayLike | None = None,
        occupancy: ArrayLike | None = None,
    ) -> TrackSet:
        """Build from absolute image positions ``(N, 2)`` (x, y in unbinned px); shifts are derived."""
        particle = np.asarray(particle, dtype=np.int64)
        tilt = np.asarray(tilt, dtype=np.int64)
        n = particle.size
        if particles is None:
            particles = ParticleTable.zeros(np.unique(particle))
        score = np.zeros(n) if score is None else score
        occupancy = np.full(n, 100.0) if occupancy is None else occupancy
        base = cls(particle, tilt, np.zeros((n, 2)), score, occupancy, particles, tilts, image_shape_yx)
        return base.with_positions(np.arange(n), position_xy_px)

    # ---------------------------------------------------------------- the seed's track_data dict
    @classmethod
    def from_track_data(cls, track_data: Mapping[str, Any], image_shape_yx: tuple[int, int] | None = None) -> TrackSet:
        """Convert the seed's ``track_data`` dict (see the README) into a TrackSet; every field is checked."""
        if not isinstance(track_data, Mapping):
            raise CsptInputError(f"is a {type(track_data).__name__}", field="track_data", expected="a dict")
        for key in ("particles", "tilts", "projections"):
            if key not in track_data:
                raise CsptInputError("is missing", field=key, expected="'particles', 'tilts' and 'projections'")
        parts, tilts_in, projs = track_data["particles"], track_data["tilts"], track_data["projections"]
        if not isinstance(parts, Mapping) or not isinstance(tilts_in, Mapping):
            raise CsptInputError("must map ids to dicts", field="particles/tilts", expected="dict {id: {...}}")
        if not isinstance(projs, Sequence) or isinstance(projs, (str, bytes)):
            raise CsptInputError(f"is a {type(projs).__name__}", field="projections", expected="a list of dicts")

        pids = sorted(_as_id(k, "particles") for k in parts)
        pdicts = {_as_id(k, "particles"): v for k, v in parts.items()}
        xyz = np.array([[_num(pdicts[i], k, f"particles[{i}]") for k in ("x_3d", "y_3d", "z_3d")] for i in pids])
        eul = np.array(
            [[_num(pdicts[i], k, f"particles[{i}]", 0.0) for k in ("psi", "theta", "phi")] for i in pids]
        )
        particles = ParticleTable(np.array(pids, np.int64), xyz.reshape(-1, 3), eul.reshape(-1, 3))

        tids = sorted(_as_id(k, "tilts") for k in tilts_in)
        tdicts = {_as_id(k, "tilts"): v for k, v in tilts_in.items()}
        col = lambda key, default: np.array(  # noqa: E731
            [_num(tdicts[i], key, f"tilts[{i}]", default) for i in tids], dtype=np.float64
        )
        angles = col("angle", None)
        has_order = all(isinstance(tdicts[i], Mapping) and "order" in tdicts[i] for i in tids)
        tilts = TiltTable.from_angles(
            angles,
            defocus_um=col("defocus", 0.0),
            axis_deg=col("axis", 0.0),
            dose=col("dose", 0.0),
            order=col("order", None).astype(np.int64) if has_order and tids else None,
            ids=np.array(tids, np.int64),
        )

        n = len(projs)
        pind = np.empty(n, np.int64)
        tind = np.empty(n, np.int64)
        values = np.empty((n, 4))
        for row, proj in enumerate(projs):
            where = f"projections[{row}]"
            if not isinstance(proj, Mapping):
                raise CsptInputError(f"is a {type(proj).__name__}", field=where, expected="a dict")
            pind[row] = _as_id(proj.get("pind"), f"{where}.pind")
            tind[row] = _as_id(proj.get("tind"), f"{where}.tind")
            values[row] = [
                _num(proj, "shift_x", where),
                _num(proj, "shift_y", where),
                _num(proj, "score", where, 0.0),
                _num(proj, "occupancy", where, 100.0),
            ]
        order = np.lexsort((tind, pind))
        _warn_if_not_sequential(particles.id, "particles")
        _warn_if_not_sequential(tilts.id, "tilts")
        return cls(pind[order], tind[order], values[order, :2], values[order, 2], values[order, 3],
                   particles, tilts, image_shape_yx)

    def to_track_data(self) -> dict[str, Any]:
        """The seed's ``track_data`` dict: plain Python ints and floats, ``psi/theta/phi`` and ``axis/dose/order``
        included so they reach the ``.cistem`` files."""
        p, t = self.particles, self.tilts
        particles = {
            int(pid): {
                "x_3d": float(xyz[0]), "y_3d": float(xyz[1]), "z_3d": float(xyz[2]),
                "psi": float(e[0]), "theta": float(e[1]), "phi": float(e[2]),
            }
            for pid, xyz, e in zip(p.id.tolist(), p.xyz_px, p.euler_deg)
        }
        tilts = {
            int(tid): {"angle": float(a), "defocus": float(d), "axis": float(ax), "dose": float(ds), "order": int(o)}
            for tid, a, d, ax, ds, o in zip(t.id.tolist(), t.angle_deg.tolist(), t.defocus_um.tolist(),
                                            t.axis_deg.tolist(), t.dose.tolist(), t.order.tolist())
        }
        projections = [
            {"pind": pi, "tind": ti, "shift_x": sx, "shift_y": sy, "score": sc, "occupancy": oc}
            for pi, ti, (sx, sy), sc, oc in zip(self.particle.tolist(), self.tilt.tolist(), self.shift_px.tolist(),
                                               self.score.tolist(), self.occupancy.tolist())
        ]
        return {"particles": particles, "tilts": tilts, "projections": projections}

    # ---------------------------------------------------------------- derived columns
    def __len__(self) -> int:
        return int(self.particle.size)

    @property
    def n_particles(self) -> int:
        return len(self.particles)

    @property
    def n_tilts(self) -> int:
        return len(self.tilts)

    def particle_rows(self) -> NDArray[np.int64]:
        """Row of each projection's particle in ``particles`` (N,)."""
        return np.searchsorted(self.particles.id, self.particle)

    def tilt_rows(self) -> NDArray[np.int64]:
        """Row of each projection's tilt in ``tilts`` (N,)."""
        return np.searchsorted(self.tilts.id, self.tilt)

    def projected_px(self) -> NDArray[np.float64]:
        """Projection of each projection's 3D point ``(N, 3)``: x, y relative to the image centre and height z'."""
        trow = self.tilt_rows()
        return geometry.project_points(
            self.particles.xyz_px[self.particle_rows()], self.tilts.angle_deg[trow], self.tilts.axis_deg[trow]
        )

    def _require_shape(self) -> tuple[int, int]:
        if self.image_shape_yx is None:
            raise CsptInputError("is unknown", field="image_shape_yx", expected="the tilt images' (ny, nx)")
        return self.image_shape_yx

    def positions_px(self) -> NDArray[np.float64]:
        """Absolute position ``(N, 2)`` (x, y) of each projection in its tilt image, unbinned px."""
        centre = geometry.image_center_px(self._require_shape())
        return centre + self.projected_px()[:, :2] + self.shift_px

    def row_of(self, particle: int, tilt: int) -> int | None:
        """Row index of the (particle, tilt) projection, or None."""
        rows = np.flatnonzero((self.particle == particle) & (self.tilt == tilt))
        return int(rows[0]) if rows.size else None

    # ---------------------------------------------------------------- edits (each returns a new TrackSet)
    def replace(self, **changes: Any) -> TrackSet:
        return replace(self, **changes)

    def with_positions(self, rows: ArrayLike, position_xy_px: ArrayLike) -> TrackSet:
        """Move projections ``rows`` to absolute positions ``(len(rows), 2)``; the 3D points stay fixed."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        pos = np.asarray(position_xy_px, dtype=np.float64).reshape(-1, 2)
        centre = geometry.image_center_px(self._require_shape())
        trow = self.tilt_rows()[rows]
        proj = geometry.project_points(
            self.particles.xyz_px[self.particle_rows()[rows]], self.tilts.angle_deg[trow], self.tilts.axis_deg[trow]
        )
        shift = self.shift_px.copy()
        shift[rows] = pos - centre - proj[:, :2]
        return replace(self, shift_px=shift)

    def with_particle_xyz(self, xyz_px: ArrayLike, *, keep_positions: bool = True) -> TrackSet:
        """Set every particle's 3D point ``(P, 3)``; by default the shifts change so that positions stay put."""
        moved = replace(self, particles=replace(self.particles, xyz_px=np.asarray(xyz_px, dtype=np.float64)))
        if not keep_positions or not len(self):
            return moved
        delta = self.projected_px()[:, :2] - moved.projected_px()[:, :2]
        return replace(moved, shift_px=self.shift_px + delta)

    def select(self, rows: ArrayLike) -> TrackSet:
        """Keep only projections ``rows`` (bool mask or indices); particles without projections are dropped."""
        rows = np.asarray(rows)
        sub = replace(self, particle=self.particle[rows], tilt=self.tilt[rows], shift_px=self.shift_px[rows],
                      score=self.score[rows], occupancy=self.occupancy[rows])
        keep = np.isin(self.particles.id, sub.particle)
        return replace(sub, particles=self.particles.take(keep))

    def drop_rows(self, rows: ArrayLike) -> TrackSet:
        mask = np.ones(len(self), bool)
        mask[np.asarray(rows, dtype=np.int64)] = False
        return self.select(mask)

    def append(
        self,
        particle: ArrayLike,
        tilt: ArrayLike,
        shift_px: ArrayLike,
        *,
        score: ArrayLike | None = None,
        occupancy: ArrayLike | None = None,
        new_particles: ParticleTable | None = None,
    ) -> TrackSet:
        """Add projections (and, if given, new particles); rows stay sorted by (particle, tilt)."""
        particle = np.atleast_1d(np.asarray(particle, dtype=np.int64))
        n = particle.size
        score = np.zeros(n) if score is None else np.atleast_1d(score)
        occupancy = np.full(n, 100.0) if occupancy is None else np.atleast_1d(occupancy)
        particles = self.particles
        if new_particles is not None and len(new_particles):
            particles = _concat_particles(particles, new_particles)
        missing = np.setdiff1d(particle, particles.id)
        if missing.size:
            particles = _concat_particles(particles, ParticleTable.zeros(missing))
        merged = TrackSet(
            np.concatenate([self.particle, particle]),
            np.concatenate([self.tilt, np.atleast_1d(np.asarray(tilt, dtype=np.int64))]),
            np.concatenate([self.shift_px, np.asarray(shift_px, dtype=np.float64).reshape(-1, 2)]),
            np.concatenate([self.score, np.asarray(score, dtype=np.float64)]),
            np.concatenate([self.occupancy, np.asarray(occupancy, dtype=np.float64)]),
            particles,
            self.tilts,
            self.image_shape_yx,
        )
        return merged.sorted()

    def sorted(self) -> TrackSet:
        """Rows ordered by (particle, tilt)."""
        order = np.lexsort((self.tilt, self.particle))
        if np.array_equal(order, np.arange(len(self))):
            return self
        return replace(self, particle=self.particle[order], tilt=self.tilt[order], shift_px=self.shift_px[order],
                       score=self.score[order], occupancy=self.occupancy[order])

    def next_particle_id(self) -> int:
        return int(self.particles.id.max()) + 1 if len(self.particles) else 1

    def equals(self, other: TrackSet) -> bool:
        """Exact equality of every column (used by round-trip tests)."""
        same = lambda a, b: a.shape == b.shape and np.array_equal(a, b)  # noqa: E731
        cols = ("particle", "tilt", "shift_px", "score", "occupancy")
        pcols = ("id", "xyz_px", "euler_deg")
        tcols = ("id", "angle_deg", "defocus_um", "axis_deg", "dose", "order")
        return (
            all(same(getattr(self, c), getattr(other, c)) for c in cols)
            and all(same(getattr(self.particles, c), getattr(other.particles, c)) for c in pcols)
            and all(same(getattr(self.tilts, c), getattr(other.tilts, c)) for c in tcols)
        )


def _concat_particles(a: ParticleTable, b: ParticleTable) -> ParticleTable:
    ids = np.concatenate([a.id, b.id])
    order = np.argsort(ids, kind="stable")
    return ParticleTable(ids[order], np.concatenate([a.xyz_px, b.xyz_px])[order],
                         np.concatenate([a.euler_deg, b.euler_deg])[order])


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80


def _shown(value: Any) -> str:
    """A short repr for error messages (bounded length and depth; ints too long to print are named, not shown)."""
    try:
        return _REPR.repr(value)
    except ValueError:
        return f"a {type(value).__name__} too long to print"


def _as_id(value: Any, where: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise CsptInputError(f"is {_shown(value)}", field=where, expected="an integer id")
    if isinstance(value, (float, np.floating)) and (not math.isfinite(value) or value != int(value)):
        raise CsptInputError(f"is {value!r}", field=where, expected="an integer id")
    if not -(2**63) <= int(value) < 2**63:
        raise CsptInputError("is out of the int64 range", field=where, expected="an integer id that fits in 64 bits")
    return int(value)


_MISSING = object()


def _num(record: Any, key: str, where: str, default: Any = _MISSING) -> float:
    if not isinstance(record, Mapping):
        raise CsptInputError(f"is a {type(record).__name__}", field=where, expected="a dict")
    if key not in record or record[key] is None:
        if default is _MISSING or default is None:
            raise CsptInputError("is missing", field=f"{where}.{key}", expected="a number")
        return default
    value = record[key]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise CsptInputError(f"is {_shown(value)}", field=f"{where}.{key}", expected="a number")
    try:
        number = float(value)
    except OverflowError:  # a Python int beyond float64
        raise CsptInputError("is beyond the float64 range", field=f"{where}.{key}",
                             expected="a finite number") from None
    if not math.isfinite(number):
        raise CsptInputError(f"is {value!r}", field=f"{where}.{key}", expected="a finite number")
    return float(value)


def _warn_if_not_sequential(ids: np.ndarray, name: str) -> None:
    if ids.size and not np.array_equal(ids, np.arange(ids[0], ids[0] + ids.size)):
        warn_input("ids are not sequential; pyp expects sequential particle ids and tilt indices", field=name)
