"""The CSPT pipeline of a pyp project: per-particle refinement bundles on dask, merge, reconstruction, iterations.

:func:`run_cspt` is what ``pyp.csp_split`` (the seed's Option A) runs. It works in a project folder laid out as
:func:`napari_cspt2d.pyp.create_project` writes it (the current folder by default, like the seed's scripts).

Tilt series
    A project holds one or more tilt series (:func:`tilt_series_names`), each with its own stack, tilt table,
    defocus and parameter files; particle ids are per series. All series are refined against, and reconstructed
    into, one map per iteration, named after the project's ``data_set`` (:meth:`ProjectPaths.map`; pyp's name for
    the merged map). An empty ``data_set`` means the tilt series' name for a one-series project and, as pyp does,
    the project folder's name for several (:func:`data_set_name`). Each series is split into gold-standard halves on
    its own (:func:`reconstruct.half_split` of its particles), so the half maps stay independent.

Iterations
    pyp's numbering: iteration 1 is the input (``frealign/maps/{name}_r01.cistem`` of every tilt series; its map
    ``{data_set}_r01_01.mrc`` is reconstructed first when missing, or rebuilt when the input parameters changed
    since it was built here; a map put there by the user is their initial reference and is kept), iterations
    ``refine_iter`` ..
    ``refine_maxiter`` refine against the previous iteration's map. Iteration ``i``:

    1. bundle the particles of every tilt series' parameters of iteration ``i − 1``, ``slurm_bundle_size``
       particles per job;
    2. run the jobs on dask (:func:`run_bundle`): each writes its particles' split files as the seed's
       ``pyp.prepare_particle_cspt`` does (``csp_no_3d_points``: one region per particle,
       ``frealign/scratch/{stem}_region{k:04d}.cistem``, :func:`split_regions`; numbered as in the whole split, and
       written by the jobs so that a large project is not split file by file in this process), refines its
       particles against the map (:func:`refine.refine_tracks` with
       :meth:`RefineOptions.from_params` of iteration ``i``) and writes its result atomically to
       ``frealign/scratch/{name}_r01_{i:02d}_bundle{k:04d}.npz``, its log to ``log/`` (same stem, ``.log``), then
       inserts the refined projections into the half-map grids its process keeps for the iteration's map
       (:class:`reconstruct.HalfMapInsertion`, one per process, not per job);
    3. merge the bundles into ``frealign/maps/{name}_r01_{i:02d}.cistem`` (+ ``_extended.cistem``) per tilt series;
    4. reconstruct the data set: collect every process's grids (:func:`take_inserted_grids`), add them, insert here
       what no process holds (bundles resumed from an earlier run, or lost with their worker) and finish the map
       (Wiener filter, FSC): ``frealign/maps/{data_set}_r01_{i:02d}.mrc`` with ``_half1.mrc``/``_half2.mrc``,
       ``_fsc.csv`` and ``_fsc.png`` beside it. The map equals :func:`reconstruct.reconstruct_tracks` of all the
       merged projections up to float rounding. The initial map is built the same way by insertion-only jobs
       (:func:`run_insert`);
    5. stop early when the parameters stopped changing: RMS shift change < :data:`CONVERGED_SHIFT_PX` and median
       orientation change < :data:`CONVERGED_ANGLE_DEG` against iteration ``i − 1``.

Resuming
    A bundle result carries a fingerprint of everything it depends on (its parameter files, the reference map,
    the options, the picks, the tilt table, the stack's path, size and time); a rerun skips bundles whose result
    exists with the same fingerprint, so after a failure (reported with the failed bundle's log) running again only
    redoes what is missing. Merge and reconstruction are redone (they are deterministic and cheap next to
    refinement).

    Interrupted runs (a kill, a power cut): every file is written atomically, and while an iteration's files are
    being written a marker says so (``frealign/scratch/{data_set}_r01_{i:02d}.writing``; for the initial map, its
    ``{data_set}_r01_01.inputs`` record reads "pending"). A run asked to start at iteration ``i`` starts earlier
    when iteration ``i − 1`` was left unfinished: its marker is there, a parameter file is torn from its
    ``_extended.cistem`` (:func:`napari_cspt2d.io.cistem.read_pair`) or a map is missing. Iteration 1's map is
    rebuilt when its record is pending. Each run first removes the temporary files that killed writes left
    (:func:`napari_cspt2d.io.atomic.remove_stale_temp_files`).

Serial runs call the same job functions in this process, one after the other.

All checks of the project (parameters, files, shapes, tilt selection, map sizes) run before any work starts.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..errors import CsptInputError, CsptRunError
from ..io.atomic import atomic_open, remove_stale_temp_files
from ..io.mrc import open_stack, read_image
from ..model.params import PypParameters, check_cspt_mode, check_name
from ..model.tracks import ParticleTable, TiltTable, TrackSet
from . import refine
from .reconstruct import HalfMapInsertion, InsertedGrids, ReconstructionResult, ReconstructionSettings, half_split

__all__ = [
    "CONVERGED_SHIFT_PX",
    "CONVERGED_ANGLE_DEG",
    "ProjectPaths",
    "BundleJob",
    "InsertJob",
    "MapShare",
    "CsptRun",
    "tilt_series_names",
    "data_set_name",
    "split_regions",
    "run_bundle",
    "run_insert",
    "take_inserted_grids",
    "run_cspt",
    "plan_cspt",
    "reconstruction_options",
]

#: Convergence: RMS change of the projection positions (unbinned px) below this ...
CONVERGED_SHIFT_PX = 0.1
#: ... and median change of the particle orientations (°) below this.
CONVERGED_ANGLE_DEG = 0.25

Progress = Callable[[str, int, int], None]


# ==================================================================================================== paths
@dataclass(frozen=True)
class ProjectPaths:
    """The files of a project (module docstring) under ``root`` for data set ``data_set``."""

    root: Path
    data_set: str

    @property
    def maps(self) -> Path:
        return self.root / "frealign" / "maps"

    @property
    def scratch(self) -> Path:
        return self.root / "frealign" / "scratch"

    @property
    def logs(self) -> Path:
        return self.root / "log"

    def parameters(self, name: str, iteration: int) -> Path:
        """Parameter file of a tilt series after ``iteration`` (1 = the input ``{name}_r01.cistem``)."""
        suffix = "" if iteration == 1 else f"_{iteration:02d}"
        return self.maps / f"{name}_r01{suffix}.cistem"

    def map(self, iteration: int) -> Path:
        """The map of ``iteration``, of all tilt series together: ``{data_set}_r01_{iteration:02d}.mrc``."""
        return self.maps / f"{self.data_set}_r01_{iteration:02d}.mrc"

    def stack(self, name: str) -> Path:
        return self.root / f"{name}_stack.mrc"

    def metadata(self, name: str) -> Path:
        return self.root / f"{name}.pkl"

    def bundle(self, name: str, iteration: int, index: int) -> tuple[Path, Path]:
        """``(result .npz, log)`` of a bundle job."""
        stem = f"{name}_r01_{iteration:02d}_bundle{index:04d}"
        return self.scratch / f"{stem}.npz", self.logs / f"{stem}.log"

    @property
    def run_log(self) -> Path:
        return self.logs / f"{self.data_set}_csp.log"


def tilt_series_names(root: str | os.PathLike[str]) -> list[str]:
    """Tilt series of a project: every ``frealign/maps/{name}_r01.cistem`` (not an iteration's ``_r01_NN``) that has
    a ``{name}_stack.mrc`` beside the project's ``.pyp_config.toml``, sorted."""
    maps = Path(root) / "frealign" / "maps"
    names = []
    for path in sorted(maps.glob("*_r01.cistem")):
        name = path.name[: -len("_r01.cistem")]
        if (Path(root) / f"{name}_stack.mrc").exists():
            names.append(name)
    return names


def data_set_name(data_set: str, root: str | os.PathLike[str], names: Sequence[str]) -> str:
    """The name of a project's maps: ``data_set``, or when it is empty the tilt series' name (one series) or the
    project folder's name (several, as pyp names a data set), checked as a file-name part."""
    return check_name(data_set or (names[0] if len(names) == 1 else Path(root).resolve().name), "data_set")


# ==================================================================================================== inputs
@dataclass(frozen=True, eq=False)
class _Series:
    """One tilt series: its input tracks (tilt table and image shape from ``{name}.pkl``) and stack path."""

    name: str
    tracks: TrackSet
    stack: Path


def _as_params(parameters: Mapping[str, Any]) -> PypParameters:
    if isinstance(parameters, PypParameters):
        return parameters.validate()
    if not isinstance(parameters, Mapping):
        raise CsptInputError(f"is a {type(parameters).__name__}", field="parameters", expected="a dict of pyp keys")
    return PypParameters(dict(parameters), strict=False)


def _load_series(paths: ProjectPaths, name: str) -> _Series:
    from ..pyp import load_project

    check_name(name, "name")
    _, tracks, _ = load_project(paths.root, name)
    stack = paths.stack(name)
    data, _ = open_stack(stack)
    if tuple(data.shape[1:]) != tuple(tracks.image_shape_yx):
        raise CsptInputError(f"has images of {tuple(data.shape[1:])} but {paths.metadata(name)} says "
                             f"{tracks.image_shape_yx}", file=stack, field="shape", expected="the same (ny, nx)")
    if len(tracks.tilts) and int(tracks.tilts.id.max()) >= data.shape[0]:
        raise CsptInputError(f"has {data.shape[0]} sections; tilt {int(tracks.tilts.id.max())} is used", file=stack,
                             field="sections", expected="one section per tilt id")
    return _Series(name, tracks, stack)


def _read_tracks(path: Path, image_shape_yx: tuple[int, int], tilts: TiltTable) -> TrackSet:
    """An iteration's parameter file of a tilt series as a TrackSet with the series' tilt table."""
    from ..pyp import Parameters

    return Parameters.from_file(path).to_trackset(image_shape_yx, tilts=tilts)


def _write_tracks(path: Path, tracks: TrackSet, params: PypParameters) -> Path:
    from ..pyp import Parameters

    return Parameters.from_trackset(tracks, params).write(path)[0]


def reconstruction_options(params: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`reconstruct.reconstruct_tracks` for a project's parameters (stack pixel, box in
    tilt-stack px, binning, particle radius, optics, tilt range, dose weighting, symmetry)."""
    p = _as_params(params)
    return dict(pixel_A=p.stack_pixel_A, extract_box=p.box_unbinned_px, extract_bin=p["extract_bin"],
                particle_rad_A=p["particle_rad"], voltage_kV=p["scope_voltage"], cs_mm=p["scope_cs"],
                amp_contrast=p["scope_wgh"], min_tilt_deg=p["reconstruct_mintilt"],
                max_tilt_deg=p["reconstruct_maxtilt"], dose_weighting=p["reconstruct_dose_weighting_enable"],
                symmetry=p["particle_sym"])


def _check_project(paths: ProjectPaths, params: PypParameters, first: int, last: int, names: Sequence[str],
                   tilt_unit: refine.TiltUnit) -> list[_Series]:
    """Every check that can fail on the inputs, before any work (module docstring)."""
    from .extract import check_extraction

    check_cspt_mode(params)
    if not names:
        raise CsptInputError("has no tilt series", file=paths.maps, field="frealign/maps",
                             expected="{name}_r01.cistem files with {name}_stack.mrc in the project folder")
    if not (params["refine_iter"] <= first <= last):
        raise CsptInputError(f"is {first} with refine_iter {params['refine_iter']} and refine_maxiter {last}",
                             field="iteration", expected="refine_iter <= iteration <= refine_maxiter")
    check_extraction(params.box_unbinned_px, params["extract_bin"], params["particle_rad"], params.stack_pixel_A)
    imaging = refine.Imaging.from_params(params)
    options = [refine.RefineOptions.from_params(params, it, tilt_unit=tilt_unit) for it in range(first, last + 1)]
    series = [_load_series(paths, name) for name in names]
    for s in series:
        for opt in options:
            if not opt.tilts.mask(s.tracks.tilts).any():
                raise CsptInputError(f"selects no tilt of {s.name} ({opt.tilts.describe()})",
                                     field="csp_UseImagesForRefinementMin/Max",
                                     expected="a range that contains at least one tilt")
        if first > 2 and not paths.parameters(s.name, first - 1).is_file():
            raise CsptInputError("does not exist", file=paths.parameters(s.name, first - 1),
                                 expected=f"the parameters of iteration {first - 1} to start at iteration {first}")
    previous = paths.map(first - 1)
    if first > 2 and not previous.is_file():
        raise CsptInputError("does not exist", file=previous, expected=f"the map of iteration {first - 1}")
    if previous.is_file():
        data, _ = open_stack(previous)
        if data.shape != (imaging.box,) * 3:
            raise CsptInputError(f"is a {data.shape} map", file=previous, field="shape",
                                 expected=f"a {imaging.box}³ map (extract_box)")
    return series


# ==================================================================================================== split
def _particle_rows(tracks: TrackSet) -> Callable[[Sequence[int] | NDArray[np.int64]], NDArray[np.int64]]:
    """``rows(wanted)``: the rows of the particles ``wanted`` in a (particle, tilt)-sorted TrackSet (ids without
    projections give none). The index is built once here, so a call costs what it returns, not the whole set."""
    ids, first = np.unique(tracks.particle, return_index=True)
    bounds = np.append(first, len(tracks))

    def rows(wanted: Sequence[int] | NDArray[np.int64]) -> NDArray[np.int64]:
        wanted = np.asarray(wanted, dtype=np.int64).reshape(-1)
        k = np.searchsorted(ids, wanted)
        k = k[(k < ids.size) & (ids[np.minimum(k, max(ids.size - 1, 0))] == wanted)] if ids.size else k[:0]
        return np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i in k]) if k.size else np.zeros(0, np.int64)

    return rows


def split_regions(tracks: TrackSet, regions: Sequence[Sequence[int]], parameter_file: str | os.PathLike[str],
                  params: Mapping[str, Any], out_dir: str | os.PathLike[str], first_index: int = 0
                  ) -> list[tuple[Path, NDArray[np.int64], NDArray[np.int64]]]:
    """Write one parameter file per region (a list of particle ids), ``{out_dir}/{stem}_region{k:04d}.cistem``
    (+ ``_extended``) with ``stem`` = ``parameter_file``'s; returns pyp's ``split_parx_list``: ``(path, particle
    ids, tilt ids)`` per non-empty region, numbered in order from ``first_index`` (a bundle job writes the regions
    of its own particles, numbered as in the whole split)."""
    params = _as_params(params)
    tracks = tracks.sorted()
    rows_of = _particle_rows(tracks)
    out = []
    for region in regions:
        rows = rows_of(region)
        if rows.size == 0:
            continue
        sub = tracks.select(rows)
        k = first_index + len(out)
        path = _write_tracks(Path(out_dir) / f"{Path(parameter_file).stem}_region{k:04d}.cistem", sub, params)
        out.append((path, sub.particles.id.copy(), np.unique(sub.tilt)))
    return out


# ==================================================================================================== bundle jobs
@dataclass(frozen=True, eq=False)
class MapShare:
    """How a job adds its projections to an iteration's map: into the grids its process keeps under ``key`` (one
    key per map and run, see :func:`take_inserted_grids`), made with ``settings``, each particle into its half
    (``half_of`` per particle id ``half_ids``: :func:`reconstruct.half_split` of the whole tilt series, so the
    halves do not depend on the bundling)."""

    key: str
    settings: ReconstructionSettings
    half_ids: NDArray[np.int64]
    half_of: NDArray[np.int64]

    def halves(self, tracks: TrackSet) -> NDArray[np.int64]:
        """Half (0/1) of every projection of ``tracks`` (particles of this share's tilt series)."""
        return self.half_of[np.searchsorted(self.half_ids, tracks.particle)]

    def subset(self, ids: NDArray[np.int64]) -> MapShare:
        """This share for the particles ``ids`` (sorted, all in this share) only: what one job carries (the whole
        table in every job would make the jobs grow with the square of the number of particles)."""
        rows = np.searchsorted(self.half_ids, ids)
        return MapShare(self.key, self.settings, self.half_ids[rows], self.half_of[rows])


def _map_share(key: str, settings: ReconstructionSettings, tracks: TrackSet) -> MapShare:
    ids, first_rows = np.unique(tracks.particle, return_index=True)
    return MapShare(key, settings, ids, half_split(tracks)[first_rows])


class _TracksJob:
    """What the jobs share: the ``tracks`` of their particles."""

    tracks: TrackSet

    @property
    def particle_ids(self) -> NDArray[np.int64]:
        """The job's particle ids, sorted."""
        return np.unique(self.tracks.particle)


@dataclass(frozen=True, eq=False)
class BundleJob(_TracksJob):
    """Everything one bundle job needs (picklable, no open files): the ``tracks`` of its particles as the
    iteration's input parameter file ``source`` holds them, where and how to write their per-particle split files
    (``split_dir``, ``params``; regions numbered from ``first_region``), the tilt series' ``stack``, the reference
    map(s) (and a digest of their content), the particles' picks (``origin_keys`` = particle id × 2³² + tilt id,
    ``origin_px`` positions), whether to refine each particle against its half map (``gold_standard``) and the
    ``share`` of the iteration's map it inserts its refined projections into. ``fingerprint`` identifies the inputs
    of the refinement; ``result``/``log`` are where the job writes."""

    name: str
    iteration: int
    index: int
    tracks: TrackSet
    source: str
    first_region: int
    split_dir: str
    params: PypParameters
    stack: str
    references: tuple[str, ...]
    reference_digest: str
    options: refine.RefineOptions
    imaging: refine.Imaging
    origin_keys: NDArray[np.int64]
    origin_px: NDArray[np.float64]
    gold_standard: bool
    share: MapShare
    fingerprint: str
    result: str
    log: str

    @property
    def label(self) -> str:
        return f"{self.name} iteration {self.iteration} bundle {self.index}"


@dataclass(frozen=True, eq=False)
class InsertJob(_TracksJob):
    """A job that only inserts ``tracks`` (a bundle of particles of tilt series ``name``, boxed from ``stack``)
    into its ``share`` of a map: the initial map's jobs."""

    name: str
    index: int
    stack: str
    tracks: TrackSet
    share: MapShare

    @property
    def label(self) -> str:
        return f"{self.name} map bundle {self.index}"


def _pair_key(particle: NDArray, tilt: NDArray) -> NDArray[np.int64]:
    return particle.astype(np.int64) * (1 << 32) + tilt.astype(np.int64)


class _JobLog:
    """A bundle job's log file (plain appends, so it survives a crash of the job)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fh = open(path, "w", encoding="utf-8")
        self.last = 0.0

    def __call__(self, message: str) -> None:
        self.fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        self.fh.flush()

    def progress(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last > 5.0 or done >= total:
            self.last = now
            self(f"{stage}: {done}/{total}")

    def close(self) -> None:
        self.fh.close()


def _finished(result: Path, fingerprint: str) -> bool:
    if not result.is_file():
        return False
    try:
        with np.load(result) as data:
            return str(data["fingerprint"]) == fingerprint
    except (OSError, ValueError, KeyError):
        return False


@functools.lru_cache(maxsize=1)
def _projectors(paths: tuple[str, ...], digest: str) -> list[Any]:
    """Projectors of the reference map(s), kept for the next bundle of the same iteration on this worker (``digest``
    of the files' content is part of the key, so a changed map is never reused)."""
    from .backproject import Projector

    return [Projector(read_image(p)) for p in paths]


def use_one_thread() -> None:
    """Make extraction, insertion and projection in this process single-threaded (what a worker process wants: the
    workers are the parallelism, so their own FFT/projection threads would only oversubscribe the cores)."""
    from . import backproject, extract

    backproject.WORKERS = extract.WORKERS = 1


def _one_thread_on_dask_worker() -> None:
    """:func:`use_one_thread` on a dask worker (each is one process with one thread); a serial run keeps the
    default threads."""
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:  # not on a worker
        return
    use_one_thread()


#: The half-map grids this process is filling, per :attr:`MapShare.key`: the insertion and the labels of the jobs
#: in it. Worker threads of one process share an entry, so insertions into it take turns (``_INSERTING``).
_INSERTIONS: dict[str, tuple[HalfMapInsertion, list[str]]] = {}
_INSERTING = threading.Lock()
#: Keys whose grids were taken: a job still running when its run stopped must not start new grids nobody takes.
_TAKEN: set[str] = set()


def _insert(share: MapShare, stack: Any, tracks: TrackSet, label: str) -> None:
    """Insert ``tracks`` (boxed from ``stack``, the tilt series' ``(n_tilts, ny, nx)``) into this process's grids
    of ``share`` and note ``label``."""
    with _INSERTING:
        if share.key in _TAKEN:
            return
        if share.key not in _INSERTIONS:
            _INSERTIONS[share.key] = (HalfMapInsertion(share.settings), [])
        insertion, labels = _INSERTIONS[share.key]
        insertion.insert(stack, tracks, share.halves(tracks))
        labels.append(label)


def take_inserted_grids(key: str) -> tuple[InsertedGrids, list[str]] | None:
    """Remove this process's grids of map ``key`` and return them with the labels of the jobs inserted into them
    (None when it has none). The main process calls it in every worker (``Client.run``) and in itself."""
    with _INSERTING:
        _TAKEN.add(key)
        entry = _INSERTIONS.pop(key, None)
    if entry is None:
        return None
    insertion, labels = entry
    insertion.close()
    return insertion.grids(), labels


def run_insert(job: InsertJob) -> str:
    """Insert the projections of an :class:`InsertJob` into its share of the map (runs on a dask worker); returns
    the job's label. Raises what the insertion raises."""
    _one_thread_on_dask_worker()
    _insert(job.share, open_stack(job.stack)[0], job.tracks, job.label)
    return job.label


def run_bundle(job: BundleJob) -> dict[str, Any]:
    """Refine the particles of one bundle and insert them into the job's share of the map (runs on a dask worker).
    Returns ``{"label", "ok", "skipped", "seconds", "error", "log"}``; never raises for a failure of the work
    itself (the error and traceback go to the log). A bundle whose result exists is skipped (its projections are
    inserted by the main process)."""
    started = time.perf_counter()
    result, log_path = Path(job.result), Path(job.log)
    summary = {"label": job.label, "ok": True, "skipped": False, "seconds": 0.0, "error": "", "log": str(log_path)}
    if _finished(result, job.fingerprint):
        summary["skipped"] = True
        return summary
    _one_thread_on_dask_worker()
    log = _JobLog(log_path)
    try:
        tracks = job.tracks
        log(f"{job.label}: {tracks.n_particles} particle(s) of {job.source}, reference {', '.join(job.references)}")
        rows = np.searchsorted(job.origin_keys, _pair_key(tracks.particle, tracks.tilt))
        if np.any(rows >= job.origin_keys.size) or np.any(job.origin_keys[np.minimum(rows, job.origin_keys.size - 1)]
                                                          != _pair_key(tracks.particle, tracks.tilt)):
            raise CsptInputError("has projections that are not in the input parameters", file=job.source,
                                 field="PIND/IMIND", expected="the projections of the input tracks")
        split_regions(tracks, [[i] for i in tracks.particles.id], job.source, job.params,
                      job.split_dir, first_index=job.first_region)
        stack, _ = open_stack(job.stack)
        refs = _projectors(job.references, job.reference_digest)
        half = job.share.halves(tracks) if job.gold_standard else None
        out = refine.refine_tracks(stack, tracks, refs if len(refs) > 1 else refs[0], job.options, job.imaging,
                                   half=half, origin_px=job.origin_px[rows], progress=log.progress)
        t = out.tracks
        with atomic_open(result, "wb") as fh:
            np.savez(fh, particle=t.particle, tilt=t.tilt, shift_px=t.shift_px, score=t.score,
                     occupancy=t.occupancy, particle_id=t.particles.id, euler_deg=t.particles.euler_deg,
                     particle_score=out.particle_score, fingerprint=np.array(job.fingerprint))
        refined = time.perf_counter()
        _insert(job.share, stack, t, job.label)
        summary["seconds"] = time.perf_counter() - started
        log(f"done in {summary['seconds']:.1f} s (inserted into the map in {time.perf_counter() - refined:.1f} s); "
            f"median score {np.median(t.score):.3f}, {int((t.occupancy == 0).sum())} projection(s) below the cutoff")
    except Exception as exc:  # reported to the caller with the log path; the run can be resumed
        log(f"FAILED: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        summary.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    finally:
        log.close()
    return summary

# ==================================================================================================== the run
@dataclass(eq=False)
class CsptRun:
    """Outcome of :func:`run_cspt`: the last ``map`` (half maps and FSC files beside it), the last ``parameters``
    file of every tilt series, the run ``log``, one summary dict per iteration (``iteration``, ``resolution_A`` at
    FSC 0.143, ``resolution_05_A``, ``shift_change_px``, ``angle_change_deg``, ``bundles``, ``skipped``,
    ``job_seconds`` = the bundle jobs' own run times, summed), the iteration at which the parameters ``converged``
    (or None) and ``timings`` (s) per stage."""

    project: Path
    map: Path
    parameters: list[Path]
    log: Path
    iterations: list[dict[str, Any]] = field(default_factory=list)
    converged: int | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def outputs(self) -> dict[str, Any]:
        """The seed-style summary: paths as strings under ``map``, ``half_maps``, ``fsc_table``, ``fsc_plot``,
        ``parameters``, ``log``, plus ``iterations``, ``converged`` and ``timings``."""
        stem = self.map.with_suffix("")
        return {"map": str(self.map), "half_maps": [f"{stem}_half1.mrc", f"{stem}_half2.mrc"],
                "fsc_table": f"{stem}_fsc.csv", "fsc_plot": f"{stem}_fsc.png",
                "parameters": [str(p) for p in self.parameters], "log": str(self.log),
                "iterations": self.iterations, "converged": self.converged, "timings": dict(self.timings)}


class _RunLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def __call__(self, message: str) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def _track_arrays(tracks: TrackSet) -> tuple[NDArray, ...]:
    """Every array of ``tracks``: picks, shifts, scores, occupancies, particles and the tilt table."""
    t, p, tilts = tracks, tracks.particles, tracks.tilts
    return (t.particle, t.tilt, t.shift_px, t.score, t.occupancy, p.id, p.xyz_px, p.euler_deg,
            *(getattr(tilts, a) for a in ("id", "angle_deg", "defocus_um", "axis_deg", "dose", "order")),
            np.asarray(t.image_shape_yx))


def _fingerprint(job_fields: Sequence[Any], reference_digest: str) -> str:
    h = hashlib.sha256(reference_digest.encode())
    for value in job_fields:
        h.update(value.tobytes() if isinstance(value, np.ndarray) else repr(value).encode())
    return h.hexdigest()


def _merge(previous: TrackSet, results: Sequence[Path]) -> TrackSet:
    """``previous`` with the refined columns of every bundle result."""
    keys = _pair_key(previous.particle, previous.tilt)
    shift, score, occ = previous.shift_px.copy(), previous.score.copy(), previous.occupancy.copy()
    euler = previous.particles.euler_deg.copy()
    for path in results:
        with np.load(path) as d:
            rows = np.searchsorted(keys, _pair_key(d["particle"], d["tilt"]))
            shift[rows], score[rows], occ[rows] = d["shift_px"], d["score"], d["occupancy"]
            euler[np.searchsorted(previous.particles.id, d["particle_id"])] = d["euler_deg"]
    particles = ParticleTable(previous.particles.id, previous.particles.xyz_px, euler)
    return previous.replace(shift_px=shift, score=score, occupancy=occ, particles=particles)


class _Executor:
    """Runs jobs in this process (``client`` None) or on a dask client; reports progress per job. ``release()``
    says no more jobs will come: a cluster started for the run closes then, while the last map is finished."""

    def __init__(self, client: Any, stage: refine._Stage, release: Callable[[], None]) -> None:
        self.client, self.stage, self.release = client, stage, release

    def run(self, function: Callable[[Any], Any], jobs: Sequence[BundleJob | InsertJob], label: str) -> list[Any]:
        """``function(job)`` of every job, in the jobs' order."""
        self.stage(label, 0, len(jobs))
        if self.client is None:
            out = []
            for i, job in enumerate(jobs):
                out.append(function(job))
                self.stage(label, i + 1, len(jobs))
            return out
        from distributed import as_completed

        token = os.urandom(4).hex()
        with warnings.catch_warnings():  # the jobs carry their particles' tracks by design (~0.1 MB per job)
            warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
            futures = self.client.map(function, jobs, pure=False,
                                      key=[f"cspt-{j.label.replace(' ', '-')}-{token}" for j in jobs])
        index = {f.key: i for i, f in enumerate(futures)}
        out: list[Any] = [None] * len(jobs)
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                out[index[future.key]] = future.result()
                self.stage(label, done, len(jobs))
        except BaseException:
            self.client.cancel(futures)
            raise
        return out

    def take_grids(self, key: str) -> list[tuple[InsertedGrids, list[str]]]:
        """Every process's grids of map ``key`` (:func:`take_inserted_grids`); the processes forget them."""
        found = [take_inserted_grids(key)]
        if self.client is not None:
            found += self.client.run(take_inserted_grids, key).values()
        return [f for f in found if f is not None]

    def run_into_map(self, function: Callable[[Any], Any], jobs: Sequence[BundleJob | InsertJob], label: str,
                     key: str) -> tuple[list[Any], list[tuple[InsertedGrids, list[str]]]]:
        """:meth:`run` jobs that insert into map ``key``, then take the grids; on an error the grids are dropped."""
        try:
            out = self.run(function, jobs, label)
        except BaseException:
            with contextlib.suppress(Exception):
                self.take_grids(key)
            raise
        return out, self.take_grids(key)


class _Background:
    """Work for the main process while it waits for the workers: the FSC plot of each map (nothing in the run reads
    it; matplotlib takes ~0.1 s a plot, ~1 s to import). Leaving the ``with`` block waits for it; its first error
    is raised then, unless the block itself raised."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cspt-plots")
        self.pending: list[Future[Any]] = []

    def submit(self, function: Callable[..., Any], *args: Any) -> None:
        self.pending.append(self.pool.submit(function, *args))

    def __enter__(self) -> _Background:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.pool.shutdown(wait=True)
        if exc_type is None:
            for future in self.pending:
                future.result()


def _finish_map(paths: ProjectPaths, iteration: int, settings: ReconstructionSettings,
                jobs: Sequence[BundleJob | InsertJob], grids: Sequence[tuple[InsertedGrids, list[str]]],
                tracks: Mapping[str, TrackSet], stage: refine._Stage, background: _Background
                ) -> ReconstructionResult:
    """The map of ``iteration`` (written to :meth:`ProjectPaths.map` with its half maps and FSC table; the FSC plot
    in the ``background``) from the processes' ``grids`` of the jobs' projections, plus the jobs that no grids hold
    (resumed bundles, or grids lost with their worker; a grid that holds a job twice or a job already taken is left
    out), inserted here from ``tracks`` (per tilt series)."""
    progress = lambda s, d, t: stage(f"iteration {iteration}: {s}", d, t)  # noqa: E731
    insertion = HalfMapInsertion(settings)
    try:
        taken: set[str] = set()
        for part, labels in grids:
            if len(set(labels)) == len(labels) and taken.isdisjoint(labels):
                insertion.add(part)
                taken.update(labels)
        for job in (j for j in jobs if j.label not in taken):
            series = tracks[job.name]
            sub = series.select(np.isin(series.particle, job.particle_ids))
            insertion.insert(open_stack(job.stack)[0], sub, job.share.halves(sub), progress=progress)
        result = insertion.finish(progress=progress)
    finally:
        insertion.close()
    result.write(paths.map(iteration), plot=False)
    background.submit(result.write_plot, paths.map(iteration))
    return result


def _initial_map(paths: ProjectPaths, series: Sequence[_Series], tracks: Mapping[str, TrackSet],
                 params: PypParameters, settings: ReconstructionSettings, executor: _Executor,
                 stage: refine._Stage, background: _Background) -> ReconstructionResult:
    """Iteration 1's map from the input ``tracks`` of every tilt series, by insertion-only jobs of
    ``slurm_bundle_size`` particles."""
    key = f"{paths.data_set}-01-{os.urandom(4).hex()}"
    jobs = []
    for s in series:
        t = tracks[s.name].sorted()
        share = _map_share(key, settings, t)
        rows_of = _particle_rows(t)
        for k, ids in enumerate(_bundles(np.unique(t.particle), params)):
            jobs.append(InsertJob(s.name, k, str(s.stack), t.select(rows_of(ids)), share.subset(ids)))
    _, grids = executor.run_into_map(run_insert, jobs, "iteration 1: reconstruct", key)
    return _finish_map(paths, 1, settings, jobs, grids, tracks, stage, background)


def _prepare(parameters: Mapping[str, Any], project_dir: str | os.PathLike[str] | None,
             first_iteration: int | None, last_iteration: int | None, tilt_unit: refine.TiltUnit
             ) -> tuple[PypParameters, ProjectPaths, int, int, list[str], list[_Series]]:
    """Parameters, paths, iteration range, tilt-series names and loaded series of a run, after every check."""
    params = _as_params(parameters)
    root = (Path.cwd() if project_dir is None else Path(project_dir)).resolve()
    names = tilt_series_names(root)
    paths = ProjectPaths(root, data_set_name(params["data_set"], root, names))
    first = params["refine_iter"] if first_iteration is None else int(first_iteration)
    last = params["refine_maxiter"] if last_iteration is None else int(last_iteration)
    while first > 2 and _unfinished(paths, names, first - 1):  # an interrupted run left it half-written: redo it
        first -= 1
    series = _check_project(paths, params, first, last, names, tilt_unit)
    return params, paths, first, last, names, series


def plan_cspt(
    parameters: Mapping[str, Any],
    *,
    project_dir: str | os.PathLike[str] | None = None,
    first_iteration: int | None = None,
    last_iteration: int | None = None,
    tilt_unit: refine.TiltUnit = "auto",
) -> str:
    """Check a project exactly as :func:`run_cspt` does before any work and describe what it would run (tilt series,
    particles, projections, iterations, bundles, cluster backend), without running anything."""
    params, paths, first, last, names, series = _prepare(parameters, project_dir, first_iteration, last_iteration,
                                                          tilt_unit)
    lines = [f"project {paths.root} (data set {paths.data_set}): iterations {first}..{last}"]
    for s in series:
        n_bundles = len(_bundles(np.unique(s.tracks.particle), params))
        lines.append(f"  {s.name}: {s.tracks.n_particles} particles, {s.tracks.n_tilts} tilts, {len(s.tracks)} "
                     f"projections -> {n_bundles} bundles of <= {params['slurm_bundle_size']} particles")
    lines.append(f"  cluster: {params['cluster_backend']}, workers {params['workers'] or 'auto'}; outputs "
                 f"{paths.map(first).name} .. {paths.map(last).name} in {paths.maps}")
    return "\n".join(lines)


def run_cspt(
    parameters: Mapping[str, Any],
    *,
    project_dir: str | os.PathLike[str] | None = None,
    first_iteration: int | None = None,
    last_iteration: int | None = None,
    client: Any = None,
    serial: bool = False,
    workers: int | None = None,
    gold_standard: bool = False,
    tilt_unit: refine.TiltUnit = "auto",
    stop_when_converged: bool = True,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> CsptRun:
    """Run the CSPT iterations of a project (module docstring) and return a :class:`CsptRun`.

    Parameters
    ----------
    parameters:
        The project's pyp parameters (a dict or :class:`PypParameters`; ``.pyp_config.toml``'s content).
    project_dir:
        The project folder; default the current folder (as the seed's scripts run).
    first_iteration, last_iteration:
        Default ``refine_iter`` and ``refine_maxiter``; starting later needs the previous iteration's files.
    client:
        A ``distributed.Client`` to run the bundles on; default: one from :func:`napari_cspt2d.cluster.make_client`
        (a ``LocalCluster`` unless the parameters say otherwise) with ``workers`` workers.
    serial:
        Run the bundles one after the other in this process (no dask).
    gold_standard:
        Refine each particle against its own half map instead of the full map.
    tilt_unit:
        Unit of ``csp_UseImagesForRefinementMin/Max``: "auto" (degrees when Min < 0, else acquisition index),
        "degrees" or "order" (:class:`refine.TiltSelection`).
    stop_when_converged:
        Stop before ``last_iteration`` when the parameters stopped changing (module docstring, step 5).
    progress, cancel:
        ``progress(stage, done, total)``; ``cancel()`` returning True stops the run with :class:`CsptCancelled`.

    Raises :class:`CsptInputError` (before any work) for bad inputs and :class:`CsptRunError` naming the failed
    bundles and the log of the first one when jobs fail; rerunning resumes (module docstring)."""
    t0, started = time.perf_counter(), time.time()
    params, paths, first, last, names, series = _prepare(parameters, project_dir, first_iteration, last_iteration,
                                                          tilt_unit)
    root, data_set = paths.root, paths.data_set
    stale = remove_stale_temp_files(root, started=started)
    settings = ReconstructionSettings(**reconstruction_options(params))
    stage = refine._Stage(progress, cancel)
    runlog = _RunLog(paths.run_log)
    timings: dict[str, float] = {}

    def timed(name: str, started: float) -> None:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - started

    timed("check", t0)
    runlog(f"CSPT of {data_set} in {root}: iterations {first}..{last}, tilt series {', '.join(names)}"
           + (f"; removed {len(stale)} temporary file(s) of interrupted writes" if stale else ""))
    picks = {s.name: s.tracks for s in series}
    current = {s.name: (s.tracks if first == 2 else _read_tracks(paths.parameters(s.name, first - 1),
                                                                  s.tracks.image_shape_yx, s.tracks.tilts))
               for s in series}
    run = CsptRun(root, paths.map(first - 1), [paths.parameters(s.name, first - 1) for s in series], paths.run_log,
                  timings=timings)
    imaging = refine.Imaging.from_params(params)
    n_jobs = sum(len(_bundles(np.unique(t.particle), params)) for t in current.values())
    t0 = time.perf_counter()
    with _Background() as background:
        with _client(client, serial, params, workers, n_jobs, root) as (dask_client, release):
            timed("cluster start", t0)
            executor = _Executor(dask_client, stage, release)
            if _initial_map_needed(paths, series, first):
                t0 = time.perf_counter()
                _write_record(_initial_map_source(paths), PENDING)
                rec = _initial_map(paths, series, current, params, settings, executor, stage, background)
                _write_record(_initial_map_source(paths), _digest(*(paths.parameters(s.name, 1) for s in series)))
                timed("reconstruct", t0)
                runlog(f"iteration 1: map {paths.map(1)} at {rec.resolution_A:.1f} Å (FSC 0.143) from "
                       f"{rec.stats['n_used']} projections")
            for it in range(first, last + 1):
                options = refine.RefineOptions.from_params(params, it, tilt_unit=tilt_unit)
                summary = _iteration(it, paths, series, picks, current, params, options, imaging, settings,
                                     executor, gold_standard, stage, timed, runlog, background,
                                     last=it == last, stop_when_converged=stop_when_converged)
                run.iterations.append(summary)
                run.map, run.parameters = paths.map(it), [paths.parameters(s.name, it) for s in series]
                if _converged(summary["shift_change_px"], summary["angle_change_deg"]):
                    run.converged = run.converged or it
                    runlog(f"iteration {it}: parameters stopped changing")
                    if stop_when_converged:
                        break
            t0 = time.perf_counter()
    timed("close", t0)  # the cluster stopped, the last FSC plot written
    return run


def _converged(shift_change_px: float, angle_change_deg: float) -> bool:
    """The parameters stopped changing (module docstring, step 5)."""
    return shift_change_px < CONVERGED_SHIFT_PX and angle_change_deg < CONVERGED_ANGLE_DEG


#: Content of a record or marker (module docstring, "Resuming") while the files it vouches for are being written.
PENDING = "pending"


def _write_record(path: Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _initial_map_source(paths: ProjectPaths) -> Path:
    return paths.scratch / f"{paths.data_set}_r01_01.inputs"


def _writing_marker(paths: ProjectPaths, iteration: int) -> Path:
    return paths.scratch / f"{paths.data_set}_r01_{iteration:02d}.writing"


def _unfinished(paths: ProjectPaths, names: Sequence[str], iteration: int) -> bool:
    """True when a run was interrupted while writing ``iteration``'s files (module docstring, "Resuming"); an
    iteration that never ran is not unfinished."""
    from ..io.cistem import read_pair

    pairs = [paths.parameters(n, iteration) for n in names]
    if _writing_marker(paths, iteration).is_file():
        return True
    if not any(p.is_file() for p in pairs):
        return False
    try:
        for pair in pairs:
            read_pair(pair)
    except CsptInputError:
        return True
    stem = paths.map(iteration).with_suffix("")
    return not all(m.is_file() for m in (paths.map(iteration), *(Path(f"{stem}_half{h}.mrc") for h in (1, 2))))


def _initial_map_needed(paths: ProjectPaths, series: Sequence[_Series], first: int) -> bool:
    """True when iteration 1's map must be (re)built: it is missing, or we built it from input parameters that have
    changed since (a map without our record of its inputs is the user's reference and is kept)."""
    if first > 2:
        return False
    if not paths.map(1).is_file():
        return True
    source = _initial_map_source(paths)
    return source.is_file() and source.read_text() != _digest(*(paths.parameters(s.name, 1) for s in series))


def _bundles(particle_ids: NDArray[np.int64], params: PypParameters) -> list[NDArray[np.int64]]:
    from ..cluster import bundle

    return [np.asarray(b, dtype=np.int64) for b in bundle(particle_ids.tolist(), int(params["slurm_bundle_size"]))]


#: dask settings for the workers this pipeline starts: no statistical profiler (it samples every worker thread each
#: 10 ms) and slower housekeeping ticks. On 2 cores the defaults made even *idle* workers slow the reconstruction
#: in the main process by 30-60 %.
QUIET_WORKERS = {"distributed.worker.profile.enabled": False, "distributed.admin.tick.interval": "500ms",
                 "distributed.worker.memory.monitor-interval": "1s"}


class _EarlyClose:
    """Closes a dask ``client`` and the cluster it runs on (both started for the run by ``context``): in a thread
    from :meth:`start` on, so the cluster stops while the main process finishes the last map; :meth:`finish` waits
    for that thread and then leaves ``context`` in this thread (its closes are then no-ops; the client's context
    variable can only be reset in the thread that set it)."""

    def __init__(self, context: contextlib.AbstractContextManager[Any], client: Any) -> None:
        self.context, self.client = context, client
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _close(self) -> None:
        try:
            self.client.close()
            if self.client.cluster is not None:
                self.client.cluster.close()
        except BaseException as exc:  # raised in the main thread by finish()
            self.error = exc

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._close, name="cspt-close-cluster", daemon=True)
            self.thread.start()

    def finish(self, exc_info: tuple[Any, Any, Any] = (None, None, None)) -> bool:
        """Wait for an early close and leave the context (with the exception of ``exc_info``, if any); True when the
        context handled that exception. Raises what closing raised when nothing else is being raised."""
        if self.thread is not None:
            self.thread.join()
        handled = bool(self.context.__exit__(*exc_info))
        if self.error is not None and exc_info[1] is None:
            raise self.error
        return handled


@contextlib.contextmanager
def _client(client: Any, serial: bool, params: PypParameters, workers: int | None, n_jobs: int,
            root: Path) -> Iterator[tuple[Any, Callable[[], None]]]:
    """``(client, release)``: the dask client to use (None: run in this process) and the function that closes a
    cluster started here early (:class:`_EarlyClose`); it is closed on exit at the latest."""
    if serial or client is not None:
        yield None if serial else client, lambda: None
        return
    import dask

    from ..cluster import make_client

    with dask.config.set(QUIET_WORKERS):
        context = make_client(params, workers=workers, tasks=max(1, n_jobs), project_dir=root, dashboard=False)
        started = context.__enter__()
        closer = _EarlyClose(context, started)
        try:
            yield started, closer.start
        except BaseException:
            if not closer.finish(sys.exc_info()):
                raise
        else:
            closer.finish()


def _iteration(it: int, paths: ProjectPaths, series: Sequence[_Series], picks: Mapping[str, TrackSet],
               current: dict[str, TrackSet], params: PypParameters, options: refine.RefineOptions,
               imaging: refine.Imaging, settings: ReconstructionSettings, executor: _Executor, gold_standard: bool,
               stage: refine._Stage, timed: Callable[[str, float], None], runlog: _RunLog,
               background: _Background, *, last: bool, stop_when_converged: bool) -> dict[str, Any]:
    """One iteration (module docstring, steps 1-5); updates ``current`` and returns the iteration's summary. When it
    is the run's last (``last``, or converged and ``stop_when_converged``) the executor is released after the
    merge."""
    from ..pyp import Parameters

    t0 = time.perf_counter()
    reference = paths.map(it - 1)
    references = (reference,) if not gold_standard else tuple(
        reference.with_name(f"{reference.stem}_half{h}.mrc") for h in (1, 2))
    ref_digest = _digest(*references)
    key = f"{paths.data_set}-{it:02d}-{os.urandom(4).hex()}"
    jobs: list[BundleJob] = []
    for s in series:
        tracks = current[s.name]
        pick_keys = _pair_key(picks[s.name].particle, picks[s.name].tilt)
        pick_pos = picks[s.name].positions_px()
        share = _map_share(key, settings, tracks)
        stat = os.stat(s.stack)
        stack_id = (str(s.stack), stat.st_size, stat.st_mtime_ns)
        pick_rows, rows_of = _particle_rows(picks[s.name]), _particle_rows(tracks)
        first_region = 0
        for k, ids in enumerate(_bundles(np.unique(tracks.particle), params)):
            own_tracks, rows = tracks.select(rows_of(ids)), pick_rows(ids)
            result, log = paths.bundle(s.name, it, k)
            own = share.subset(ids)
            half_args = (own.half_ids, own.half_of) if gold_standard else (None, None)
            fields = (options, imaging, [str(r) for r in references], pick_keys[rows], pick_pos[rows], *half_args,
                      *stack_id, *_track_arrays(own_tracks))
            jobs.append(BundleJob(s.name, it, k, own_tracks, str(paths.parameters(s.name, it - 1)), first_region,
                                  str(paths.scratch), params, str(s.stack), tuple(str(r) for r in references),
                                  ref_digest, options, imaging, pick_keys[rows], pick_pos[rows], gold_standard, own,
                                  fingerprint=_fingerprint(fields, ref_digest), result=str(result), log=str(log)))
            first_region += len(ids)
    timed("prepare", t0)

    t0 = time.perf_counter()
    outcomes, grids = executor.run_into_map(run_bundle, jobs, f"iteration {it}: refine", key)
    timed("refine", t0)
    failed = [o for o in outcomes if not o["ok"]]
    for o in outcomes:
        runlog(f"{o['label']}: {'skipped (finished before)' if o['skipped'] else 'ok' if o['ok'] else 'FAILED'}"
               f"{'' if o['ok'] else ' - ' + o['error']} ({o['log']})")
    if failed:
        raise CsptRunError(f"{len(failed)} of {len(jobs)} refinement job(s) of iteration {it} failed "
                           f"({'; '.join(o['label'] + ': ' + o['error'] for o in failed[:3])}); fix the cause and "
                           "run again to resume", log_path=failed[0]["log"])

    t0 = time.perf_counter()
    _write_record(_writing_marker(paths, it), PENDING)
    shift_change, angle_change = 0.0, 0.0
    for s in series:
        merged = _merge(current[s.name], [Path(j.result) for j in jobs if j.name == s.name])
        change = refine.parameter_change(current[s.name], merged)
        shift_change, angle_change = max(shift_change, change[0]), max(angle_change, change[1])
        written = Parameters.from_trackset(merged, params)
        written.write(paths.parameters(s.name, it))
        # the values as the file holds them (float32 columns), which is what a resumed run reads
        current[s.name] = written.to_trackset(merged.image_shape_yx, tilts=merged.tilts)
    if last or (stop_when_converged and _converged(shift_change, angle_change)):
        executor.release()
    timed("merge", t0)

    t0 = time.perf_counter()
    rec = _finish_map(paths, it, settings, jobs, grids, current, stage, background)
    _writing_marker(paths, it).unlink()
    timed("reconstruct", t0)
    summary = {"iteration": it, "resolution_A": rec.resolution_A, "resolution_05_A": rec.resolution_05_A,
               "refine_resolution_A": options.resolution_A, "shift_change_px": shift_change,
               "angle_change_deg": angle_change, "bundles": len(jobs),
               "skipped": sum(o["skipped"] for o in outcomes), "job_seconds": sum(o["seconds"] for o in outcomes),
               "projections": int(rec.stats["n_used"])}
    runlog(f"iteration {it}: map {paths.map(it)} at {rec.resolution_A:.1f} Å (FSC 0.143), "
           f"{rec.resolution_05_A:.1f} Å (0.5) from {summary['projections']} projections of {len(series)} tilt "
           f"series; shifts moved {shift_change:.3f} px RMS, orientations {angle_change:.3f}° median; "
           f"{summary['skipped']}/{len(jobs)} bundles resumed")
    return summary
