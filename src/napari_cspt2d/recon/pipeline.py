"""The CSPT run of a pyp project: iterations of refinement bundles on dask, merge, reconstruction.

:func:`run_cspt` is what ``pyp.csp_split`` (the seed's Option A) runs. It works in a project folder laid out as
:func:`napari_cspt2d.pyp.create_project` writes it (the current folder by default, like the seed's scripts; files
in :mod:`napari_cspt2d.recon.project`). The other rooms: :mod:`~napari_cspt2d.recon.jobs` (what a bundle job does,
its fingerprint and resume), :mod:`~napari_cspt2d.recon.executor` (in this process or on dask).

Iterations
    pyp's numbering: iteration 1 is the input (``frealign/maps/{name}_r01.cistem`` of every tilt series; its map
    ``{data_set}_r01_01.mrc`` is reconstructed first when missing, or rebuilt when the input parameters or the
    reconstruction settings — a changed box or binning — changed since it was built here; a map put there by the
    user is their initial reference and is kept), iterations
    ``refine_iter`` .. ``refine_maxiter`` refine against the previous iteration's map. Iteration ``i``:

    1. bundle the particles of every tilt series' parameters of iteration ``i − 1``, ``slurm_bundle_size``
       particles per job (:func:`jobs.bundle_jobs`, with :func:`arguments.refine_options` of iteration ``i``);
    2. run the jobs on dask (:func:`jobs.run_bundle`): each writes its particles' split files, refines them and
       inserts them into its process's half-map grids;
    3. merge the bundles into ``frealign/maps/{name}_r01_{i:02d}.cistem`` (+ ``_extended.cistem``) per tilt series;
    4. reconstruct the data set: collect every process's grids (:func:`jobs.take_inserted_grids`), add them, insert
       here what no process holds (bundles resumed from an earlier run, or lost with their worker) and finish the
       map (Wiener filter, FSC): ``frealign/maps/{data_set}_r01_{i:02d}.mrc`` with ``_half1.mrc``/``_half2.mrc``,
       ``_fsc.csv`` and ``_fsc.png`` beside it. The map equals :func:`reconstruct.reconstruct_tracks` of all the
       merged projections up to float rounding. Each series is split into gold-standard halves on its own
       (:func:`reconstruct.half_split` of its particles), so the half maps stay independent. The initial map is
       built the same way by insertion-only jobs (:func:`jobs.run_insert`);
    5. stop early when the parameters stopped changing: RMS shift change < :data:`CONVERGED_SHIFT_PX` and median
       orientation change < :data:`CONVERGED_ANGLE_DEG` against iteration ``i − 1``.

pyp's constrained modes (``csp_refine_micrographs``, ``csp_refine_particles``, ``csp_transreg``;
:mod:`~napari_cspt2d.recon.constrained`, hooks in :mod:`~napari_cspt2d.recon.csp_run`): the bundle jobs of step 2
only refine (they measure every projection); after the merge of step 3 the per-tilt geometry and the particles' 3D
points are solved from all bundles' measurements and the projections placed (the refined tilt angles and axes in
the tilts block, the per-tilt shifts as ``TSHIFT_X/Y``), and step 4 inserts the placed projections by insertion
jobs. Tracks without 3D points get them fitted from the tracks first (in free mode only the trustworthy ones, for
the CTF, with ``fitted_heights_ctf``).

Resuming
    Bundles whose result exists with the same fingerprint are skipped (:mod:`~napari_cspt2d.recon.jobs`); merge and
    reconstruction are redone (they are deterministic and cheap next to refinement). A run asked to start at
    iteration ``i`` starts earlier when iteration ``i − 1`` was left unfinished
    (:func:`project.unfinished`). Iteration 1's map is rebuilt when its record is pending. Each run first removes
    the temporary files that killed writes left (:func:`napari_cspt2d.io.atomic.remove_stale_temp_files`).

Serial runs call the same job functions in this process, one after the other.

All checks of the project (parameters, files, shapes, tilt selection, map sizes) run before any work starts. A
map of another size than the box (the box or binning changed) is rebuilt when it is iteration 1's map built here;
otherwise the check says how to go on (:func:`_map_size_error`).

One run per project: :func:`run_cspt` holds the project's lock (:mod:`napari_cspt2d.run_lock`) while it works.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CsptInputError, CsptRunError
from ..io.atomic import remove_stale_temp_files
from ..io.mrc import open_stack
from ..io.pyp_parameters import Parameters
from ..model.settings import Settings
from ..model.tracks import TrackSet
from ..run_lock import one_run_per_project
from . import arguments, csp_run, refine
from .constrained import CspState
from .executor import Background, Executor, run_client
from .jobs import BundleJob, InsertJob, bundle_ids, bundle_jobs, insert_jobs, merge_results, run_bundle, run_insert
from .project import (PENDING, ProjectPaths, Series, data_set_name, initial_map_inputs, initial_map_needed,
                      initial_map_record, load_series, read_tracks, tilt_series_names, unfinished, write_record,
                      writing_marker)
from .reconstruct import HalfMapInsertion, InsertedGrids, ReconstructionResult, ReconstructionSettings

__all__ = ["CONVERGED_SHIFT_PX", "CONVERGED_ANGLE_DEG", "CsptRun", "run_cspt", "plan_cspt"]

#: Convergence: RMS change of the projection positions (unbinned px) below this ...
CONVERGED_SHIFT_PX = 0.1
#: ... and median change of the particle orientations (°) below this.
CONVERGED_ANGLE_DEG = 0.25

Progress = Callable[[str, int, int], None]


def _check_project(paths: ProjectPaths, settings: Settings, first: int, last: int, names: Sequence[str],
                   tilt_unit: refine.TiltUnit) -> list[Series]:
    """Every check that can fail on the inputs, before any work (module docstring)."""
    from .extract import check_extraction

    settings.check_cspt_mode()
    if not names:
        raise CsptInputError("has no tilt series", file=paths.maps, field="frealign/maps",
                             expected="{name}_r01.cistem files with {name}_stack.mrc in the project folder")
    if not (settings.refinement.refine_iter <= first <= last):
        raise CsptInputError(f"is {first} with refine_iter {settings.refinement.refine_iter} and refine_maxiter "
                             f"{last}",
                             field="iteration", expected="refine_iter <= iteration <= refine_maxiter")
    extraction = settings.extraction
    check_extraction(settings.box_unbinned_px, extraction.extract_bin, extraction.particle_rad, settings.stack_pixel_A)
    options = [arguments.refine_options(settings, it, tilt_unit=tilt_unit) for it in range(first, last + 1)]
    series = [load_series(paths, name, settings) for name in names]
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
    if previous.is_file() and not initial_map_needed(paths, series, first, _initial_map_key(settings)):
        data, _ = open_stack(previous)
        if data.shape != (extraction.extract_box,) * 3:
            raise _map_size_error(previous, data.shape, settings, first)
    return series


def _map_size_error(path: Path, shape: tuple[int, ...], settings: Settings, first: int) -> CsptInputError:
    """The map ``path`` that iteration ``first`` refines against has another size than the box: say how to go on."""
    size = "x".join(map(str, shape))
    box = settings.extraction.extract_box
    now = f"extract_box = {box} (extract_bin = {settings.extraction.extract_bin}) needs a {box}³ map"
    if first > 2:
        how = (f"the box or binning changed after iteration {first - 1}: start again from iteration 2 (cspt2d run "
               "PROJECT --iteration 2, or csp_split(parameters, iteration=2)), which rebuilds iteration 1's map at "
               "the new size, or set the box and binning back")
    else:
        how = ("it was not built here, so it is taken as your initial reference: resample it to the new size, or "
               "delete it to have iteration 1's map rebuilt from the input parameters")
    return CsptInputError(f"is a {size} map, but {now}; {how}", file=path, field="extract_box/extract_bin")


def _prepare(parameters: Settings | Mapping[str, Any], project_dir: str | os.PathLike[str] | None,
             first_iteration: int | None, last_iteration: int | None, tilt_unit: refine.TiltUnit
             ) -> tuple[Settings, ProjectPaths, int, int, list[str], list[Series]]:
    """Settings, paths, iteration range, tilt-series names and loaded series of a run, after every check."""
    settings = Settings.parse(parameters)
    root = (Path.cwd() if project_dir is None else Path(project_dir)).resolve()
    names = tilt_series_names(root)
    paths = ProjectPaths(root, data_set_name(settings.data.data_set, root, names))
    first = settings.refinement.refine_iter if first_iteration is None else int(first_iteration)
    last = settings.refinement.refine_maxiter if last_iteration is None else int(last_iteration)
    while first > 2 and unfinished(paths, names, first - 1):  # an interrupted run left it half-written: redo it
        first -= 1
    series = _check_project(paths, settings, first, last, names, tilt_unit)
    return settings, paths, first, last, names, series


def plan_cspt(
    parameters: Settings | Mapping[str, Any],
    *,
    project_dir: str | os.PathLike[str] | None = None,
    first_iteration: int | None = None,
    last_iteration: int | None = None,
    tilt_unit: refine.TiltUnit = "auto",
) -> str:
    """Check a project exactly as :func:`run_cspt` does before any work and describe what it would run (tilt series,
    particles, projections, iterations, bundles, cluster backend), without running anything."""
    settings, paths, first, last, names, series = _prepare(parameters, project_dir, first_iteration,
                                                            last_iteration, tilt_unit)
    lines = [f"project {paths.root} (data set {paths.data_set}): iterations {first}..{last}"]
    if initial_map_needed(paths, series, first, _initial_map_key(settings)):
        why = "missing" if not paths.map(1).is_file() else "its input parameters, box or binning changed"
        lines.append(f"  iteration 1: {paths.map(1).name} is built first ({why})")
    cluster = settings.cluster
    for s in series:
        n_bundles = len(bundle_ids(np.unique(s.tracks.particle), cluster.slurm_bundle_size))
        lines.append(f"  {s.name}: {s.tracks.n_particles} particles, {s.tracks.n_tilts} tilts, {len(s.tracks)} "
                     f"projections -> {n_bundles} bundles of <= {cluster.slurm_bundle_size} particles")
    lines.append(f"  cluster: {cluster.cluster_backend}, workers {cluster.workers or 'auto'}; outputs "
                 f"{paths.map(first).name} .. {paths.map(last).name} in {paths.maps}")
    return "\n".join(lines)


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


@one_run_per_project("CSPT refinement")
def run_cspt(
    parameters: Settings | Mapping[str, Any],
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
    draw_plot: Callable[..., None] | None = None,
) -> CsptRun:
    """Run the CSPT iterations of a project (module docstring) and return a :class:`CsptRun`.

    Parameters
    ----------
    parameters:
        The project's :class:`Settings` (or a dict or :class:`PypParameters`, parsed once by :meth:`Settings.parse`).
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
    draw_plot:
        Draws each map's FSC PNG, ``draw_plot(path, curve, title=...)``; default
        :func:`~napari_cspt2d.recon.fsc.plot_fsc` in this process (the cockpit passes
        :func:`napari_cspt2d.fsc_plot.plot_fsc_apart`: matplotlib holds the GIL while it draws).

    Raises :class:`CsptInputError` (before any work) for bad inputs — :class:`~napari_cspt2d.run_lock.ProjectBusyError`
    when another run works on the project — and :class:`CsptRunError` naming the failed bundles and the log of the
    first one when jobs fail; rerunning resumes (module docstring)."""
    t0, started = time.perf_counter(), time.time()
    settings, paths, first, last, names, series = _prepare(parameters, project_dir, first_iteration,
                                                            last_iteration, tilt_unit)
    root, data_set = paths.root, paths.data_set
    stale = remove_stale_temp_files(root, started=started)
    map_settings = arguments.reconstruction_settings(settings)
    stage = refine._Stage(progress, cancel)
    runlog = _RunLog(paths.run_log)
    timings: dict[str, float] = {}

    def timed(name: str, started: float) -> None:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - started

    timed("check", t0)
    runlog(f"CSPT of {data_set} in {root}: iterations {first}..{last}, tilt series {', '.join(names)}"
           + (f"; removed {len(stale)} temporary file(s) of interrupted writes" if stale else ""))
    picks = {s.name: s.tracks for s in series}
    current = {s.name: (s.tracks if first == 2 else read_tracks(paths.parameters(s.name, first - 1),
                                                                 s.tracks.image_shape_yx, s.tracks.tilts, settings))
               for s in series}
    states = csp_run.prepare(picks, current, settings,
                             {} if first == 2 else {s.name: paths.parameters(s.name, first - 1) for s in series})
    run = CsptRun(root, paths.map(first - 1), [paths.parameters(s.name, first - 1) for s in series], paths.run_log,
                  timings=timings)
    imaging = arguments.imaging(settings)
    bundle_size = settings.cluster.slurm_bundle_size
    n_jobs = sum(len(bundle_ids(np.unique(t.particle), bundle_size)) for t in current.values())
    t0 = time.perf_counter()
    with Background() as background:
        with run_client(client, serial, settings, workers, n_jobs, root) as (dask_client, release):
            timed("cluster start", t0)
            executor = Executor(dask_client, stage, release)
            if initial_map_needed(paths, series, first, _initial_map_key(settings)):
                t0 = time.perf_counter()
                write_record(initial_map_record(paths), PENDING)
                rec = _initial_map(paths, series, current, settings, map_settings, executor, stage, background,
                                   draw_plot)
                write_record(initial_map_record(paths), initial_map_inputs(paths, series, _initial_map_key(settings)))
                timed("reconstruct", t0)
                runlog(f"iteration 1: map {paths.map(1)} at {rec.resolution_A:.1f} Å (FSC 0.143) from "
                       f"{rec.stats['n_used']} projections")
            for it in range(first, last + 1):
                options = arguments.refine_options(settings, it, tilt_unit=tilt_unit)
                summary = _iteration(it, paths, series, picks, current, states, settings, options, imaging,
                                     map_settings, executor, gold_standard, stage, timed, runlog, background,
                                     last=it == last, stop_when_converged=stop_when_converged, draw_plot=draw_plot)
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


def _initial_map_key(settings: Settings) -> tuple[Any, ...]:
    """What iteration 1's map depends on besides its input files: the reconstruction settings and the 3D points the
    run fits into the input tracks (:func:`csp_run.fitted_points`), whose heights set each projection's CTF."""
    return arguments.reconstruction_settings(settings), csp_run.fitted_points(settings)


def _converged(shift_change_px: float, angle_change_deg: float) -> bool:
    """The parameters stopped changing (module docstring, step 5)."""
    return shift_change_px < CONVERGED_SHIFT_PX and angle_change_deg < CONVERGED_ANGLE_DEG


def _iteration(it: int, paths: ProjectPaths, series: Sequence[Series], picks: Mapping[str, TrackSet],
               current: dict[str, TrackSet], states: dict[str, CspState], settings: Settings,
               options: refine.RefineOptions, imaging: refine.Imaging, map_settings: ReconstructionSettings,
               executor: Executor, gold_standard: bool,
               stage: refine._Stage, timed: Callable[[str, float], None], runlog: _RunLog,
               background: Background, *, last: bool, stop_when_converged: bool,
               draw_plot: Callable[..., None] | None = None) -> dict[str, Any]:
    """One iteration (module docstring, steps 1-5); updates ``current`` (and the constrained ``states``, see
    :mod:`~napari_cspt2d.recon.csp_run`) and returns the iteration's summary. When it is the run's last (``last``,
    or converged and ``stop_when_converged``) the executor is released after the merge (constrained: after the
    map's insertion jobs)."""
    t0 = time.perf_counter()
    reference = paths.map(it - 1)
    references = (reference,) if not gold_standard else tuple(
        reference.with_name(f"{reference.stem}_half{h}.mrc") for h in (1, 2))
    key = f"{paths.data_set}-{it:02d}-{os.urandom(4).hex()}"
    jobs = bundle_jobs(paths, it, series, picks, current, settings, options, imaging, map_settings, references, key,
                       gold_standard, insert=not states)
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
    write_record(writing_marker(paths, it), PENDING)
    shift_change, angle_change = 0.0, 0.0
    for s in series:
        merged = merge_results(current[s.name], [Path(j.result) for j in jobs if j.name == s.name])
        if s.name in states:
            merged, states[s.name] = csp_run.place(merged, states[s.name], picks[s.name], options, settings)
        change = refine.parameter_change(current[s.name], merged)
        shift_change, angle_change = max(shift_change, change[0]), max(angle_change, change[1])
        written = Parameters.from_trackset(merged, settings, tilt_shift_px=csp_run.tilt_shifts(states, s.name))
        written.write(paths.parameters(s.name, it))
        # the values as the file holds them (float32 columns, its tilt geometry), which is what a resumed run reads
        current[s.name] = written.to_trackset(merged.image_shape_yx, tilts=s.tracks.tilts)
    finishing = last or (stop_when_converged and _converged(shift_change, angle_change))
    if finishing and not states:
        executor.release()
    timed("merge", t0)

    t0 = time.perf_counter()
    map_jobs: Sequence[BundleJob | InsertJob] = jobs
    if states:  # constrained: the map from the placed projections
        key = f"{paths.data_set}-{it:02d}-{os.urandom(4).hex()}"
        map_jobs = insert_jobs(series, current, settings.cluster.slurm_bundle_size, map_settings, key)
        _, grids = executor.run_into_map(run_insert, map_jobs, f"iteration {it}: reconstruct", key)
        if finishing:
            executor.release()
    rec = _finish_map(paths, it, map_settings, map_jobs, grids, current, stage, background, draw_plot)
    writing_marker(paths, it).unlink()
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


def _finish_map(paths: ProjectPaths, iteration: int, settings: ReconstructionSettings,
                jobs: Sequence[BundleJob | InsertJob], grids: Sequence[tuple[InsertedGrids, list[str]]],
                tracks: Mapping[str, TrackSet], stage: refine._Stage, background: Background,
                draw_plot: Callable[..., None] | None = None) -> ReconstructionResult:
    """The map of ``iteration`` (written to :meth:`ProjectPaths.map` with its half maps and FSC table; the FSC plot
    in the ``background``, drawn by ``draw_plot``) from the processes' ``grids`` of the jobs' projections, plus the
    jobs that no grids hold (resumed bundles, or grids lost with their worker; a grid that holds a job twice or a job
    already taken is left out), inserted here from ``tracks`` (per tilt series)."""
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
        result = insertion.finish(progress=progress, cancel=stage.cancel)
    finally:
        insertion.close()
    result.write(paths.map(iteration), plot=False)
    background.submit(result.write_plot, paths.map(iteration), draw_plot)
    return result


def _initial_map(paths: ProjectPaths, series: Sequence[Series], tracks: Mapping[str, TrackSet],
                 settings: Settings, map_settings: ReconstructionSettings, executor: Executor,
                 stage: refine._Stage, background: Background, draw_plot: Callable[..., None] | None = None
                 ) -> ReconstructionResult:
    """Iteration 1's map from the input ``tracks`` of every tilt series, by insertion-only jobs of
    ``slurm_bundle_size`` particles."""
    key = f"{paths.data_set}-01-{os.urandom(4).hex()}"
    jobs = insert_jobs(series, tracks, settings.cluster.slurm_bundle_size, map_settings, key)
    _, grids = executor.run_into_map(run_insert, jobs, "iteration 1: reconstruct", key)
    return _finish_map(paths, 1, map_settings, jobs, grids, tracks, stage, background, draw_plot)
