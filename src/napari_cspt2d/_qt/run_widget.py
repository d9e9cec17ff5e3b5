"""The Run tab: reconstruct (one pass) or refine (CSPT iterations) in a worker thread, with progress, cancel, a run
log, the history of every map, the map in a docked viewer and the FSC curves.

The job is :func:`napari_cspt2d.runs.run_job` on the :class:`~napari_cspt2d.runs.Session` the cockpit's state gives
when the button is pressed. The worker also prepares what the views show (:func:`~napari_cspt2d.runs.prepare_iteration`:
map contrast and iso level, FSC arrays, shift review, vectors, the worst particle's gallery), so the GUI thread only
assigns finished arrays. Each finished step is listed in the history; a cancelled or failed run leaves the map of the
last finished run on screen (its own steps stay listed, marked). The log goes to ``{project}/log`` or the user cache.
"""

from __future__ import annotations

import datetime
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from ..errors import CsptCancelled, CsptError, CsptInputError
from ..recon.reconstruct import ReconstructionResult
from ..runs import (
    PreparedIteration,
    RunMode,
    Session,
    log_folder,
    map_display,
    no_project_error,
    prepare_iteration,
    preview_reconstruction,
    run_job,
)
from ._guard import report_errors
from ._lifecycle import WindowCloseWatcher
from ._owner import CockpitState, HistoryEntry, state_of
from ._priority import thread_priority_lowered
from ._progress import DeferredProgressBar
from ._warmup import KERNELS_STAGE, wait_for_kernels
from .preview import LivePreview
from .results import FscPlot, HistoryTable, MapPanel
from ._ticks import TickQueue

__all__ = ["RunWidget"]

_STAGE_TEXT = {
    KERNELS_STAGE: "preparing the kernels (compiled once per install)",
    "backproject": "extracting and inserting particles",
    "reconstruct": "reconstructing (half maps, FSC)",
    "refine": "refining particles",
    "converged": "parameters stopped changing",
}


#: The run's thread's scheduling niceness while it runs (its thread pools', started meanwhile, too): on 2 busy
#: cores each repaint of the window (Qt composes it with OpenGL: llvmpipe's threads) otherwise waited for a core
#: behind the run's numpy work, e.g. 10 ms repaints took 65-140 ms during a first Reconstruct.
RUN_NICENESS = 5


def _prepared_run(s: Session, mode: RunMode, progress, cancel: Callable[[], bool]) -> Iterator[PreparedIteration]:
    """The worker: run the job and prepare each step's views; an exception is *returned* (with its traceback text)
    instead of raised, so the widget reports it with the log path. A run started before the cockpit's warm-up has
    loaded the kernels waits for it (:func:`wait_for_kernels`) rather than compile them holding the GIL."""
    try:
        with thread_priority_lowered(RUN_NICENESS):
            wait_for_kernels(progress, cancel, "reconstruct" if mode == "reconstruct" else "refine")
            for item in run_job(s, mode, progress, cancel):
                yield prepare_iteration(item, s)
    except BaseException as exc:  # noqa: BLE001 - reported by the widget
        return exc, traceback.format_exc()
    return None


def _prepared_preview(s: Session, cancel: Callable[[], bool]):
    wait_for_kernels(lambda *_: None, cancel, "reconstruct")
    result: ReconstructionResult = preview_reconstruction(s, cancel)
    return map_display(result.map, result.voxel_A)


class _Relay(QObject):
    """Carries progress from the worker thread to the GUI thread (queued signal)."""

    progress = Signal(str, int, int)


class RunWidget(QWidget):
    """Reconstruct / Refine / Cancel, progress, history, map, FSC plot, run log (see the module docstring).

    Signals: ``run_finished(str)`` with ``"done"``, ``"cancelled"`` or ``"failed"``; ``iteration_done(object)`` with
    each :class:`~napari_cspt2d.runs.PreparedIteration`; ``review_shown(object)`` with the :class:`HistoryEntry` of a
    refinement step shown (the Validate tab shows its shifts)."""

    run_finished = Signal(str)
    iteration_done = Signal(object)
    review_shown = Signal(object)

    def __init__(self, napari_viewer, state: CockpitState | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state_owner = state if state is not None else state_of(napari_viewer)
        self.worker = None
        self.results: list[PreparedIteration] = []
        self.log_path: Path | None = None
        self.state = "idle"
        self._cancel = threading.Event()
        self._ticks = TickQueue(self)
        self._cancel_time: float | None = None
        self.cancel_latency_s: float | None = None
        self._session: Session | None = None
        self._mode: RunMode = "reconstruct"
        self._run = 0
        self._started = 0.0
        self._last_stage = ""
        self._relay = _Relay(self)
        self._relay.progress.connect(self._on_progress)
        self.preview = LivePreview(self.state_owner.session, _prepared_preview, self._show_preview,
                                   is_busy=lambda: self.busy, parent=self)
        self._build_ui()
        self._close_watcher = WindowCloseWatcher(self, self.close_session)

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        row = QHBoxLayout()
        self.reconstruct_button = QPushButton("Reconstruct")
        self.reconstruct_button.setToolTip("One reconstruction of the current tracks (no refinement)")
        self.refine_button = QPushButton("Refine")
        self.refine_button.setToolTip("Reconstruct, then CSPT iterations refine_iter..refine_maxiter (shifts and "
                                      "orientations against the previous half maps); needs a project folder")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.reconstruct_button.clicked.connect(lambda _=False: self.start("reconstruct"))
        self.refine_button.clicked.connect(lambda _=False: self.start("refine"))
        self.cancel_button.clicked.connect(lambda _=False: self.cancel())
        for button in (self.reconstruct_button, self.refine_button, self.cancel_button):
            row.addWidget(button)
        layout.addLayout(row)
        self.progress_bar = DeferredProgressBar()  # no synchronous window repaint per progress step
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.stage_label = QLabel("Idle.")
        self.stage_label.setWordWrap(True)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.stage_label)
        self.preview_check = QCheckBox("Live preview (binned, no refinement)")
        self.preview_check.setToolTip(f"Reconstruct quickly {self.preview.delay_ms / 1000:g} s after the tracks "
                                      "stop changing; shown in the map viewer below")
        self.preview_check.toggled.connect(self._toggle_preview)
        layout.addWidget(self.preview_check)
        self.map_panel = MapPanel()
        layout.addWidget(self.map_panel)
        layout.addWidget(QLabel("History (click a row to show its map again):"))
        self.history = HistoryTable()
        self.history.entry_chosen.connect(self.show_entry)
        layout.addWidget(self.history)
        self.fsc_plot = FscPlot()
        layout.addWidget(self.fsc_plot)
        log_box = QCollapsible("Run log")
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(5000)
        self.log_view.setMinimumHeight(120)
        log_box.addWidget(self.log_view)
        layout.addWidget(log_box)

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
        s = self.state_owner.session()
        if mode == "refine" and s.project_dir is None:
            raise no_project_error()
        self.preview.cancel()
        self.map_panel.prepare()  # the map layer, in later turns, while the run works towards its first map
        self._session, self._mode = s, mode
        self._cancel.clear()
        self._cancel_time = None
        self.results = []
        self._run = self.state_owner.next_run()
        self._open_log(s)
        p = s.params
        steps = 1 + (p["refine_maxiter"] - p["refine_iter"] + 1 if mode == "refine" else 0)
        self._log(f"run {self._run}, {mode} of {s.name}: {s.tracks.n_particles} particles, {len(s.tracks)} "
                  f"projections, {steps} step(s); box {p['extract_box']} px at {p.particle_pixel_A:g} Å/px"
                  + (f"; outputs in {s.project_dir}" if s.project_dir else "; no project folder (results in viewer)"))
        worker = create_worker(_prepared_run, s, mode, self._relay.progress.emit, self._cancel.is_set,
                               _start_thread=False, _ignore_errors=True)
        # one piece of GUI work per event-loop tick, in the order the worker sent them (see _ticks)
        worker.yielded.connect(lambda prepared: self._ticks.add(lambda: self._on_iteration(prepared)))
        worker.returned.connect(lambda value: self._ticks.add(lambda: self._on_returned(value)))
        worker.finished.connect(lambda: self._ticks.add(self._on_finished))
        self.worker = worker
        self.state = "running"
        self._started = time.perf_counter()
        self._last_stage = ""
        self._set_running(True)
        self.stage_label.setText("Starting…")
        worker.start()

    def cancel(self) -> None:
        """Ask the run to stop; it ends at the core's next check."""
        if not self.busy:
            return
        self._cancel.set()
        self._cancel_time = time.perf_counter()
        self.cancel_button.setEnabled(False)
        self.stage_label.setText("Cancelling…")
        self._log("cancel requested")

    def _set_running(self, running: bool) -> None:
        self.reconstruct_button.setEnabled(not running)
        self.refine_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    def _on_progress(self, stage: str, done: int, total: int) -> None:
        if self.worker is None or self._cancel.is_set():
            return
        self.progress_bar.setRange(0, max(int(total), 1))
        self.progress_bar.setValue(int(done))
        prefix, _, name = stage.rpartition(": ")
        text = _STAGE_TEXT.get(name, name) + (f" ({done}/{total})" if total > 1 else "")
        elapsed = time.perf_counter() - self._started
        self.stage_label.setText(f"{prefix.capitalize() + ': ' if prefix else ''}{text}  [{elapsed:.0f} s]")
        if stage != self._last_stage:
            self._last_stage = stage
            self._log(f"{prefix + ': ' if prefix else ''}{_STAGE_TEXT.get(name, name)}")

    @report_errors("Show results")
    def _on_iteration(self, prepared: PreparedIteration) -> None:
        self.results.append(prepared)
        item, rec = prepared.item, prepared.item.reconstruction
        if item.refined:
            detail = (f"shifts moved {item.summary['shift_change_px']:.2f} px RMS, orientations "
                      f"{item.summary['angle_change_deg']:.2f}° median")
        else:
            detail = f"{rec.stats['n_used']} projections, {rec.stats['seconds']:.1f} s"
        self._log(f"{item.label}: {rec.resolution_A:.2f} Å at FSC 0.143 ({detail})"
                  + (f"; wrote {', '.join(p.name for p in item.written)}" if item.written else ""))
        entry = HistoryEntry(self._run, item.iteration, prepared.resolution_A, self._mode, prepared, self._session)
        self.state_owner.add_history(entry)
        self.history.add_row(entry.run, entry.iteration, entry.resolution_A, "running")
        self.fsc_plot.add_curve(prepared.fsc_frequency_A_inv, prepared.fsc, prepared.resolution_A,
                                f"run {entry.run} · it {entry.iteration}")
        self._show(len(self.state_owner.history) - 1)
        self._ticks.add(lambda: self.iteration_done.emit(prepared))

    def show_entry(self, index: int) -> None:
        """Show history entry ``index`` again: its map at once; its FSC curve marked and its shift review
        (refinements) in the next event-loop ticks."""
        self._show(index, map_now=True)

    def _show(self, index: int, map_now: bool = False) -> None:
        """Queue history entry ``index``'s views, one per event-loop tick: its map (at once if ``map_now``), its FSC
        curve and history row marked, its shift review (refinements)."""
        if map_now:
            self._show_map(index)
        else:
            self._ticks.add(lambda: self._show_map(index))
        self._ticks.add(lambda: self._mark(index))
        if self.state_owner.history[index].result.review is not None:
            self._ticks.add(lambda: self.review_shown.emit(self.state_owner.history[index]))

    @report_errors("Show map")
    def _show_map(self, index: int) -> None:
        entry = self.state_owner.history[index]
        kind = " (curated tracks)" if entry.iteration == 1 else ""
        self.map_panel.show_map(entry.result.map, f"Map: run {entry.run}, iteration {entry.iteration}{kind}, "
                                f"{entry.resolution_A:.1f} Å at FSC 0.143")

    def _mark(self, index: int) -> None:
        self.fsc_plot.highlight(index)
        self.history.mark_current(index)

    def _finished_entries(self) -> list[int]:
        kinds = [self.history.item(i, 3).text() for i in range(self.history.rowCount())]
        return [i for i, k in enumerate(kinds) if k == "finished"]

    def _on_returned(self, value) -> None:
        elapsed = time.perf_counter() - self._started
        mine = [i for i, e in enumerate(self.state_owner.history) if e.run == self._run]
        if value is None:
            self.state = "done"
            for i in mine:
                self.history.set_kind(i, "finished")
            self._log(f"finished in {elapsed:.1f} s")
            self.stage_label.setText(f"Done in {elapsed:.1f} s."
                                     + (f" {self.fsc_plot.resolution_A:.1f} Å at FSC 0.143."
                                        if self.fsc_plot.resolution_A else ""))
            return
        exc, trace = value
        cancelled = isinstance(exc, CsptCancelled)
        for i in mine:
            self.history.set_kind(i, "cancelled run" if cancelled else "failed run")
        finished = self._finished_entries()
        if finished:  # a cancelled or failed run never replaces the last finished map
            self._show(finished[-1])
        if cancelled:
            self.state = "cancelled"
            if self._cancel_time is not None:
                self.cancel_latency_s = time.perf_counter() - self._cancel_time
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
        if len(self._ticks):  # views queued by the last pieces (e.g. the finished map back after a cancel) go first
            self._ticks.add(self._on_finished)
            return
        self.worker = None
        self._set_running(False)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1 if self.state == "done" else 0)
        self.run_finished.emit(self.state)

    # ------------------------------------------------------------------ preview
    def _toggle_preview(self, on: bool) -> None:
        self.preview.set_enabled(on)

    def _show_preview(self, display) -> None:
        self.map_panel.show_map(display, "Live preview (binned, no refinement)")

    # ------------------------------------------------------------------ log
    def _open_log(self, s: Session) -> None:
        folder = log_folder(s.project_dir)
        folder.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.log_path = folder / f"{s.name}_napari_{stamp}.log"

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
    def close_session(self) -> None:
        """Stop a run and the preview, free the map viewer (called when the napari window closes)."""
        self._cancel.set()
        self._ticks.clear()
        if self.worker is not None:
            self.worker.await_workers(msecs=5000)
        self.preview.close()
        self.fsc_plot.stop()
        self.map_panel.close_viewer()
