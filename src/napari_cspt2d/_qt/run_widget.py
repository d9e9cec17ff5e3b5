"""The "Run" dock widget: reconstruct (one pass) or refine (CSPT iterations) in a worker thread, with progress,
cancel, a run log, results (map window, FSC plot) and the shift-validation views.

A run works on a :class:`~napari_cspt2d._qt.params_widget.Session` taken when the button is pressed: the tracks are
the curation document's immutable TrackSet at that moment, so the user can keep editing while it runs (the edits are
not part of the run). Progress arrives as ``(stage, done, total)`` from the core; Cancel sets a flag the core checks
between batches of particles (:data:`BATCH_SIZE` boxes when reconstructing, one bundle of ``slurm_bundle_size``
particles when refining) and the run ends with :class:`CsptCancelled`; files are only written when a map or an
iteration is complete (atomically), so what earlier iterations wrote stays intact.

*Reconstruct* calls :func:`reconstruct_tracks` directly and needs no project. *Refine* runs the project's CSPT
iterations with the same pipeline as the command line (:func:`napari_cspt2d.recon.pipeline.run_cspt`, one iteration
per call so that each map and FSC shows up as it is made; in this process for ``cluster_backend = "local"``, on the
dask cluster of the parameters otherwise). With a project folder (Parameters widget) the curated tracks and the
parameters become the project's input first (``frealign/maps/{name}_r01.cistem``, ``.pyp_config.toml``) and the
outputs follow pyp's names: ``frealign/maps/{data_set}_r01_01.mrc`` for the map of the curated tracks,
``{data_set}_r01_{kk}.mrc`` and ``{name}_r01_{kk}.cistem`` for iteration ``kk``, half maps and FSC table/plot beside
each map, the widget's run log in ``log/``. Without a project the log goes to the user cache folder.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from numpy.typing import NDArray
from qtpy.QtCore import QEvent, QObject, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .. import pyp
from ..cluster import make_client
from ..errors import CsptCancelled, CsptError, CsptInputError, CsptRunError
from ..io.atomic import remove_stale_temp_files
from ..io.mrc import read_image
from ..io.toml import CONFIG_NAME, save_params
from ..model.params import PypParameters
from ..model.tracks import TrackSet
from ..recon.reconstruct import ReconstructionResult, reconstruct_tracks
from ..recon.fsc import fsc_curve
from ..recon.pipeline import reconstruction_options, run_cspt
from ..recon.project import ProjectPaths, data_set_name, tilt_series_names
from ..recon.trackfit import fit_tracks
from ._guard import report_errors
from .params_widget import Session, session
from .preview import LivePreview
from .results import FscPlot, MapWindow
from .validation import ShiftReview, ShiftValidation

__all__ = ["RunWidget", "IterationResult", "run_job", "preview_reconstruction", "preview_bin", "log_folder"]

RunMode = Literal["reconstruct", "refine"]
ProgressFn = Callable[[str, int, int], None]

#: Projections per extraction/insertion batch: small enough that Cancel is noticed within about a second.
BATCH_SIZE = 128

_STAGE_TEXT = {
    "backproject": "extracting and inserting particles",
    "reconstruct": "reconstructing (half maps, FSC)",
    "refine": "refining particles",
    "converged": "parameters stopped changing",
}


# ---------------------------------------------------------------------------------------------------- the job
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
    tracks = pyp.Parameters.from_file(run.parameters[0]).to_trackset(like.image_shape_yx, tilts=like.tilts)
    stem = run.map.with_suffix("")
    volume, half1, half2 = (read_image(p) for p in (run.map, f"{stem}_half1.mrc", f"{stem}_half2.mrc"))
    voxel = params.particle_pixel_A
    curve = fsc_curve(half1, half2, voxel)
    summary = run.iterations[-1]
    rec = ReconstructionResult(volume, half1, half2, curve, summary["resolution_A"], summary["resolution_05_A"],
                               voxel, dict(summary))
    return _same_rows(tracks, like, Path(run.parameters[0])), rec


def _no_project() -> CsptInputError:
    return CsptInputError("no project folder", field="project", expected="a project folder for refinement "
                          "(Parameters widget: choose a folder, then Create project or Open project)")


def run_job(s: Session, mode: RunMode, progress: ProgressFn, cancel: Callable[[], bool]
            ) -> Iterator[IterationResult]:
    """Reconstruct the session's tracks (iteration 1), then (``mode="refine"``) run the project's CSPT iterations
    ``refine_iter`` .. ``refine_maxiter`` one at a time with :func:`run_cspt` (the pipeline the CLI runs), stopping
    early when it reports convergence; yields each completed iteration.

    With a project the curated tracks and the parameters are first written as the project's input
    (``frealign/maps/{name}_r01.cistem``, ``.pyp_config.toml``) so that the project's files say what was run."""
    p = s.params
    if mode == "refine" and s.project_dir is None:
        raise _no_project()
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
        remove_stale_temp_files(paths.root)  # what interrupted writes left (the refinement's run_cspt does the same)
        written += [save_params(p, paths.root / CONFIG_NAME)]
        written += [Path(f) for f in pyp.create_cistem_from_2d_tracks(names[0], s.tracks, p, paths.maps)]
    result = reconstruct_tracks(s.stack, s.tracks, **reconstruction_options(p), batch_size=BATCH_SIZE,
                                progress=stage_progress(1), cancel=cancel)
    if paths is not None:
        written += result.write(paths.map(1))
    yield IterationResult(1, s.tracks, result, written=written)
    if not iterations:
        return
    serial = p["cluster_backend"] == "local"
    with contextlib.nullcontext(None) if serial else make_client(p, tasks=s.tracks.n_particles,
                                                                 project_dir=s.project_dir) as client:
        for step, iteration in enumerate(iterations, start=2):
            run = run_cspt(p, project_dir=s.project_dir, first_iteration=iteration, last_iteration=iteration,
                           client=client, serial=serial, progress=stage_progress(step), cancel=cancel)
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
    kwargs = reconstruction_options(s.params) | {"extract_bin": preview_bin(s.params)}
    return reconstruct_tracks(s.stack, s.tracks, **kwargs, batch_size=BATCH_SIZE, cancel=cancel)


def _guarded(job: Callable[..., Iterator[IterationResult]], *args: Any) -> Iterator[IterationResult]:
    """Run ``job`` in the worker; an exception is *returned* (with its traceback text) instead of raised, so the
    widget reports it with the log path (napari would otherwise show a bare traceback)."""
    try:
        yield from job(*args)
    except BaseException as exc:  # noqa: BLE001 - reported by the widget
        return exc, traceback.format_exc()
    return None


def log_folder(project_dir: Path | None) -> Path:
    """Where run logs go: ``{project}/log`` or ``$XDG_CACHE_HOME/napari-cspt2d/logs``."""
    if project_dir is not None:
        return Path(project_dir) / "log"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "napari-cspt2d" / "logs"


class _Relay(QObject):
    """Carries progress from the worker thread to the GUI thread (queued signal)."""

    progress = Signal(str, int, int)


# ---------------------------------------------------------------------------------------------------- the widget
class RunWidget(QWidget):
    """Dock widget: Reconstruct / Refine / Cancel, progress, run log, live preview (see the module docstring).

    Signals: ``run_finished(str)`` with ``"done"``, ``"cancelled"`` or ``"failed"``; ``iteration_done(object)`` with
    each :class:`IterationResult`."""

    run_finished = Signal(str)
    iteration_done = Signal(object)

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.worker = None
        self.results: list[IterationResult] = []
        self.log_path: Path | None = None
        self.state = "idle"
        self._cancel = threading.Event()
        self._session: Session | None = None
        self._mode: RunMode = "reconstruct"
        self._started = 0.0
        self._last_stage = ""
        self._relay = _Relay(self)
        self._relay.progress.connect(self._on_progress)
        self._window_filtered: QWidget | None = None
        self.map_window = MapWindow(show=self.isVisible)
        self.fsc_plot = FscPlot()
        self.fsc_dock = None
        self.validation: ShiftValidation | None = None
        self.preview = LivePreview(self._preview_session, preview_reconstruction, self._show_preview,
                                   is_busy=lambda: self.busy, parent=self)
        self._build_ui()

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        row = QHBoxLayout()
        self.reconstruct_button = QPushButton("Reconstruct")
        self.reconstruct_button.setToolTip("One reconstruction of the current tracks (no refinement)")
        self.refine_button = QPushButton("Refine")
        self.refine_button.setToolTip("Reconstruct, then CSPT iterations refine_iter..refine_maxiter (shifts and "
                                      "orientations against the previous half maps)")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.reconstruct_button.clicked.connect(lambda _=False: self.start("reconstruct"))
        self.refine_button.clicked.connect(lambda _=False: self.start("refine"))
        self.cancel_button.clicked.connect(lambda _=False: self.cancel())
        for button in (self.reconstruct_button, self.refine_button, self.cancel_button):
            row.addWidget(button)
        layout.addLayout(row)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.stage_label = QLabel("Idle.")
        self.stage_label.setWordWrap(True)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.stage_label)
        self.preview_check = QCheckBox("Live preview (binned, no refinement)")
        self.preview_check.setToolTip(f"Reconstruct quickly {self.preview.delay_ms / 1000:g} s after the tracks "
                                      "stop changing; shown as layer 'preview' in the map window")
        self.preview_check.toggled.connect(self._toggle_preview)
        layout.addWidget(self.preview_check)
        self.map_button = QPushButton("Show map window")
        self.map_button.clicked.connect(lambda _=False: self.show_map_window())
        layout.addWidget(self.map_button)
        layout.addWidget(QLabel("Run log:"))
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(5000)
        layout.addWidget(self.log_view, 1)

    # ------------------------------------------------------------------ running
    @property
    def busy(self) -> bool:
        """True while a run is in progress."""
        return self.worker is not None

    @report_errors("Run")
    def start(self, mode: RunMode) -> None:
        """Start a run (``"reconstruct"`` or ``"refine"``) on a snapshot of the current tracks and parameters."""
        if self.busy:
            raise CsptInputError("a run is in progress", field="run", expected="the current run to end (or Cancel)")
        s = session(self.viewer)
        if mode == "refine" and s.project_dir is None:
            raise _no_project()
        self.preview.cancel()
        self._session, self._mode = s, mode
        self._cancel.clear()
        self.results = []
        self.fsc_plot.clear()
        self._open_log(s)
        p = s.params
        steps = 1 + (p["refine_maxiter"] - p["refine_iter"] + 1 if mode == "refine" else 0)
        self._log(f"{mode} of {s.name}: {s.tracks.n_particles} particles, {len(s.tracks)} projections, "
                  f"{steps} step(s); box {p['extract_box']} px at {p.particle_pixel_A:g} Å/px"
                  + (f"; outputs in {s.project_dir}" if s.project_dir else "; no project folder (results in viewer)"))
        worker = create_worker(_guarded, run_job, s, mode, self._relay.progress.emit, self._cancel.is_set,
                               _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(self._on_iteration)
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.state = "running"
        self._started = time.perf_counter()
        self._last_stage = ""
        self._set_running(True)
        self.stage_label.setText("Starting…")
        worker.start()

    def cancel(self) -> None:
        """Ask the run to stop; it ends at the core's next check (well under a second)."""
        if not self.busy:
            return
        self._cancel.set()
        self.cancel_button.setEnabled(False)
        self.stage_label.setText("Cancelling…")
        self._log("cancel requested")

    def _set_running(self, running: bool) -> None:
        self.reconstruct_button.setEnabled(not running)
        self.refine_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    def _on_progress(self, stage: str, done: int, total: int) -> None:
        if self.worker is None:
            return
        self.progress_bar.setRange(0, max(int(total), 1))
        self.progress_bar.setValue(int(done))
        prefix, _, name = stage.rpartition(": ")
        text = _STAGE_TEXT.get(name, name) + (f" ({done}/{total})" if total > 1 else "")
        elapsed = time.perf_counter() - self._started
        self.stage_label.setText(f"{prefix.capitalize() + ': ' if prefix else ''}{text}  [{elapsed:.0f} s]")
        if stage != self._last_stage and not self._cancel.is_set():
            self._last_stage = stage
            self._log(f"{prefix + ': ' if prefix else ''}{_STAGE_TEXT.get(name, name)}")

    @report_errors("Show results")
    def _on_iteration(self, item: IterationResult) -> None:
        self.results.append(item)
        rec = item.reconstruction
        if item.refined:
            detail = (f"shifts moved {item.summary['shift_change_px']:.2f} px RMS, orientations "
                      f"{item.summary['angle_change_deg']:.2f}° median")
        else:
            detail = f"{rec.stats['n_used']} projections, {rec.stats['seconds']:.1f} s"
        self._log(f"{item.label}: {rec.resolution_A:.2f} Å at FSC 0.143 ({detail})"
                  + (f"; wrote {', '.join(p.name for p in item.written)}" if item.written else ""))
        self.map_window.show_result(rec, item.label)
        self._dock_fsc()
        self.fsc_plot.add_curve(rec.fsc, item.label)
        if item.refined:
            self._show_review(item)
        self.iteration_done.emit(item)

    def _on_returned(self, value) -> None:
        elapsed = time.perf_counter() - self._started
        if value is None:
            self.state = "done"
            self._log(f"finished in {elapsed:.1f} s")
            self.stage_label.setText(f"Done in {elapsed:.1f} s."
                                     + (f" {self.fsc_plot.resolution_A:.1f} Å at FSC 0.143."
                                        if self.fsc_plot.resolution_A else ""))
            return
        exc, trace = value
        if isinstance(exc, CsptCancelled):
            self.state = "cancelled"
            kept = f"; {len(self.results)} completed step(s) kept" if self.results else ""
            self._log(f"cancelled after {elapsed:.1f} s{kept}")
            self.stage_label.setText(f"Cancelled after {elapsed:.1f} s{kept}.")
            show_info(f"Run cancelled{kept}.")
            return
        self.state = "failed"
        self._log(trace.rstrip())
        self.stage_label.setText(f"Failed: {exc}")
        what = "Reconstruction" if self._mode == "reconstruct" else "Refinement"
        detail = str(exc) if isinstance(exc, CsptError) else f"{type(exc).__name__}: {exc}"
        show_error(f"{what} failed: {detail} (log: {self.log_path})")

    def _on_finished(self) -> None:
        self.worker = None
        self._set_running(False)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1 if self.state == "done" else 0)
        self.run_finished.emit(self.state)

    # ------------------------------------------------------------------ results
    def _dock_fsc(self) -> None:
        if self.fsc_dock is None and hasattr(self.viewer, "window"):
            self.fsc_dock = self.viewer.window.add_dock_widget(self.fsc_plot, name="FSC", area="right")

    def show_map_window(self) -> None:
        """Bring the map window up (created empty when no map was made yet)."""
        window = self.map_window.viewer.window
        window.show()
        window._qt_window.raise_()

    def _show_review(self, item: IterationResult) -> None:
        s = self._session
        review = ShiftReview(s.tracks, item.tracks, item.residual_px)
        if self.validation is None:
            self.validation = ShiftValidation(self.viewer)
        self.validation.set_review(review, stack=s.stack, params=s.params, volume=item.reconstruction.map,
                                   document=s.document, label=item.label)

    # ------------------------------------------------------------------ preview
    def _toggle_preview(self, on: bool) -> None:
        self.preview.set_enabled(on)

    def _preview_session(self) -> Session:
        return session(self.viewer)

    def _show_preview(self, result: ReconstructionResult) -> None:
        self.map_window.show_volume("preview", result.map, result.voxel_A)

    # ------------------------------------------------------------------ log
    def _open_log(self, s: Session) -> None:
        folder = log_folder(s.project_dir)
        folder.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.log_path = folder / f"{s.name}_napari_{stamp}.log"
        self.log_view.clear()

    def _log(self, text: str) -> None:
        line = f"[{datetime.datetime.now():%H:%M:%S}] {text}"
        self.log_view.appendPlainText(line)
        if self.log_path is not None:
            try:
                with open(self.log_path, "a", encoding="utf-8") as fh:
                    fh.write(line + "\n")
            except OSError as exc:
                self.log_view.appendPlainText(f"(log file {self.log_path} not writable: {exc})")
                self.log_path = None

    # ------------------------------------------------------------------ life cycle
    def showEvent(self, event) -> None:  # noqa: N802 - Qt API
        super().showEvent(event)
        window = self.window()
        if window is not self and window is not self._window_filtered:
            window.installEventFilter(self)
            self._window_filtered = window

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt API
        window = getattr(self, "_window_filtered", None)
        if window is not None and obj is window and event.type() == QEvent.Type.Close:
            window.removeEventFilter(self)
            self._window_filtered = None
            self.close_session()
        return False

    def close_session(self) -> None:
        """Stop a run, the preview and close the map window (called when the napari window closes)."""
        self._cancel.set()
        if self.worker is not None:
            self.worker.await_workers(msecs=5000)
        self.preview.close()
        if self.validation is not None:
            self.validation.close_session()
        self.map_window.close()
