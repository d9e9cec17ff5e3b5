"""``TrackDocument``: the tracks being curated, with named undoable actions, change callbacks and autosave snapshots.

Qt-free. The document holds the current :class:`~napari_cspt2d.model.tracks.TrackSet` (an immutable value), a linear
history of states (undo/redo), per-projection residuals when a 3D fit provided them, and the state last saved. Every
edit is one named action; napari layers are views that subscribe to :class:`Change` notifications.

Positions are absolute image positions ``(x, y)`` in unbinned pixels of the tilt stack (numpy convention, pixel centres
at integers); the document converts them to the stored shifts through :mod:`napari_cspt2d.geometry`.

Autosave snapshots are ``.npz`` files of the TrackSet columns (exact, fast, no pickle) written atomically; see
:func:`autosave_path`, :func:`write_snapshot` and :func:`read_snapshot`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import CsptInputError
from ..io.atomic import atomic_open
from .. import geometry
from .tracks import ParticleTable, TiltTable, TrackSet

__all__ = [
    "Change",
    "TrackDocument",
    "ParticleSummary",
    "particle_summary",
    "autosave_path",
    "find_recovery",
    "write_snapshot",
    "read_snapshot",
]

ChangeKind = Literal["edit", "undo", "redo", "residuals", "saved"]


@dataclass(frozen=True)
class Change:
    """What changed in a :class:`TrackDocument`.

    ``kind`` is ``"edit"`` (a new action), ``"undo"``/``"redo"`` (``name`` is the action undone/redone),
    ``"residuals"`` (only the residual column changed) or ``"saved"`` (only the dirty flag changed).
    ``moved_rows`` lists the rows whose position changed when nothing else did (same rows, same particles and tilts);
    ``None`` means anything may have changed."""

    kind: ChangeKind
    name: str
    moved_rows: NDArray[np.int64] | None = None


@dataclass(frozen=True)
class _State:
    name: str  # the action that produced this state
    tracks: TrackSet
    moved_rows: NDArray[np.int64] | None
    nbytes: int  # memory this state adds to the history (arrays not shared with the previous state)


class TrackDocument:
    """The tracks being curated: current :class:`TrackSet`, undo/redo history of named actions, change callbacks.

    Parameters
    ----------
    tracks:
        Initial tracks; must know ``image_shape_yx`` (positions are absolute).
    source:
        Where the tracks came from (a file path or any key); used to name the autosave snapshot.
    max_undo:
        Most actions kept for undo.
    max_history_bytes:
        Memory budget of the history (states share unchanged arrays; the oldest are dropped beyond the budget)."""

    def __init__(
        self,
        tracks: TrackSet,
        *,
        source: str | os.PathLike[str] | None = None,
        max_undo: int = 1000,
        max_history_bytes: int = 512 * 2**20,
    ) -> None:
        if not isinstance(tracks, TrackSet):
            raise CsptInputError(f"is a {type(tracks).__name__}", field="tracks", expected="a TrackSet")
        _require_shape(tracks)
        self._states: list[_State] = [_State("Open", tracks, None, 0)]
        self._index = 0
        self._saved: TrackSet | None = tracks
        self._callbacks: list[Callable[[Change], None]] = []
        self._residual: tuple[TrackSet, NDArray[np.float64]] | None = None
        self._residual_cache: tuple[TrackSet, NDArray[np.float64]] | None = None
        self.source = None if source is None else os.fspath(source)
        self.max_undo = int(max_undo)
        self.max_history_bytes = int(max_history_bytes)

    # ------------------------------------------------------------------ state
    @property
    def tracks(self) -> TrackSet:
        """The current tracks."""
        return self._states[self._index].tracks

    @property
    def dirty(self) -> bool:
        """True when the current tracks differ from the ones last saved (or opened)."""
        return self.tracks is not self._saved

    @property
    def can_undo(self) -> bool:
        return self._index > 0

    @property
    def can_redo(self) -> bool:
        return self._index < len(self._states) - 1

    @property
    def undo_name(self) -> str | None:
        """Name of the action :meth:`undo` would undo."""
        return self._states[self._index].name if self.can_undo else None

    @property
    def redo_name(self) -> str | None:
        """Name of the action :meth:`redo` would redo."""
        return self._states[self._index + 1].name if self.can_redo else None

    @property
    def history_names(self) -> list[str]:
        """Names of the actions from the oldest kept to the current one."""
        return [s.name for s in self._states[1 : self._index + 1]]

    def mark_saved(self) -> None:
        """Record that the current tracks are saved (``dirty`` becomes False)."""
        self._saved = self.tracks
        self._notify(Change("saved", "Save"))

    # ------------------------------------------------------------------ callbacks
    def subscribe(self, callback: Callable[[Change], None]) -> Callable[[], None]:
        """Call ``callback(change)`` after every change; returns a function that unsubscribes it."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    def _notify(self, change: Change) -> None:
        for callback in list(self._callbacks):
            callback(change)

    # ------------------------------------------------------------------ residuals
    @property
    def residual_px(self) -> NDArray[np.float64]:
        """Residual (px) of each current projection from the last 3D fit; NaN where unknown or moved since."""
        current = self.tracks
        if self._residual is None:
            return np.full(len(current), np.nan)
        if self._residual_cache is None or self._residual_cache[0] is not current:
            fitted, values = self._residual
            self._residual_cache = (current, values if fitted is current else _carry_over(values, fitted, current))
        return self._residual_cache[1]

    def set_residuals(self, residual_px: ArrayLike) -> None:
        """Attach per-projection residuals ``(N,)`` (px, NaN = unknown) computed for the current tracks.

        They follow the projections through later edits (by particle and tilt) until a projection moves."""
        values = np.asarray(residual_px, dtype=np.float64).reshape(-1)
        if values.size != len(self.tracks):
            raise CsptInputError(f"has {values.size} values for {len(self.tracks)} projections",
                                 field="residual_px", expected="one value per projection")
        self._residual = (self.tracks, values.copy())
        self._residual_cache = None
        self._notify(Change("residuals", "Residuals"))

    # ------------------------------------------------------------------ history
    def apply(self, name: str, tracks: TrackSet, *, moved_rows: ArrayLike | None = None) -> None:
        """Make ``tracks`` the current state as one undoable action called ``name``.

        ``moved_rows``: pass the rows whose position alone changed, when particles, tilts and rows are unchanged
        (lets views update only those rows)."""
        if not isinstance(tracks, TrackSet):
            raise CsptInputError(f"is a {type(tracks).__name__}", field="tracks", expected="a TrackSet")
        _require_shape(tracks)
        if tracks is self.tracks:
            return
        rows = None if moved_rows is None else np.unique(np.asarray(moved_rows, dtype=np.int64))
        del self._states[self._index + 1 :]
        self._states.append(_State(name, tracks, rows, _new_bytes(self.tracks, tracks)))
        self._index += 1
        self._trim()
        self._notify(Change("edit", name, rows))

    def undo(self) -> str | None:
        """Undo the last action; returns its name (None when there is nothing to undo)."""
        if not self.can_undo:
            return None
        state = self._states[self._index]
        self._index -= 1
        self._notify(Change("undo", state.name, state.moved_rows))
        return state.name

    def redo(self) -> str | None:
        """Redo the last undone action; returns its name (None when there is nothing to redo)."""
        if not self.can_redo:
            return None
        self._index += 1
        state = self._states[self._index]
        self._notify(Change("redo", state.name, state.moved_rows))
        return state.name

    def _trim(self) -> None:
        while self._index > 0 and (
            self._index > self.max_undo or sum(s.nbytes for s in self._states) > self.max_history_bytes
        ):
            del self._states[0]
            self._index -= 1
            self._states[0] = replace(self._states[0], nbytes=0)

    # ------------------------------------------------------------------ actions
    def set_tracks(self, tracks: TrackSet, name: str = "Replace tracks") -> None:
        """Replace all tracks (e.g. loaded from a file or recovered from an autosave) as one undoable action."""
        self.apply(name, tracks)

    def move_points(self, rows: ArrayLike, position_xy_px: ArrayLike) -> None:
        """Move projections ``rows`` to absolute positions ``(len(rows), 2)`` (x, y, unbinned px)."""
        ts = self.tracks
        rows = self._check_rows(rows)
        pos = np.asarray(position_xy_px, dtype=np.float64).reshape(-1, 2)
        if pos.shape[0] != rows.size or not np.all(np.isfinite(pos)):
            raise CsptInputError(f"has shape {pos.shape}", field="position_xy_px",
                                 expected=f"({rows.size}, 2) finite x, y")
        if rows.size == 1:
            name = f"Move point (particle {ts.particle[rows[0]]}, tilt {ts.tilt[rows[0]]})"
        else:
            name = f"Move {rows.size} points"
        self.apply(name, _with_positions(ts, rows, pos), moved_rows=rows)

    def add_point(self, particle: int, tilt: int, position_xy_px: ArrayLike, *, score: float = 0.0,
                  occupancy: float = 100.0) -> int:
        """Add a projection of an existing ``particle`` in ``tilt`` at ``(x, y)``; returns its row."""
        ts = self.tracks
        particle, tilt = int(particle), int(tilt)
        if not np.isin(particle, ts.particles.id):
            raise CsptInputError(f"particle {particle} does not exist", field="particle",
                                 expected="an existing particle id (use add_particle for a new one)")
        new = self._append(particle, tilt, position_xy_px, score, occupancy)
        self.apply(f"Add point (particle {particle}, tilt {tilt})", new)
        return int(new.row_of(particle, tilt))

    def add_particle(self, tilt: int, position_xy_px: ArrayLike, *, score: float = 0.0,
                     occupancy: float = 100.0) -> int:
        """Start a new particle with one projection in ``tilt`` at ``(x, y)``; returns the new particle id."""
        particle = self.tracks.next_particle_id()
        new = self._append(particle, int(tilt), position_xy_px, score, occupancy)
        self.apply(f"Add particle {particle}", new)
        return particle

    def delete_points(self, rows: ArrayLike) -> None:
        """Delete projections ``rows``; a particle left without projections disappears."""
        ts = self.tracks
        rows = self._check_rows(rows)
        if rows.size == 0:
            return
        if rows.size == 1:
            name = f"Delete point (particle {ts.particle[rows[0]]}, tilt {ts.tilt[rows[0]]})"
        else:
            name = f"Delete {rows.size} points"
        self.apply(name, ts.drop_rows(rows))

    def delete_particles(self, particle_ids: ArrayLike) -> None:
        """Delete particles (all their projections)."""
        ids = self._check_particles(particle_ids, at_least=1)
        label = f"particle {ids[0]}" if ids.size == 1 else f"{ids.size} particles"
        self.apply(f"Delete {label}", self.tracks.select(~np.isin(self.tracks.particle, ids)))

    def merge_particles(self, particle_ids: ArrayLike) -> int:
        """Merge particles into the one with the smallest id (its 3D point and orientation are kept; image
        positions do not move). Fails if two of them have a projection in the same tilt. Returns the kept id."""
        ids = self._check_particles(particle_ids, at_least=2)
        ts = self.tracks
        rows = np.flatnonzero(np.isin(ts.particle, ids))
        tilts, counts = np.unique(ts.tilt[rows], return_counts=True)
        if np.any(counts > 1):
            raise CsptInputError(
                f"particles {', '.join(map(str, ids.tolist()))} share tilts {tilts[counts > 1].tolist()}",
                field="particles", expected="particles without projections in the same tilt (delete duplicates first)",
            )
        target = int(ids[0])
        merged = _relabel(ts, rows[ts.particle[rows] != target], target)
        self.apply(f"Merge particles {', '.join(map(str, ids.tolist()))} into {target}", merged)
        return target

    def split_particle(self, particle: int, from_tilt: int) -> int:
        """Give the projections of ``particle`` in tilts ``>= from_tilt`` (tilt id) to a new particle with the same
        3D point and orientation; returns the new id."""
        ts = self.tracks
        particle = int(self._check_particles([particle], at_least=1)[0])
        rows = np.flatnonzero(ts.particle == particle)
        moving = rows[ts.tilt[rows] >= int(from_tilt)]
        if moving.size == 0 or moving.size == rows.size:
            raise CsptInputError(f"tilt {from_tilt} does not split particle {particle}", field="from_tilt",
                                 expected="a tilt with projections of the particle on both sides")
        new_id = ts.next_particle_id()
        self.apply(f"Split particle {particle} at tilt {from_tilt} into {new_id}",
                   _relabel(ts, moving, new_id, copy_from=particle))
        return new_id

    # ------------------------------------------------------------------ helpers
    def _append(self, particle: int, tilt: int, position_xy_px: ArrayLike, score: float,
                occupancy: float) -> TrackSet:
        ts = self.tracks
        pos = np.asarray(position_xy_px, dtype=np.float64).reshape(-1)
        if pos.size != 2 or not np.all(np.isfinite(pos)):
            raise CsptInputError(f"is {position_xy_px!r}", field="position_xy_px", expected="finite (x, y)")
        if not np.isin(tilt, ts.tilts.id):
            raise CsptInputError(f"tilt {tilt} does not exist", field="tilt",
                                 expected=f"a tilt id in {ts.tilts.id.min()}..{ts.tilts.id.max()}")
        if ts.row_of(particle, tilt) is not None:
            raise CsptInputError(f"particle {particle} already has a point in tilt {tilt}", field="tilt",
                                 expected="a tilt without a point of this particle")
        trow = int(np.searchsorted(ts.tilts.id, tilt))
        prow = np.flatnonzero(ts.particles.id == particle)
        xyz = ts.particles.xyz_px[prow[0]] if prow.size else np.zeros(3)  # a new particle has no 3D point yet
        shift = geometry.shifts_from_positions(xyz[None], ts.tilts.angle_deg[trow], ts.tilts.axis_deg[trow],
                                               pos[None], _require_shape(ts))
        return ts.append([particle], [tilt], shift, score=[score], occupancy=[occupancy])

    def _check_rows(self, rows: ArrayLike) -> NDArray[np.int64]:
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64)).reshape(-1)
        n = len(self.tracks)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise CsptInputError(f"has rows outside 0..{n - 1}", field="rows", expected="existing projection rows")
        if np.unique(rows).size != rows.size:
            raise CsptInputError("has repeated rows", field="rows", expected="distinct rows")
        return rows

    def _check_particles(self, particle_ids: ArrayLike, at_least: int) -> NDArray[np.int64]:
        ids = np.unique(np.atleast_1d(np.asarray(particle_ids, dtype=np.int64)))
        unknown = ids[~np.isin(ids, self.tracks.particles.id)]
        if unknown.size:
            raise CsptInputError(f"particle {unknown[0]} does not exist", field="particles",
                                 expected="existing particle ids")
        if ids.size < at_least:
            raise CsptInputError(f"{ids.size} distinct particles given", field="particles",
                                 expected=f"at least {at_least}")
        return ids


def _with_positions(ts: TrackSet, rows: NDArray[np.int64], position_xy_px: NDArray[np.float64]) -> TrackSet:
    """``ts.with_positions(rows, positions)`` in O(len(rows)) besides one copy of the shift column.

    Only ``shift_px`` changes (finite values, same rows, particles and tilts), so the TrackSet invariants still hold
    and the O(N log N) re-validation of ``TrackSet.__post_init__`` is skipped: a move in a 100k-projection set takes
    well under a millisecond instead of tens."""
    trow = np.searchsorted(ts.tilts.id, ts.tilt[rows])
    prow = np.searchsorted(ts.particles.id, ts.particle[rows])
    shift = ts.shift_px.copy()
    shift[rows] = geometry.shifts_from_positions(ts.particles.xyz_px[prow], ts.tilts.angle_deg[trow],
                                                 ts.tilts.axis_deg[trow], position_xy_px, _require_shape(ts))
    moved = copy.copy(ts)  # a shallow copy shares every other column and does not run __post_init__
    object.__setattr__(moved, "shift_px", shift)
    return moved


def _require_shape(tracks: TrackSet) -> tuple[int, int]:
    if tracks.image_shape_yx is None:
        raise CsptInputError("is unknown", field="image_shape_yx", expected="the tilt images' (ny, nx)")
    return tracks.image_shape_yx


def _relabel(ts: TrackSet, rows: NDArray[np.int64], new_id: int, copy_from: int | None = None) -> TrackSet:
    """Give projections ``rows`` to particle ``new_id`` (created as a copy of ``copy_from`` when given), keeping their
    image positions: the shift absorbs any difference between the old and new particle's projected 3D point."""
    particles = ts.particles
    if copy_from is not None:
        src = np.searchsorted(particles.id, copy_from)
        ids = np.append(particles.id, new_id)
        order = np.argsort(ids, kind="stable")
        particles = ParticleTable(ids[order], np.vstack([particles.xyz_px, particles.xyz_px[src]])[order],
                                  np.vstack([particles.euler_deg, particles.euler_deg[src]])[order])
    trow = ts.tilt_rows()[rows]
    angle, axis = ts.tilts.angle_deg[trow], ts.tilts.axis_deg[trow]
    old_xyz = ts.particles.xyz_px[ts.particle_rows()[rows]]
    new_xyz = np.broadcast_to(particles.xyz_px[np.searchsorted(particles.id, new_id)], old_xyz.shape)
    shift = ts.shift_px.copy()
    moved_by = geometry.project_points(old_xyz, angle, axis) - geometry.project_points(new_xyz, angle, axis)
    shift[rows] += moved_by[:, :2]
    particle = ts.particle.copy()
    particle[rows] = new_id
    keep = np.isin(particles.id, particle)
    return replace(ts, particle=particle, shift_px=shift, particles=particles.take(keep)).sorted()


def _new_bytes(before: TrackSet, after: TrackSet) -> int:
    """Bytes of ``after``'s projection arrays that are not shared with ``before``."""
    names = ("particle", "tilt", "shift_px", "score", "occupancy")
    return sum(getattr(after, n).nbytes for n in names if getattr(after, n) is not getattr(before, n))


def _pair_keys(ts: TrackSet, tmin: int, span: int) -> NDArray[np.int64]:
    return ts.particle * span + (ts.tilt - tmin)


def _carry_over(values: NDArray[np.float64], old: TrackSet, new: TrackSet) -> NDArray[np.float64]:
    """Per-projection values of ``old`` moved onto ``new`` by (particle, tilt); NaN for new or moved projections."""
    out = np.full(len(new), np.nan)
    if not len(old) or not len(new):
        return out
    tmin = int(min(old.tilt.min(), new.tilt.min()))
    span = int(max(old.tilt.max(), new.tilt.max())) - tmin + 1
    old_keys, new_keys = _pair_keys(old, tmin, span), _pair_keys(new, tmin, span)
    order = np.argsort(old_keys, kind="stable")
    pos = np.clip(np.searchsorted(old_keys, new_keys, sorter=order), 0, len(old) - 1)
    match = order[pos]
    found = (old_keys[match] == new_keys) & np.all(old.shift_px[match] == new.shift_px, axis=1)
    out[found] = values[match[found]]
    return out


# ---------------------------------------------------------------------- per-particle summary
@dataclass(frozen=True)
class ParticleSummary:
    """One row per particle: ``id``, ``n_tilts`` (projections), ``mean_score`` and ``max_residual_px`` (NaN when
    unknown)."""

    id: NDArray[np.int64]
    n_tilts: NDArray[np.int64]
    mean_score: NDArray[np.float64]
    max_residual_px: NDArray[np.float64]


def particle_summary(tracks: TrackSet, residual_px: ArrayLike | None = None) -> ParticleSummary:
    """Per-particle counts, mean score and largest residual (vectorised; ~1 ms for 100k projections)."""
    prow = tracks.particle_rows()
    n = len(tracks.particles)
    counts = np.bincount(prow, minlength=n)
    score_sum = np.bincount(prow, weights=tracks.score, minlength=n)
    mean_score = np.divide(score_sum, counts, out=np.full(n, np.nan), where=counts > 0)
    worst = np.full(n, np.nan)
    if residual_px is not None:
        res = np.asarray(residual_px, dtype=np.float64)
        known = np.isfinite(res)
        if known.any():
            tmp = np.full(n, -np.inf)
            np.maximum.at(tmp, prow[known], res[known])
            worst = np.where(np.isfinite(tmp), tmp, np.nan)
    return ParticleSummary(tracks.particles.id.copy(), counts.astype(np.int64), mean_score, worst)


# ---------------------------------------------------------------------- autosave snapshots
SNAPSHOT_VERSION = 1


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "napari-cspt2d" / "autosave"


def autosave_path(source: str | os.PathLike[str]) -> Path:
    """Where the autosave snapshot of tracks that came from ``source`` lives.

    Beside the source file (``.{file name}.cspt2d-autosave.npz``) when ``source`` is an existing file in a writable
    folder; otherwise in the user cache folder (``$XDG_CACHE_HOME/napari-cspt2d/autosave``), named by a hash of
    ``source``."""
    text = os.fspath(source)
    path = Path(text)
    if path.is_file() and os.access(path.parent, os.W_OK):
        return path.with_name(f".{path.name}.cspt2d-autosave.npz")
    key = str(path.resolve()) if path.exists() else text
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]
    return _cache_dir() / f"{Path(text).name or 'tracks'}-{digest}.npz"


def find_recovery(source: str | os.PathLike[str]) -> Path | None:
    """The autosave snapshot for ``source`` if there is one newer than ``source`` itself (unsaved edits)."""
    snap = autosave_path(source)
    if not snap.is_file():
        return None
    src = Path(os.fspath(source))
    if src.is_file() and src.stat().st_mtime > snap.stat().st_mtime:
        return None
    return snap


def write_snapshot(path: str | os.PathLike[str], tracks: TrackSet, *, source: str | None = None) -> Path:
    """Write ``tracks`` exactly (every column, ``image_shape_yx``) to an ``.npz`` snapshot, atomically."""
    meta = {"version": SNAPSHOT_VERSION, "source": source, "time": time.time(),
            "image_shape_yx": None if tracks.image_shape_yx is None else list(tracks.image_shape_yx)}
    arrays = {
        "particle": tracks.particle, "tilt": tracks.tilt, "shift_px": tracks.shift_px, "score": tracks.score,
        "occupancy": tracks.occupancy, "particles_id": tracks.particles.id, "particles_xyz_px": tracks.particles.xyz_px,
        "particles_euler_deg": tracks.particles.euler_deg,
        **{f"tilts_{k}": getattr(tracks.tilts, k) for k in _TILT_COLUMNS},
        "meta": np.array(json.dumps(meta)),
    }
    with atomic_open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return Path(path)


_TILT_COLUMNS = ("id", "angle_deg", "defocus_um", "axis_deg", "dose", "order")


def read_snapshot(path: str | os.PathLike[str]) -> tuple[TrackSet, dict]:
    """Read a snapshot written by :func:`write_snapshot`: ``(tracks, meta)`` (``meta`` has ``source``, ``time``)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise CsptInputError(f"cannot be read as an autosave snapshot ({exc})", file=path) from exc
    missing = [k for k in ("meta", "particle", "tilt", "shift_px", "score", "occupancy", "particles_id")
               if k not in arrays]
    if missing:
        raise CsptInputError("is missing arrays", file=path, field=missing[0], expected="a cspt2d autosave snapshot")
    try:
        meta = json.loads(str(arrays["meta"]))
    except json.JSONDecodeError as exc:
        raise CsptInputError(f"has unreadable metadata ({exc})", file=path, field="meta") from exc
    if meta.get("version") != SNAPSHOT_VERSION:
        raise CsptInputError(f"has version {meta.get('version')!r}", file=path, field="version",
                             expected=str(SNAPSHOT_VERSION))
    try:
        tracks = TrackSet(
            arrays["particle"], arrays["tilt"], arrays["shift_px"], arrays["score"], arrays["occupancy"],
            ParticleTable(arrays["particles_id"], arrays["particles_xyz_px"], arrays["particles_euler_deg"]),
            TiltTable(*(arrays[f"tilts_{k}"] for k in _TILT_COLUMNS)),
            None if meta.get("image_shape_yx") is None else tuple(meta["image_shape_yx"]),
        )
    except KeyError as exc:
        raise CsptInputError("is missing an array", file=path, field=str(exc), expected="a cspt2d snapshot") from exc
    except CsptInputError as exc:
        raise CsptInputError(exc.reason, file=path, field=exc.field, expected=exc.expected) from exc
    return tracks, meta
