"""The "Tilt-series loader" dock widget: pick a stack, its tilt angles and (optionally) tracks, or the sample.

The stack is memory-mapped (a 4 GB stack opens in well under a second; sections are read when shown), displayed with
scale = pixel size, axis labels ``('tilt', 'y', 'x')``, contrast from robust percentiles of a subsample and,
optionally, binned on the fly for display. Files are read in a worker thread; layers are added on the GUI thread.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from napari.layers import Layer
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .._reader import read_trackset, series_layer_data
from ..errors import CsptError, CsptInputError
from ..model.tiltseries import TiltSeries, find_angle_file
from ._guard import report_errors
from ._layer_update import add_unselected
from ._prebuild import build_in_turns
from ._progress import DeferredProgressBar
from ._sample_stream import fill_in_background
from ._stages import in_own_turn
from ._units import load_unit_registry
from ._viewer_watch import watch_viewer

__all__ = ["TiltSeriesLoader", "load_series_layers"]

DEFAULT_RADIUS_A = 100.0  # pyp's default particle_rad
#: Layers (by ``metadata["cspt2d"]["role"]``) added hidden and shown in the next stage: adding them and drawing them
#: the first time each cost 40–200 ms (shown before the next layer comes: the curation, bound when the tracks come,
#: finds the trajectories as the reader made them).
SHOWN_A_STAGE_LATER = ("tiltseries", "trajectories", "tracks")


def load_series_layers(stack: str | os.PathLike[str], angles: str | os.PathLike[str] | None = None,
                       tracks: str | os.PathLike[str] | None = None, *, bin_factor: int = 1,
                       radius_A: float = DEFAULT_RADIUS_A) -> list[tuple[Any, dict, str]]:
    """Layer data of a tilt series (memory-mapped) and, if given, its tracks (checked against the stack's size)."""
    series = TiltSeries.open(stack, angles or None)
    track_set = None if not tracks else read_trackset(tracks, series.shape_yx)
    return series_layer_data(series, track_set, bin_factor=bin_factor, radius_px=radius_A / series.pixel_A,
                             source=None if not tracks else os.fspath(tracks))


def _layers_of(func, *args: Any, **kwargs: Any) -> list[Layer]:
    """The napari layers of reader-style layer data ``func(*args, **kwargs)``, made in the worker thread (a layer's
    model, its features and contrast, cost hundreds of ms for large tracks; only adding it is left to the GUI),
    with pint's units made whole first (:mod:`._units`)."""
    load_unit_registry()
    return [Layer.create(data, kw, kind) for data, kw, kind in func(*args, **kwargs)]


def add_layers(viewer, layers: list[tuple[Any, dict, str]]) -> list[Layer]:
    """Add reader-style layer data to ``viewer`` (their axis labels become the viewer's) and fit the view."""
    added = [viewer.add_layer(Layer.create(data, kwargs, kind)) for data, kwargs, kind in layers]
    viewer.reset_view()
    return added


def _shown_section(viewer, layer: Layer) -> int:
    """The section (tilt) of ``layer`` that ``viewer`` shows."""
    return int(round(layer.world_to_data(viewer.dims.point)[0]))


class _PathRow(QWidget):
    """A line edit with a browse button."""

    def __init__(self, caption: str, filters: str, placeholder: str = "") -> None:
        super().__init__()
        self.caption, self.filters = caption, filters
        self.edit = QLineEdit()
        self.edit.setPlaceholderText(placeholder)
        browse = QPushButton("…")
        browse.setFixedWidth(28)
        browse.clicked.connect(self._browse)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.edit, 1)
        row.addWidget(browse)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, self.caption, str(Path(self.text()).parent if self.text() else ""),
                                              self.filters)
        if path:
            self.edit.setText(path)

    def text(self) -> str:
        return self.edit.text().strip()

    def setText(self, text: str) -> None:  # noqa: N802 - Qt naming
        self.edit.setText(str(text))


class TiltSeriesLoader(QWidget):
    """Dock widget: stack + angles (+ tracks) -> image layer (+ tracks layers); or the synthetic sample.

    Signal ``loaded(list)`` carries the layers added."""

    loaded = Signal(list)

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._worker = None
        self._stream = None  # a streamed sample being added (its tilts are made once its layers are in)
        self._filling = None  # the worker making a streamed sample's other tilts
        self.stack = _PathRow("Tilt stack", "MRC stacks (*.mrc *.st *.ali *.mrcs);;All files (*)")
        self.angles = _PathRow("Tilt angles", "Angles (*.tlt *.rawtlt *.mdoc *.pkl);;All files (*)",
                               "found beside the stack")
        self.tracks = _PathRow("Tracks", "Tracks (*.json *.pkl *.cistem *.fid *.mod);;All files (*)", "optional")
        self.stack.edit.editingFinished.connect(self._suggest_angles)
        self.bin_spin = QSpinBox()
        self.bin_spin.setRange(1, 16)
        self.bin_spin.setToolTip("Display binning (block mean, computed on the fly); tracks stay in unbinned pixels")
        self.radius_spin = QDoubleSpinBox()
        self.radius_spin.setRange(1.0, 5000.0)
        self.radius_spin.setValue(DEFAULT_RADIUS_A)
        self.radius_spin.setSuffix(" Å")
        self.radius_spin.setToolTip("Particle radius (pyp particle_rad): size of the track markers")
        form = QFormLayout()
        form.addRow("Stack", self.stack)
        form.addRow("Angles", self.angles)
        form.addRow("Tracks", self.tracks)
        form.addRow("Display bin", self.bin_spin)
        form.addRow("Particle radius", self.radius_spin)
        self.open_button = QPushButton("Open")
        self.open_button.clicked.connect(lambda _=False: self.open())
        self.sample_button = QPushButton("Synthetic sample")
        self.sample_kwargs: dict[str, Any] = {}  # make_sample's arguments for the button (default: the full sample)
        self.sample_button.clicked.connect(lambda _=False: self.open_sample(**self.sample_kwargs))
        buttons = QHBoxLayout()
        buttons.addWidget(self.open_button)
        buttons.addWidget(self.sample_button)
        self.info = QLabel()
        self.info.setWordWrap(True)
        self.progress = DeferredProgressBar()  # no synchronous window repaint per streamed tilt
        self.progress.setRange(0, 0)  # busy indicator while reading
        self.progress.hide()
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.info)
        layout.addStretch(1)
        watch_viewer(napari_viewer)  # the tilt label, for the viewer's life (File > Open shows it too)

    @property
    def busy(self) -> bool:
        """True while files are being read or the sample's tilts made."""
        return self._worker is not None or self._stream is not None or self._filling is not None

    @report_errors("Angles")
    def _suggest_angles(self) -> None:
        if self.stack.text() and not self.angles.text():
            found = find_angle_file(self.stack.text())
            self.angles.edit.setPlaceholderText(f"found: {found.name}" if found else "none found beside the stack")

    @report_errors("Open tilt series")
    def open(self) -> None:
        """Read the chosen stack (and tracks) in a worker, then add the layers."""
        stack = self.stack.text()
        if not stack:
            raise CsptInputError("no stack chosen", field="stack", expected="a .mrc/.st/.ali/.mrcs tilt stack")
        self._run(load_series_layers, stack, self.angles.text() or None, self.tracks.text() or None,
                  bin_factor=self.bin_spin.value(), radius_A=self.radius_spin.value())

    @report_errors("Sample")
    def open_sample(self, **sample_kwargs: Any) -> None:
        """Open the synthetic sample (stack + tracks): its tracks and first tilt are made in a worker and shown, the
        other tilts follow in the background with progress (the first time; then from the cache)."""
        from .._sample_data import sample_layers

        self._run(sample_layers, message="Making the sample…", **sample_kwargs)

    def _run(self, func, *args: Any, message: str = "Loading…", **kwargs: Any) -> None:
        if self._worker is not None:
            raise CsptInputError("still loading", field="loader", expected="the current load to finish")
        worker = create_worker(_layers_of, func, *args, _start_thread=False, _ignore_errors=True, **kwargs)
        worker.returned.connect(self._add)
        worker.errored.connect(self._failed)
        self._worker = worker
        self.open_button.setEnabled(False)
        self.sample_button.setEnabled(False)
        self.info.setText(message)
        self.progress.show()
        worker.start()

    def _done(self) -> None:
        self._worker = None
        if self._stream is not None or self._filling is not None:
            return  # the sample's other tilts are still to be made: :meth:`_filled` ends the load
        self.progress.hide()
        self.open_button.setEnabled(True)
        self.sample_button.setEnabled(True)

    def _abort(self) -> None:
        """A stage of the load failed: the tab is free again (a streamed sample stays as far as it was made)."""
        self._stream = None
        self._done()

    def _failed(self, exc: BaseException) -> None:
        self._done()
        self.info.setText("")
        message = str(exc) if isinstance(exc, CsptError) else f"failed: {type(exc).__name__}: {exc}"
        show_error(f"Open tilt series: {message}")

    @report_errors("Open tilt series")
    def _add(self, layers: list[Layer]) -> None:
        """Add the layers one per stage (:func:`._stages.in_own_turn`), the image first; the image and the tracks
        are added hidden and shown in the stage after (:data:`SHOWN_A_STAGE_LATER`). Adding a layer (its controls,
        its row in the layer list, the dims slider) costs 40–100 ms of GUI-thread work in software OpenGL and its
        first draw as much again: all in one turn they froze the window for their sum. The image shows ~0.1 s
        after it arrives."""
        try:
            stream = layers[0].metadata["cspt2d"].get("stream")
            if stream is not None and stream.claim():  # ours to fill: the viewer's watcher leaves it alone
                self._stream = stream
                self._made(stream.done, len(stream.order))
        except BaseException:
            self._abort()
            raise
        self._add_rest([], layers)

    @report_errors("Open tilt series")
    def _show(self, layer: Layer, added: list[Layer], rest: list[Layer]) -> None:
        """The stage after ``layer`` was added hidden (and its programs built): it is drawn (the view fitted to it if
        it is the first); the last layer is made the active one in the stage after."""
        try:
            layer.visible = True
            if len(added) == 1:
                self.viewer.reset_view()
        except BaseException:
            self._abort()
            raise
        if rest:
            self._next_stage(lambda: self._add_rest(added, rest))
        else:
            self._next_stage(lambda: self._activate(layer, added))

    @report_errors("Open tilt series")
    def _activate(self, layer: Layer, added: list[Layer]) -> None:
        """Make the last layer added the active one (picking goes there), as napari does when it adds a layer, in a
        stage of its own: napari's layer controls switch to it (and first show its controls: 20–40 ms)."""
        try:
            if layer in self.viewer.layers:
                self.viewer.layers.selection.active = layer
        except BaseException:
            self._abort()
            raise
        self._next_stage(lambda: self._add_rest(added, []))

    @staticmethod
    def _next_stage(step) -> None:
        """Run ``step`` in a turn of the event loop of its own (after the repaint of this one), before other staged
        work (e.g. a layer another widget adds when one of ours arrives): :func:`._stages.in_own_turn`."""
        in_own_turn(step, first=True)

    def _made(self, done: int, total: int) -> None:
        """Progress of the sample's tilts (the first ones are shown, the others on their way)."""
        self.progress.setRange(0, total)
        self.progress.setValue(done)
        self.progress.setFormat(f"sample tilts: {done} of {total}")

    def _filled(self) -> None:
        self._filling = None
        self.progress.setRange(0, 0)
        self.progress.setFormat("%p%")
        if self._worker is None:  # the layers are in
            self._done()

    @report_errors("Open tilt series")
    def _add_rest(self, added: list[Layer], rest: list[Layer]) -> None:
        """Add ``rest[0]`` to the viewer, the others in the next stages; when all are in, say what was opened (and
        emit :attr:`loaded` in a stage of its own: the cockpit then brings the Curate tab to the front)."""
        try:
            if rest and not added and self.viewer.dims.ndim < rest[0].ndim:
                # the viewer's sliders for the stack's dims first, in a stage of their own (a third of adding the
                # first image: ~30-40 ms of the ~90 in software OpenGL); the dims then only take its range
                self.viewer.dims.ndim = rest[0].ndim
                self._next_stage(lambda: self._add_rest(added, rest))
                return
            if rest:
                layer, rest = rest[0], rest[1:]
                later = layer.visible and layer.metadata.get("cspt2d", {}).get("role") in SHOWN_A_STAGE_LATER
                if later:
                    layer.visible = False
                # napari selects a layer it adds, switching the layer controls to it: only the last one is selected,
                # in a stage of its own after it is shown if it is added hidden (:meth:`_activate`)
                added = added + [add_unselected(self.viewer.layers, layer) if rest or later
                                 else self.viewer.add_layer(layer)]
                if later:  # its programs built in turns of their own, then shown
                    build_in_turns(self.viewer, layer, lambda: self._show(layer, added, rest))
                    return
                if len(added) == 1:
                    self.viewer.reset_view()
                if rest:
                    self._next_stage(lambda: self._add_rest(added, rest))
                    return
        except BaseException:
            self._abort()
            raise
        image = added[0]
        meta = image.metadata["cspt2d"]
        ny, nx = meta["shape_yx"]
        text = f"{meta['name']}: {image.data.shape[0]} sections, {nx}×{ny} px, {meta['pixel_A']:.3g} Å/px"
        if meta["bin"] > 1:
            text += f", shown binned ×{meta['bin']}"
        tracks = [layer for layer in added if layer.metadata.get("cspt2d", {}).get("role") == "tracks"]
        if tracks:
            ts = tracks[0].metadata["cspt2d"]["tracks"]
            text += f"; {ts.n_particles} particles, {len(ts)} points"
        self.info.setText(text)
        self._next_stage(lambda: self._announce(added))

    @report_errors("Open tilt series")
    def _announce(self, added: list[Layer]) -> None:
        """The last stage of a load: :attr:`loaded` is emitted; a streamed sample's other tilts are made from the
        next stage on (after what the receivers queued: the worker competes with the GUI thread for the
        interpreter)."""
        try:
            self.loaded.emit(added)
        finally:
            if self._stream is not None:  # after the work the receivers queued
                in_own_turn(lambda: self._fill(added[0]))
            self._done()

    @report_errors("Sample")
    def _fill(self, image: Layer) -> None:
        """Make the streamed sample's other tilts in the background (the image redrawn when the tilt it shows is
        made)."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        try:
            self._filling = fill_in_background(image, stream, on_progress=self._made, on_done=self._filled,
                                               shown=lambda: _shown_section(self.viewer, image), stop_with=self)
        except BaseException:
            self._abort()
            raise
