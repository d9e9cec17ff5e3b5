"""The CSPT pipeline of a pyp project: per-particle refinement bundles on dask, merge, reconstruction, iterations.

:func:`run_cspt` is what ``pyp.csp_split`` (the seed's Option A) runs. It works in a project folder laid out as
:func:`napari_cspt2d.pyp.create_project` writes it (the current folder by default, like the seed's scripts).

Iterations
    pyp's numbering: iteration 1 is the input (``frealign/maps/{name}_r01.cistem`` of every tilt series; its map
    ``{data_set}_r01_01.mrc`` is reconstructed first when missing), iterations ``refine_iter`` ..
    ``refine_maxiter`` refine against the previous iteration's map. Iteration ``i``:

    1. split every tilt series' parameters of iteration ``i − 1`` per particle (:func:`split_per_particle`, the
       ``csp_no_3d_points`` route of ``prepare_particle_cspt``) into ``frealign/scratch/{stem}_region{k:04d}.cistem``;
    2. bundle ``slurm_bundle_size`` particles per job and run the jobs on dask (:func:`run_bundle`): each reads its
       particles, refines them against the map (:func:`refine.refine_tracks` with
       :meth:`RefineOptions.from_params` of iteration ``i``) and writes its result atomically to
       ``frealign/scratch/{name}_r01_{i:02d}_bundle{k:04d}.npz``, its log to ``log/`` (same stem, ``.log``);
    3. merge the bundles into ``frealign/maps/{name}_r01_{i:02d}.cistem`` (+ ``_extended.cistem``) per tilt series;
    4. reconstruct the data set (:func:`reconstruct.reconstruct_tracks`): ``frealign/maps/{data_set}_r01_{i:02d}.mrc``
       with ``_half1.mrc``/``_half2.mrc``, ``_fsc.csv`` and ``_fsc.png`` beside it;
    5. stop early when the parameters stopped changing: RMS shift change < :data:`CONVERGED_SHIFT_PX` and median
       orientation change < :data:`CONVERGED_ANGLE_DEG` against iteration ``i − 1``.

Resuming
    A bundle result carries a fingerprint of everything it depends on (its parameter files, the reference map,
    the options); a rerun skips bundles whose result exists with the same fingerprint, so after a failure (reported
    with the failed bundle's log) running again only redoes what is missing. Merge and reconstruction are redone
    (they are deterministic and cheap next to refinement).

All checks of the project (parameters, files, shapes, tilt selection, map sizes) run before any work starts.
"""

from __future__ import annotations

import hashlib
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..errors import CsptCancelled, CsptInputError, CsptRunError
from ..io.atomic import atomic_open, atomic_path
from ..io.mrc import open_stack, read_image
from ..model.params import PypParameters, check_cspt_mode, check_name
from ..model.tracks import ParticleTable, TiltTable, TrackSet
from . import refine

__all__ = [
    "CONVERGED_SHIFT_PX",
    "CONVERGED_ANGLE_DEG",
    "ProjectPaths",
    "BundleJob",
    "CsptRun",
    "tilt_series_names",
    "split_per_particle",
    "run_bundle",
    "run_cspt",
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
    """A parameter file of a tilt series (an iteration's or a region's) as a TrackSet with the series' tilt table."""
    from ..pyp import Parameters

    return Parameters.from_file(path).to_trackset(image_shape_yx, tilts=tilts)


def _write_tracks(path: Path, tracks: TrackSet, params: PypParameters) -> Path:
    from ..pyp import Parameters

    return Parameters.from_trackset(tracks, params).write(path)[0]


def reconstruction_options(params: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`reconstruct.reconstruct_tracks` for a project's parameters (stack pixel, box in
    tilt-stack px, binning, particle radius, optics, tilt range, dose weighting)."""
    p = _as_params(params)
    return dict(pixel_A=p.stack_pixel_A, extract_box=p.box_unbinned_px, extract_bin=p["extract_bin"],
                particle_rad_A=p["particle_rad"], voltage_kV=p["scope_voltage"], cs_mm=p["scope_cs"],
                amp_contrast=p["scope_wgh"], min_tilt_deg=p["reconstruct_mintilt"],
                max_tilt_deg=p["reconstruct_maxtilt"], dose_weighting=p["reconstruct_dose_weighting_enable"])


def _check_project(paths: ProjectPaths, params: PypParameters, first: int, last: int, names: Sequence[str]
                   ) -> list[_Series]:
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
    options = [refine.RefineOptions.from_params(params, it) for it in range(first, last + 1)]
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
def _particle_slices(tracks: TrackSet) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """``(ids, bounds)``: the ids of the particles that have projections and the row bounds of each in the
    (particle, tilt)-sorted TrackSet (``rows of ids[k]`` = ``bounds[k]:bounds[k + 1]``)."""
    ids, first = np.unique(tracks.particle, return_index=True)
    return ids, np.append(first, len(tracks))


def split_per_particle(tracks: TrackSet, parameter_file: str | os.PathLike[str], params: Mapping[str, Any],
                       out_dir: str | os.PathLike[str]) -> list[tuple[Path, NDArray[np.int64], NDArray[np.int64]]]:
    """Write one parameter file per particle, ``{out_dir}/{stem}_region{k:04d}.cistem`` (+ ``_extended``), where
    ``stem`` is ``parameter_file``'s; returns pyp's ``split_parx_list``: ``(path, [pind], tilt ids)`` per region,
    in particle-id order."""
    params = _as_params(params)
    tracks = tracks.sorted()
    stem = Path(parameter_file).stem
    ids, bounds = _particle_slices(tracks)
    out = []
    for k, pid in enumerate(ids):
        sub = tracks.select(np.arange(bounds[k], bounds[k + 1]))
        path = _write_tracks(Path(out_dir) / f"{stem}_region{k:04d}.cistem", sub, params)
        out.append((path, np.array([pid], np.int64), np.unique(sub.tilt)))
    return out


# ==================================================================================================== bundle jobs
@dataclass(frozen=True, eq=False)
class BundleJob:
    """Everything one bundle job needs (picklable, no open files): the ``regions`` parameter files of its particles,
    the tilt series' ``stack``, ``tilts`` and ``image_shape_yx``, the reference map(s), the particles' picks
    (``origin_keys`` = particle id × 2³² + tilt id, ``origin_px`` positions) and, for gold standard, the half of
    each particle (``half_ids``/``half_of``). ``fingerprint`` identifies the inputs; ``result``/``log`` are where
    the job writes."""

    name: str
    iteration: int
    index: int
    regions: tuple[str, ...]
    stack: str
    image_shape_yx: tuple[int, int]
    tilts: TiltTable
    references: tuple[str, ...]
    options: refine.RefineOptions
    imaging: refine.Imaging
    origin_keys: NDArray[np.int64]
    origin_px: NDArray[np.float64]
    half_ids: NDArray[np.int64] | None
    half_of: NDArray[np.int64] | None
    fingerprint: str
    result: str
    log: str

    @property
    def label(self) -> str:
        return f"{self.name} iteration {self.iteration} bundle {self.index}"


def _pair_key(particle: NDArray, tilt: NDArray) -> NDArray[np.int64]:
    return particle.astype(np.int64) * (1 << 32) + tilt.astype(np.int64)


def _combine(parts: Sequence[TrackSet]) -> TrackSet:
    """One TrackSet from TrackSets of the same tilt series with disjoint particles."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    cat = lambda attr: np.concatenate([getattr(p, attr) for p in parts])  # noqa: E731
    pcat = lambda attr: np.concatenate([getattr(p.particles, attr) for p in parts])  # noqa: E731
    order = np.argsort(pcat("id"), kind="stable")
    particles = ParticleTable(pcat("id")[order], pcat("xyz_px")[order], pcat("euler_deg")[order])
    return TrackSet(cat("particle"), cat("tilt"), cat("shift_px"), cat("score"), cat("occupancy"), particles,
                    first.tilts, first.image_shape_yx).sorted()


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


def run_bundle(job: BundleJob) -> dict[str, Any]:
    """Refine the particles of one bundle (runs on a dask worker). Returns ``{"label", "ok", "skipped", "seconds",
    "error", "log"}``; never raises for a failure of the work itself (the error and traceback go to the log)."""
    started = time.perf_counter()
    result, log_path = Path(job.result), Path(job.log)
    summary = {"label": job.label, "ok": True, "skipped": False, "seconds": 0.0, "error": "", "log": str(log_path)}
    if _finished(result, job.fingerprint):
        summary["skipped"] = True
        return summary
    log = _JobLog(log_path)
    try:
        log(f"{job.label}: {len(job.regions)} particle(s), reference {', '.join(job.references)}")
        from .backproject import Projector

        tracks = _combine([_read_tracks(Path(r), job.image_shape_yx, job.tilts) for r in job.regions])
        stack, _ = open_stack(job.stack)
        refs = [Projector(read_image(r)) for r in job.references]
        rows = np.searchsorted(job.origin_keys, _pair_key(tracks.particle, tracks.tilt))
        if np.any(rows >= job.origin_keys.size) or np.any(job.origin_keys[np.minimum(rows, job.origin_keys.size - 1)]
                                                          != _pair_key(tracks.particle, tracks.tilt)):
            raise CsptInputError("has projections that are not in the input parameters", file=job.regions[0],
                                 field="PIND/IMIND", expected="the projections of the input tracks")
        half = None
        if job.half_ids is not None:
            half = job.half_of[np.searchsorted(job.half_ids, tracks.particle)]
        out = refine.refine_tracks(stack, tracks, refs if len(refs) > 1 else refs[0], job.options, job.imaging,
                                   half=half, origin_px=job.origin_px[rows], progress=log.progress)
        t = out.tracks
        with atomic_open(result, "wb") as fh:
            np.savez(fh, particle=t.particle, tilt=t.tilt, shift_px=t.shift_px, score=t.score,
                     occupancy=t.occupancy, particle_id=t.particles.id, euler_deg=t.particles.euler_deg,
                     particle_score=out.particle_score, fingerprint=np.array(job.fingerprint))
        summary["seconds"] = time.perf_counter() - started
        log(f"done in {summary['seconds']:.1f} s; median score {np.median(t.score):.3f}, "
            f"{int((t.occupancy == 0).sum())} projection(s) below the cutoff")
    except Exception as exc:  # reported to the caller with the log path; the run can be resumed
        log(f"FAILED: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        summary.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    finally:
        log.close()
    return summary

