"""Bundle jobs: what one job of an iteration is, what it does on a worker, and how a rerun knows it is done.

An iteration bundles the particles of every tilt series, ``slurm_bundle_size`` per job (:func:`bundle_ids`). A
:class:`BundleJob` (:func:`run_bundle`, on a dask worker) writes its particles' split files
(:func:`napari_cspt2d.recon.project.split_regions`, numbered as in the whole split, so that a large project is not
split file by file in the main process), refines its particles against the map (:func:`refine.refine_tracks`)
and writes its result atomically to ``frealign/scratch/{name}_r01_{i:02d}_bundle{k:04d}.npz``, its log to ``log/``
(same stem, ``.log``), then inserts the refined projections into the half-map grids its process keeps for the
iteration's map (:class:`reconstruct.HalfMapInsertion`, one per process, not per job; :class:`MapShare`). An
:class:`InsertJob` (:func:`run_insert`) only inserts: the initial map's jobs. The main process collects every
process's grids with :func:`take_inserted_grids` and reads the results back with :func:`merge_results`.

Resuming
    A bundle result carries a fingerprint of everything it depends on (its parameter files, the reference map,
    the options, the picks, the tilt table, the stack's path, size and time); a rerun skips bundles whose result
    exists with the same fingerprint, so after a failure (reported with the failed bundle's log) running again only
    redoes what is missing.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..errors import CsptInputError
from ..io.atomic import atomic_open
from ..io.mrc import open_stack, read_image
from ..model.settings import Settings
from ..model.tracks import ParticleTable, TrackSet
from . import refine
from .project import ProjectPaths, Series, file_digest, particle_rows, split_regions
from .reconstruct import HalfMapInsertion, InsertedGrids, ReconstructionSettings, half_split

__all__ = [
    "MapShare", "BundleJob", "InsertJob", "bundle_ids", "map_share", "bundle_jobs", "insert_jobs", "run_bundle",
    "run_insert", "take_inserted_grids", "merge_results", "use_one_thread",
]


def bundle_ids(particle_ids: NDArray[np.int64], bundle_size: int) -> list[NDArray[np.int64]]:
    """``particle_ids`` in bundles of ``bundle_size`` (``slurm_bundle_size``, :func:`napari_cspt2d.cluster.bundle`)."""
    from ..cluster import bundle

    return [np.asarray(b, dtype=np.int64) for b in bundle(particle_ids.tolist(), bundle_size)]


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


def map_share(key: str, settings: ReconstructionSettings, tracks: TrackSet) -> MapShare:
    """The share of map ``key`` of a whole tilt series' ``tracks``, its halves split by :func:`half_split`."""
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
    (``split_dir``, ``settings``; regions numbered from ``first_region``), the tilt series' ``stack``, the reference
    map(s) (and a digest of their content), the particles' picks (``origin_keys`` = particle id × 2³² + tilt id,
    ``origin_px`` positions), whether to refine each particle against its half map (``gold_standard``) and the
    ``share`` of the iteration's map it inserts its refined projections into (unless ``insert`` is False: the
    constrained modes place the projections after all bundles are merged, :mod:`napari_cspt2d.recon.csp_run`).
    ``fingerprint`` identifies the inputs of the refinement; ``result``/``log`` are where the job writes."""

    name: str
    iteration: int
    index: int
    tracks: TrackSet
    source: str
    first_region: int
    split_dir: str
    settings: Settings
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
    insert: bool = True

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


def pair_key(particle: NDArray, tilt: NDArray) -> NDArray[np.int64]:
    return particle.astype(np.int64) * (1 << 32) + tilt.astype(np.int64)


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


def bundle_jobs(paths: ProjectPaths, iteration: int, series: Sequence[Series], picks: Mapping[str, TrackSet],
                current: Mapping[str, TrackSet], settings: Settings, options: refine.RefineOptions,
                imaging: refine.Imaging, map_settings: ReconstructionSettings, references: Sequence[Path], key: str,
                gold_standard: bool, insert: bool = True) -> list[BundleJob]:
    """The bundle jobs of ``iteration``: the ``current`` tracks of every tilt series (its parameters of iteration
    ``iteration − 1``) in bundles of ``slurm_bundle_size`` particles, refined against ``references`` (the map, or
    its two halves with ``gold_standard``) and inserted into the grids of map ``key``; ``picks`` are the input
    tracks (the origin of every projection); ``insert`` False: the jobs only refine."""
    ref_digest = file_digest(*references)
    jobs: list[BundleJob] = []
    for s in series:
        tracks = current[s.name]
        pick_keys = pair_key(picks[s.name].particle, picks[s.name].tilt)
        pick_pos = picks[s.name].positions_px()
        share = map_share(key, map_settings, tracks)
        stat = os.stat(s.stack)
        stack_id = (str(s.stack), stat.st_size, stat.st_mtime_ns)
        pick_rows, rows_of = particle_rows(picks[s.name]), particle_rows(tracks)
        first_region = 0
        for k, ids in enumerate(bundle_ids(np.unique(tracks.particle), settings.cluster.slurm_bundle_size)):
            own_tracks, rows = tracks.select(rows_of(ids)), pick_rows(ids)
            result, log = paths.bundle(s.name, iteration, k)
            own = share.subset(ids)
            half_args = (own.half_ids, own.half_of) if gold_standard else (None, None)
            fields = (options, imaging, [str(r) for r in references], pick_keys[rows], pick_pos[rows], *half_args,
                      *stack_id, *_track_arrays(own_tracks))
            jobs.append(BundleJob(s.name, iteration, k, own_tracks, str(paths.parameters(s.name, iteration - 1)),
                                  first_region, str(paths.scratch), settings, str(s.stack),
                                  tuple(str(r) for r in references), ref_digest, options, imaging, pick_keys[rows],
                                  pick_pos[rows], gold_standard, own, fingerprint=_fingerprint(fields, ref_digest),
                                  result=str(result), log=str(log), insert=insert))
            first_region += len(ids)
    return jobs


def insert_jobs(series: Sequence[Series], tracks: Mapping[str, TrackSet], bundle_size: int,
                map_settings: ReconstructionSettings, key: str) -> list[InsertJob]:
    """Insertion-only jobs of ``bundle_size`` particles of the ``tracks`` of every tilt series into the grids of map
    ``key`` (the initial map's jobs)."""
    jobs = []
    for s in series:
        t = tracks[s.name].sorted()
        share = map_share(key, map_settings, t)
        rows_of = particle_rows(t)
        for k, ids in enumerate(bundle_ids(np.unique(t.particle), bundle_size)):
            jobs.append(InsertJob(s.name, k, str(s.stack), t.select(rows_of(ids)), share.subset(ids)))
    return jobs

# ==================================================================================================== on a worker
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
        rows = np.searchsorted(job.origin_keys, pair_key(tracks.particle, tracks.tilt))
        if np.any(rows >= job.origin_keys.size) or np.any(job.origin_keys[np.minimum(rows, job.origin_keys.size - 1)]
                                                          != pair_key(tracks.particle, tracks.tilt)):
            raise CsptInputError("has projections that are not in the input parameters", file=job.source,
                                 field="PIND/IMIND", expected="the projections of the input tracks")
        split_regions(tracks, [[i] for i in tracks.particles.id], job.source, job.settings,
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
        if job.insert:
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


# ==================================================================================================== results
def merge_results(previous: TrackSet, results: Sequence[Path]) -> TrackSet:
    """``previous`` with the refined columns of every bundle result."""
    keys = pair_key(previous.particle, previous.tilt)
    shift, score, occ = previous.shift_px.copy(), previous.score.copy(), previous.occupancy.copy()
    euler = previous.particles.euler_deg.copy()
    for path in results:
        with np.load(path) as d:
            rows = np.searchsorted(keys, pair_key(d["particle"], d["tilt"]))
            shift[rows], score[rows], occ[rows] = d["shift_px"], d["score"], d["occupancy"]
            euler[np.searchsorted(previous.particles.id, d["particle_id"])] = d["euler_deg"]
    particles = ParticleTable(previous.particles.id, previous.particles.xyz_px, euler)
    return previous.replace(shift_px=shift, score=score, occupancy=occ, particles=particles)
