"""A run as the cockpit starts it, with no Qt: the :class:`Session` snapshot, :func:`run_job` (reconstruct, then the
project's CSPT iterations one at a time) and the live preview's job.

A run works on a :class:`Session` taken when the button is pressed: the tracks are the curation document's immutable
TrackSet at that moment, so the user can keep editing while it runs (the edits are not part of the run). Progress
arrives as ``(stage, done, total)`` from the core; cancel is a callable the core checks between batches of particles
(:data:`BATCH_SIZE` boxes when reconstructing, one bundle of ``slurm_bundle_size`` particles when refining) and the run
ends with :class:`CsptCancelled`; files are only written when a map or an iteration is complete (atomically), so what
earlier iterations wrote stays intact.

*Reconstruct* calls :func:`reconstruct_tracks` directly and needs no project. *Refine* runs the project's CSPT
iterations with the same pipeline as the command line (:func:`napari_cspt2d.recon.pipeline.run_cspt`, one iteration
per call so that each map and FSC shows up as it is made; in this process for ``cluster_backend = "local"``, on the
dask cluster of the parameters otherwise). With a project folder the curated tracks and the parameters become the
project's input first (``frealign/maps/{name}_r01.cistem``, ``.pyp_config.toml``) and the outputs follow pyp's names:
``frealign/maps/{data_set}_r01_01.mrc`` for the map of the curated tracks, ``{data_set}_r01_{kk}.mrc`` and
``{name}_r01_{kk}.cistem`` for iteration ``kk``, half maps and FSC table/plot beside each map.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from . import pyp
from .errors import CsptInputError, CsptRunError
from .fsc_plot import FSC_THRESHOLD, plot_fsc_apart, start_plot_process
from .io.atomic import remove_stale_temp_files
from .io.mrc import read_image
from .io.toml import CONFIG_NAME, save_params
from .model.editing import TrackDocument
from .model.params import PypParameters
from .model.settings import Settings
from .model.tracks import TrackSet
from .recon.fsc import fsc_curve
from .recon.arguments import reconstruction_options
from .recon.pipeline import run_cspt
from .recon.project import ProjectPaths, data_set_name, tilt_series_names
from .recon.reconstruct import ReconstructionResult, reconstruct_tracks
from .recon.trackfit import fit_tracks
from .run_lock import project_lock

__all__ = [
    "BATCH_SIZE",
    "FSC_THRESHOLD",
    "IterationResult",
    "MapDisplay",
    "PreparedIteration",
    "RunMode",
    "Session",
    "iso_level",
    "log_folder",
    "map_display",
    "no_project_error",
    "prepare_iteration",
    "preview_bin",
    "preview_reconstruction",
    "run_job",
]

RunMode = Literal["reconstruct", "refine"]
ProgressFn = Callable[[str, int, int], None]

#: Projections per extraction/insertion batch: small enough that Cancel is noticed within about a second.
BATCH_SIZE = 128


@dataclass(frozen=True, eq=False)
class Session:
    """What a run needs, taken at one moment: the unbinned tilt ``stack`` (n, ny, nx; a memory map when it came from a
    file), its ``stack_path`` (None for an in-memory stack), ``tilts`` (the tilt table of the stack, or None), the
    curation ``document`` and a snapshot of its ``tracks`` (immutable), validated ``params``, the ``project_dir``
    (None: results stay in the viewer) and the tilt-series ``series_name``."""

    stack: Any
    stack_path: Path | None
    tilts: Any
    document: TrackDocument
    tracks: Any
    params: PypParameters
    project_dir: Path | None
    series_name: str

    @property
    def name(self) -> str:
        """Project / data set name used in output file names."""
        return self.params["data_set"] or self.series_name


@dataclass(frozen=True, eq=False)
class IterationResult:
    """One completed step of a run: ``iteration`` (1 = map of the curated tracks, 2... = refinement iterations), the
    ``tracks`` the map was made from (refined ones from iteration 2 on, rows in the order of the run's snapshot),
    the ``reconstruction``, for refinement iterations the pipeline's ``summary`` and ``residual_px`` (N,) of each
    refined projection from its particle's fitted 3D track, and the files ``written``."""

    iteration: int
    tracks: TrackSet
    reconstruction: ReconstructionResult
    summary: dict[str, Any] | None = None
    residual_px: NDArray[np.float64] | None = None
    written: list[Path] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "curated tracks" if self.iteration == 1 else f"iteration {self.iteration}"

    @property
    def refined(self) -> bool:
        return self.summary is not None


def _residuals(tracks: TrackSet) -> NDArray[np.float64]:
    """Distance (px) of each projection from its particle's fitted 3D track."""
    fit = fit_tracks(tracks)
    return np.hypot(fit.residual_px[:, 0], fit.residual_px[:, 1])


def _same_rows(tracks: TrackSet, like: TrackSet, source: Path) -> TrackSet:
    """``tracks`` with its rows in the order of ``like``'s (the same projections, matched by particle and tilt)."""
    span = int(max(tracks.tilt.max(initial=0), like.tilt.max(initial=0))) + 1
    keys, wanted = tracks.particle * span + tracks.tilt, like.particle * span + like.tilt
    order = np.argsort(keys, kind="stable")
    pos = np.clip(np.searchsorted(keys, wanted, sorter=order), 0, max(len(tracks) - 1, 0))
    if len(tracks) != len(like) or not np.array_equal(keys[order[pos]], wanted):
        raise CsptRunError(f"{source} does not hold the projections that were refined", log_path=None)
    rows = order[pos]
    return tracks.replace(particle=tracks.particle[rows], tilt=tracks.tilt[rows], shift_px=tracks.shift_px[rows],
                          score=tracks.score[rows], occupancy=tracks.occupancy[rows])


def _read_iteration(run: Any, like: TrackSet, params: PypParameters) -> tuple[TrackSet, ReconstructionResult]:
    """The refined tracks and the map of the iteration :func:`run_cspt` just finished (read from its files)."""
    tracks = pyp.Parameters.from_file(run.parameters[0]).to_trackset(like.image_shape_yx, tilts=like.tilts,
                                                                     parameters=params)
    stem = run.map.with_suffix("")
    volume, half1, half2 = (read_image(p) for p in (run.map, f"{stem}_half1.mrc", f"{stem}_half2.mrc"))
    voxel = params.particle_pixel_A
    curve = fsc_curve(half1, half2, voxel)
    summary = run.iterations[-1]
    rec = ReconstructionResult(volume, half1, half2, curve, summary["resolution_A"], summary["resolution_05_A"],
                               voxel, dict(summary))
    return _same_rows(tracks, like, Path(run.parameters[0])), rec


def no_project_error() -> CsptInputError:
    return CsptInputError("no project folder", field="project", expected="a project folder for refinement "
                          "(Parameters widget: choose a folder, then Create project or Open project)")


def run_job(s: Session, mode: RunMode, progress: ProgressFn, cancel: Callable[[], bool]
            ) -> Iterator[IterationResult]:
    """Reconstruct the session's tracks (iteration 1), then (``mode="refine"``) run the project's CSPT iterations
    ``refine_iter`` .. ``refine_maxiter`` one at a time with :func:`run_cspt` (the pipeline the CLI runs), stopping
    early when it reports convergence; yields each completed iteration.

    With a project the curated tracks and the parameters are first written as the project's input
    (``frealign/maps/{name}_r01.cistem``, ``.pyp_config.toml``) so that the project's files say what was run. The
    whole job holds the project's lock (:func:`napari_cspt2d.run_lock.project_lock`): a run already working on the
    project (from the CLI, Python or another napari) stops it before anything is written."""
    lock = contextlib.nullcontext() if s.project_dir is None else project_lock(s.project_dir, f"napari {mode}")
    with lock:
        yield from _run_job(s, mode, progress, cancel)


def _run_job(s: Session, mode: RunMode, progress: ProgressFn, cancel: Callable[[], bool]
             ) -> Iterator[IterationResult]:
    p = s.params
    if mode == "refine" and s.project_dir is None:
        raise no_project_error()
    iterations = list(range(p["refine_iter"], p["refine_maxiter"] + 1)) if mode == "refine" else []
    total = 1 + len(iterations)

    def stage_progress(step: int) -> ProgressFn:
        prefix = f"step {step}/{total}: " if total > 1 else ""
        return lambda stage, done, n: progress(prefix + stage, done, n)

    written: list[Path] = []
    paths = None
    if s.project_dir is not None:
        names = tilt_series_names(s.project_dir)
        if len(names) != 1:
            raise CsptInputError(f"holds {len(names)} tilt series", file=s.project_dir, field="tilt series",
                                 expected="one {name}_stack.mrc with its frealign/maps/{name}_r01.cistem "
                                 "(Parameters widget: Create project)")
        paths = ProjectPaths(s.project_dir.resolve(), data_set_name(p["data_set"], s.project_dir, names))
        start_plot_process()  # (its start-up overlaps the reconstruction, at low priority; fsc_plot docstring)
        remove_stale_temp_files(paths.root)  # what interrupted writes left (the refinement's run_cspt does the same)
        written += [save_params(p, paths.root / CONFIG_NAME)]
        written += [Path(f) for f in pyp.create_cistem_from_2d_tracks(names[0], s.tracks, p, paths.maps)]
    result = reconstruct_tracks(s.stack, s.tracks, **reconstruction_options(Settings.parse(p)), batch_size=BATCH_SIZE,
                                progress=stage_progress(1), cancel=cancel)
    if paths is not None:
        written += result.write(paths.map(1), plot=False)
        written.append(result.write_plot(paths.map(1), draw=plot_fsc_apart))  # matplotlib in another process
    yield IterationResult(1, s.tracks, result, written=written)
    if not iterations:
        return
    serial = p["cluster_backend"] == "local"
    if not serial:
        from .cluster import make_client  # dask.distributed: imported only when a cluster is used
    with contextlib.nullcontext(None) if serial else make_client(p, tasks=s.tracks.n_particles,
                                                                 project_dir=s.project_dir) as client:
        for step, iteration in enumerate(iterations, start=2):
            run = run_cspt(p, project_dir=s.project_dir, first_iteration=iteration, last_iteration=iteration,
                           client=client, serial=serial, progress=stage_progress(step), cancel=cancel,
                           draw_plot=plot_fsc_apart)  # each iteration's FSC PNG: matplotlib in another process
            tracks, result = _read_iteration(run, s.tracks, p)
            stem = run.map.with_suffix("")
            files = [run.map, Path(f"{stem}_half1.mrc"), Path(f"{stem}_half2.mrc"), *map(Path, run.parameters)]
            yield IterationResult(iteration, tracks, result, run.iterations[-1], _residuals(tracks), files)
            if run.converged is not None:
                progress(f"step {step}/{total}: converged", 1, 1)
                return


def preview_bin(params: PypParameters, *, min_box: int = 24) -> int:
    """Extraction binning of the live preview: twice ``extract_bin`` (or more, up to a map of ``min_box`` voxels)
    when the box divides evenly, else ``extract_bin``."""
    box, current = params.box_unbinned_px, params["extract_bin"]
    for factor in (4, 3, 2):
        b = current * factor
        if box % b == 0 and box // b >= min_box:
            return b
    return current


def preview_reconstruction(s: Session, cancel: Callable[[], bool]) -> ReconstructionResult:
    """The live preview: :func:`reconstruct_tracks` of the session's tracks at :func:`preview_bin`, no refinement,
    nothing written."""
    kwargs = reconstruction_options(Settings.parse(s.params)) | {"extract_bin": preview_bin(s.params)}
    return reconstruct_tracks(s.stack, s.tracks, **kwargs, batch_size=BATCH_SIZE, cancel=cancel)


def log_folder(project_dir: Path | None) -> Path:
    """Where run logs go: ``{project}/log`` or ``$XDG_CACHE_HOME/napari-cspt2d/logs``."""
    if project_dir is not None:
        return Path(project_dir) / "log"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "napari-cspt2d" / "logs"


# ---------------------------------------------------------------------------------------------------- what views show

def iso_level(volume: NDArray[np.floating], fraction: float = 0.01) -> float:
    """Density above which the brightest ``fraction`` of the voxels lie: the first iso-surface threshold (1 %, the
    usual initial level of map viewers; a particle fills a few % of its box)."""
    return float(np.quantile(np.asarray(volume, dtype=np.float32), 1.0 - fraction))


@dataclass(frozen=True, eq=False)
class MapDisplay:
    """A map ready for an image layer: ``volume`` (z, y, x) float32 C-contiguous, ``voxel_A``, ``contrast_limits``
    (min, max; a non-empty range) and the first ``iso_level``."""

    volume: NDArray[np.float32]
    voxel_A: float
    contrast_limits: tuple[float, float]
    iso_level: float


def map_display(volume: NDArray[np.floating], voxel_A: float) -> MapDisplay:
    """Prepare ``volume`` for display (off the GUI thread): float32 copy, contrast limits and iso level."""
    data = np.ascontiguousarray(volume, dtype=np.float32)
    lo, hi = float(data.min()), float(data.max())
    return MapDisplay(data, float(voxel_A), (lo, hi if hi > lo else lo + 1.0), iso_level(data))


@dataclass(frozen=True, eq=False)
class PreparedIteration:
    """An :class:`IterationResult` with what every view needs, computed in the worker: the ``map`` display, the FSC
    curve arrays (``fsc_frequency_A_inv``, ``fsc``), and for a refinement iteration the ``review`` of its shifts,
    their ``vectors`` and the ``gallery`` of the worst projection's particle (``worst_row``)."""

    item: IterationResult
    map: MapDisplay
    fsc_frequency_A_inv: NDArray[np.float64]
    fsc: NDArray[np.float64]
    review: Any = None
    vectors: Any = None
    worst_row: int | None = None
    gallery: Any = None

    @property
    def resolution_A(self) -> float:
        return float(self.item.reconstruction.fsc.resolution_A(FSC_THRESHOLD))


def prepare_iteration(item: IterationResult, s: Session) -> PreparedIteration:
    """Everything the cockpit shows of ``item`` (see :class:`PreparedIteration`); runs in the worker."""
    from .review import ShiftReview, gallery_images, shift_vectors, worst_first

    rec = item.reconstruction
    display = map_display(rec.map, rec.voxel_A)
    curve = rec.fsc
    if not item.refined:
        return PreparedIteration(item, display, np.asarray(curve.frequency_A_inv), np.asarray(curve.fsc))
    review = ShiftReview(s.tracks, item.tracks, item.residual_px)
    worst = int(worst_first(review)[0]) if len(review) else None
    gallery = None if worst is None else gallery_images(
        s.stack, review, int(review.before.particle[worst]), rec.map, s.params, iteration=item.iteration)
    return PreparedIteration(item, display, np.asarray(curve.frequency_A_inv), np.asarray(curve.fsc), review,
                             shift_vectors(review), worst, gallery)
