"""The "Tracks curation" dock widget: keyboard-first hand curation of 2D tracks, with undo, autosave and recovery.

It adopts a tracks Points layer made by napari-cspt2d (reader, sample data or the loader widget), wraps its TrackSet
in a :class:`~napari_cspt2d.model.editing.TrackDocument` and lets a :class:`TracksLayerController` keep the layers in
step. Keys (viewer-wide while the widget is open):

=====================  =====================================================================
``Ctrl+Z``             undo the last action (moves, additions, deletions, merges, splits)
``Ctrl+Shift+Z``       redo
``]`` / ``[``          next / previous tilt (napari's ``→`` / ``←`` work too)
``.`` / ``,``          next / previous particle
``R``                  particle with the largest residual (again: the next largest)
``T``                  show / hide the trajectories
``N``                  new particle: the next click (add mode) starts a particle
``Shift+D``            delete the active particle
``Delete``             delete the selected point (napari)
=====================  =====================================================================
"""

from __future__ import annotations

import datetime
import os
import uuid
from pathlib import Path

import numpy as np
from napari.layers import Layer, Points, Tracks
from napari.utils.notifications import show_info, show_warning
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .._reader import tracks_layer_data, trajectory_layer_data
from .._writer import TRACK_SAVE_SUFFIXES, save_tracks
from ..errors import CsptInputError
from ..model.editing import Change, TrackDocument, find_recovery, particle_summary, read_snapshot
from ..model.tracks import TrackSet
from ._autosave import Autosaver
from ._guard import report_errors
from ._lifecycle import WindowCloseWatcher
from ._loader import DEFAULT_RADIUS_A
from ._owner import CockpitState, state_of
from ._particle_table import ParticleTableView
from ._tilt_overlay import connect_tilt_view, tilt_label, tiltseries_layer
from ._tracks_layer import TracksLayerController

__all__ = ["CurationWidget", "KEYS"]

TABLE_DELAY_MS = 150

#: key -> (method name, description)
KEYS: dict[str, tuple[str, str]] = {
    "Control-Z": ("undo", "undo"),
    "Control-Shift-Z": ("redo", "redo"),
    "]": ("next_tilt", "next tilt"),
    "[": ("previous_tilt", "previous tilt"),
    ".": ("next_particle", "next particle"),
    ",": ("previous_particle", "previous particle"),
    "R": ("worst_particle", "largest residual"),
    "T": ("toggle_trajectories", "trajectories on/off"),
    "N": ("new_particle", "new particle"),
    "Shift-D": ("delete_particle", "delete particle"),
}


def _is_tracks_layer(layer) -> bool:
    return isinstance(layer, Points) and layer.metadata.get("cspt2d", {}).get("role") == "tracks"


class CurationWidget(QWidget):
    """Dock widget for curating the tracks of a tilt series (see the module docstring for keys)."""

    def __init__(self, napari_viewer, state: CockpitState | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state_owner = state if state is not None else state_of(napari_viewer)
        self.controller: TracksLayerController | None = None
        self.autosaver: Autosaver | None = None
        self._documents: dict[int, TrackDocument] = {}
        self._recovery: TrackSet | None = None
        self._last_worst: int | None = None  # R again goes on to the next worst particle
        self._build_ui()
        self._table_timer = QTimer(self)
        self._table_timer.setSingleShot(True)
        self._table_timer.setInterval(TABLE_DELAY_MS)
        self._table_timer.timeout.connect(self.refresh_table)
        self._disconnect_overlay = connect_tilt_view(napari_viewer)
        napari_viewer.layers.events.inserted.connect(self._on_layer_inserted)
        napari_viewer.layers.events.removed.connect(self._on_layer_removed)
        napari_viewer.dims.events.current_step.connect(self._update_labels)
        self._bind_keys()
        self._close_watcher = WindowCloseWatcher(self, self.close_session)
        self._refresh_combo()
        tracks_layers = [layer for layer in napari_viewer.layers if _is_tracks_layer(layer)]
        if tracks_layers:
            self.bind_layer(tracks_layers[-1])
        self._update_labels()

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        row = QHBoxLayout()
        row.addWidget(QLabel("Tracks layer:"))
        self.layer_combo = QComboBox()
        self.layer_combo.currentIndexChanged.connect(self._on_combo)
        row.addWidget(self.layer_combo, 1)
        self.new_tracks_button = QPushButton("New")
        self.new_tracks_button.setToolTip("A new, empty tracks layer for the open tilt series (pick from scratch)")
        self.new_tracks_button.clicked.connect(lambda _=False: self.new_tracks())
        row.addWidget(self.new_tracks_button)
        layout.addLayout(row)

        self.recovery_frame = QFrame()
        self.recovery_frame.setFrameShape(QFrame.Shape.StyledPanel)
        banner = QHBoxLayout(self.recovery_frame)
        self.recovery_label = QLabel()
        self.recovery_label.setWordWrap(True)
        self.recover_button = QPushButton("Recover")
        self.discard_button = QPushButton("Discard")
        self.recover_button.clicked.connect(lambda _=False: self.recover())
        self.discard_button.clicked.connect(lambda _=False: self.discard_recovery())
        banner.addWidget(self.recovery_label, 1)
        banner.addWidget(self.recover_button)
        banner.addWidget(self.discard_button)
        self.recovery_frame.hide()
        layout.addWidget(self.recovery_frame)

        self.particle_label = QLabel()
        self.tilt_label = QLabel()
        layout.addWidget(self.particle_label)
        layout.addWidget(self.tilt_label)

        grid = QGridLayout()
        buttons = [
            ("undo_button", "Undo", self.undo, "Ctrl+Z"),
            ("redo_button", "Redo", self.redo, "Ctrl+Shift+Z"),
            ("new_button", "New particle", self.new_particle, "N: the next click in add mode starts a particle"),
            ("delete_point_button", "Delete point", self.delete_point, "Delete the selected point(s) (Delete)"),
            ("delete_particle_button", "Delete particle", self.delete_particle, "Shift+D"),
            ("merge_button", "Merge selected", self.merge_selected, "Merge the particles selected in the table"),
            ("split_button", "Split at tilt", self.split_here,
             "Tilts from this one on become a new particle"),
            ("fit_button", "Fit 3D (residuals)", self.fit_residuals,
             "Fit each particle's 3D point to its track and show the residuals"),
            ("worst_button", "Worst residual", self.worst_particle, "R"),
            ("lines_button", "Trajectories", self.toggle_trajectories, "T"),
            ("save_button", "Save…", self.save_dialog, "Save as track_data .json/.pkl or a .cistem pair"),
            ("load_button", "Load…", self.load_dialog, "Replace the tracks by a file's (undoable)"),
        ]
        for i, (attr, text, slot, tip) in enumerate(buttons):
            button = QPushButton(text)
            button.setToolTip(tip)
            button.clicked.connect(lambda _=False, s=slot: s())
            setattr(self, attr, button)
            grid.addWidget(button, i // 2, i % 2)
        layout.addLayout(grid)

        self.table = ParticleTableView()
        self.table.particle_clicked.connect(self._on_table_clicked)
        layout.addWidget(self.table, 1)
        self.status_label = QLabel()
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)
        keys = ", ".join(f"{k.replace('Control', 'Ctrl')} {d}" for k, (_, d) in KEYS.items())
        help_label = QLabel(f"Keys: {keys}; Delete removes the selected point.")
        help_label.setWordWrap(True)
        help_label.setStyleSheet("color: gray")
        layout.addWidget(help_label)

    def _bind_keys(self) -> None:
        for key, (method, _) in KEYS.items():
            handler = getattr(self, method)
            self.viewer.bind_key(key, lambda viewer, h=handler: h(), overwrite=True)

    def _unbind_keys(self) -> None:
        for key in KEYS:
            self.viewer.bind_key(key, None)

    # ------------------------------------------------------------------ layer adoption
    def _tracks_layers(self) -> list[Points]:
        return [layer for layer in self.viewer.layers if _is_tracks_layer(layer)]

    def _refresh_combo(self) -> None:
        current = self.controller.points if self.controller is not None else None
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        for layer in self._tracks_layers():
            self.layer_combo.addItem(layer.name)
        if current is not None:
            self.layer_combo.setCurrentText(current.name)
        self.layer_combo.blockSignals(False)

    @report_errors("Tracks layer")
    def _on_layer_inserted(self, event) -> None:
        layer = event.value
        self._refresh_combo()
        if _is_tracks_layer(layer):  # napari makes it the active layer after this (unless added unselected, e.g. by
            self.bind_layer(layer, select=False)  # the loader, which makes it active in a turn of its own)

    @report_errors("Tracks layer")
    def _on_layer_removed(self, event) -> None:
        layer = event.value
        self._documents.pop(id(layer), None)
        if self.controller is not None and layer is self.controller.points:
            self.unbind()
            remaining = self._tracks_layers()
            if remaining:
                self.bind_layer(remaining[-1])
        self._refresh_combo()

    @report_errors("Tracks layer")
    def _on_combo(self, index: int) -> None:
        layers = self._tracks_layers()
        if 0 <= index < len(layers) and (self.controller is None or layers[index] is not self.controller.points):
            self.bind_layer(layers[index])

    def bind_layer(self, points: Points, *, select: bool = True) -> None:
        """Curate ``points`` (a tracks layer): wrap its tracks in a document, attach the layers, offer recovery;
        ``select``: make it the viewer's active layer (picking goes there)."""
        self.unbind()
        meta = points.metadata["cspt2d"]
        source = meta.get("source") or f"napari-cspt2d:layer:{points.name}"
        document = self._documents.get(id(points))
        if document is None:
            document = TrackDocument(meta["tracks"], source=source)
            self._documents[id(points)] = document
        trajectories = next((layer for layer in self.viewer.layers if isinstance(layer, Tracks)
                             and layer.metadata.get("cspt2d", {}).get("uid") == meta.get("uid")), None)
        self.controller = TracksLayerController(self.viewer, document, points, trajectories)
        self.controller.active_particle_changed.connect(self._on_active_changed)
        self.controller.tracks_changed.connect(self._on_tracks_changed)
        self.autosaver = Autosaver(document, source, parent=self)
        self.autosaver.saved.connect(self._on_autosaved)
        self._refresh_combo()
        if select:
            self.viewer.layers.selection.active = points
        self.state_owner.set_document(document, self.controller)
        self._check_recovery()
        self.refresh_table()
        self._update_labels()

    def unbind(self) -> None:
        """Stop curating the current layer (its autosave is flushed; the layers stay)."""
        if self.autosaver is not None:
            self.autosaver.close()
            self.autosaver = None
        if self.controller is not None:
            self.controller.close()
            self.controller = None
            self.state_owner.set_document(None)
        self.recovery_frame.hide()
        self._recovery = None

    @property
    def document(self) -> TrackDocument | None:
        return None if self.controller is None else self.controller.document

    def _require(self) -> TracksLayerController:
        if self.controller is None:
            raise CsptInputError("no tracks layer to curate", field="layer",
                                 expected="tracks opened with napari-cspt2d (loader widget, File > Open or sample)")
        return self.controller

    # ------------------------------------------------------------------ recovery
    def _check_recovery(self) -> None:
        source = self.autosaver.key
        snapshot = find_recovery(source)
        if snapshot is None:
            return
        try:
            tracks, meta = read_snapshot(snapshot)
        except CsptInputError as exc:
            show_warning(f"Ignoring an unreadable autosave: {exc}")
            return
        current = self.document.tracks
        if tracks.equals(current) or tracks.image_shape_yx != current.image_shape_yx:
            return
        when = datetime.datetime.fromtimestamp(meta.get("time", snapshot.stat().st_mtime)).strftime("%Y-%m-%d %H:%M")
        self._recovery = tracks
        self.recovery_label.setText(f"Unsaved edits from {when} were found ({tracks.n_particles} particles, "
                                    f"{len(tracks)} points). Recover them?")
        self.recovery_frame.show()

    @property
    def recovery_offered(self) -> bool:
        return self._recovery is not None

    @report_errors("Recover")
    def recover(self) -> None:
        """Replace the tracks by the autosaved ones (one undoable action)."""
        if self._recovery is None:
            return
        tracks, self._recovery = self._recovery, None
        self.recovery_frame.hide()
        self._require().document.set_tracks(tracks, "Recover autosave")
        self._status("Recovered the autosaved tracks (Ctrl+Z undoes the recovery).")

    @report_errors("Discard autosave")
    def discard_recovery(self) -> None:
        self._recovery = None
        self.recovery_frame.hide()
        if self.autosaver is not None:
            self.autosaver.discard()

    # ------------------------------------------------------------------ document changes
    def _on_tracks_changed(self, change: Change) -> None:
        if change.kind in ("edit", "undo", "redo") and self._recovery is not None:
            self._recovery = None  # edited since: the autosave now holds these edits
            self.recovery_frame.hide()
        if change.kind != "saved":
            self._table_timer.start()
        verb = {"edit": "", "undo": "Undid: ", "redo": "Redid: "}.get(change.kind)
        if verb is not None:
            self._status(f"{verb}{change.name}")
        self._update_labels()

    def _on_active_changed(self, particle) -> None:
        self.table.show_particle(particle)
        self._update_labels()

    def _on_autosaved(self, path: Path) -> None:
        self._status(f"Autosaved {datetime.datetime.now():%H:%M:%S} ({path.name})")

    def _status(self, text: str) -> None:
        self.status_label.setText(text)

    def refresh_table(self) -> None:
        """Recompute the particle table now."""
        self._table_timer.stop()
        doc = self.document
        if doc is not None:
            self.table.set_summary(particle_summary(doc.tracks, doc.residual_px))
            if self.controller.active_particle is not None:
                self.table.show_particle(self.controller.active_particle)

    def _update_labels(self, event=None) -> None:
        doc, ctl = self.document, self.controller
        self.tilt_label.setText(tilt_label(self.viewer))
        if doc is None:
            self.particle_label.setText("No tracks layer: open a stack with tracks, a track file or the sample.")
        else:
            ts = doc.tracks
            active = ctl.active_particle
            dirty = " (unsaved)" if doc.dirty else ""
            if active is None:
                text = f"{ts.n_particles} particles, {len(ts)} points{dirty}. No particle selected."
            else:
                tilts = int(np.count_nonzero(ts.particle == active))
                text = f"Particle {active}: {tilts} of {ts.n_tilts} tilts{dirty}"
            self.particle_label.setText(text)
        for button, can, name in ((self.undo_button, doc is not None and doc.can_undo, doc and doc.undo_name),
                                  (self.redo_button, doc is not None and doc.can_redo, doc and doc.redo_name)):
            button.setEnabled(bool(can))
            button.setToolTip(f"{button.text()}: {name}" if name else button.text())

    # ------------------------------------------------------------------ actions
    @report_errors("Undo")
    def undo(self) -> None:
        if self._require().document.undo() is None:
            self._status("Nothing to undo.")

    @report_errors("Redo")
    def redo(self) -> None:
        if self._require().document.redo() is None:
            self._status("Nothing to redo.")

    def _tilt_axis(self) -> int:
        labels = list(self.viewer.dims.axis_labels)
        return labels.index("tilt") if "tilt" in labels else 0

    def _step_tilt(self, delta: int) -> None:
        axis = self._tilt_axis()
        steps = self.viewer.dims.nsteps[axis]
        step = int(np.clip(self.viewer.dims.current_step[axis] + delta, 0, steps - 1))
        self.viewer.dims.set_current_step(axis, step)

    @report_errors("Next tilt")
    def next_tilt(self) -> None:
        self._step_tilt(+1)

    @report_errors("Previous tilt")
    def previous_tilt(self) -> None:
        self._step_tilt(-1)

    def _step_particle(self, delta: int) -> None:
        ctl = self._require()
        ids = ctl.document.tracks.particles.id
        if not ids.size:
            return
        if ctl.active_particle is None:
            target = ids[0] if delta > 0 else ids[-1]
        else:
            pos = int(np.searchsorted(ids, ctl.active_particle))
            pos = pos + delta if delta < 0 or (pos < ids.size and ids[pos] == ctl.active_particle) else pos
            target = ids[pos % ids.size]
        ctl.set_active_particle(int(target), center=True)

    @report_errors("Next particle")
    def next_particle(self) -> None:
        self._step_particle(+1)

    @report_errors("Previous particle")
    def previous_particle(self) -> None:
        self._step_particle(-1)

    @report_errors("Largest residual")
    def worst_particle(self) -> None:
        """Go to the particle with the largest residual, in the tilt where it is largest; again: the next one."""
        ctl = self._require()
        doc = ctl.document
        residual = doc.residual_px
        if not np.isfinite(residual).any():
            show_info("No residuals yet: press 'Fit 3D (residuals)' first.")
            return
        summary = particle_summary(doc.tracks, residual)
        known = np.isfinite(summary.max_residual_px)
        order = summary.id[known][np.argsort(-summary.max_residual_px[known], kind="stable")].tolist()
        if ctl.active_particle is not None and ctl.active_particle == self._last_worst and self._last_worst in order:
            target = order[(order.index(self._last_worst) + 1) % len(order)]
        else:
            target = order[0]
        self._last_worst = target
        rows = np.flatnonzero(doc.tracks.particle == target)
        worst_row = rows[np.nanargmax(residual[rows])]
        axis = self._tilt_axis()
        self.viewer.dims.set_current_step(axis, int(doc.tracks.tilt[worst_row]))
        ctl.set_active_particle(target, center=True)

    @report_errors("Trajectories")
    def toggle_trajectories(self) -> None:
        layer = self._require().trajectories
        layer.visible = not layer.visible

    @report_errors("New particle")
    def new_particle(self) -> None:
        ctl = self._require()
        ctl.set_active_particle(None)
        self.viewer.layers.selection.active = ctl.points
        ctl.points.mode = "add"
        self._status("Click on the particle to place its first point; then step through the tilts and click again.")

    @report_errors("Delete point")
    def delete_point(self) -> None:
        ctl = self._require()
        rows = sorted(ctl.points.selected_data)
        if not rows:
            raise CsptInputError("no point is selected", field="selection", expected="a selected point")
        ctl.document.delete_points(rows)

    @report_errors("Delete particle")
    def delete_particle(self) -> None:
        ctl = self._require()
        particles = self.table.selected_particles() if ctl.active_particle is None else [ctl.active_particle]
        if not particles:
            raise CsptInputError("no particle is selected", field="particle", expected="an active particle")
        ctl.document.delete_particles(particles)

    @report_errors("Merge")
    def merge_selected(self) -> None:
        ctl = self._require()
        particles = self.table.selected_particles()
        if len(particles) < 2:
            raise CsptInputError(f"{len(particles)} particle(s) selected in the table", field="particles",
                                 expected="two or more (Ctrl+click rows)")
        ctl.set_active_particle(ctl.document.merge_particles(particles))

    @report_errors("Split")
    def split_here(self) -> None:
        ctl = self._require()
        if ctl.active_particle is None:
            raise CsptInputError("no particle is selected", field="particle", expected="an active particle")
        ctl.set_active_particle(ctl.document.split_particle(ctl.active_particle, ctl.current_tilt()))

    @report_errors("Fit 3D")
    def fit_residuals(self) -> None:
        """Fit each particle's 3D point to its track (robust least squares) and attach the residuals."""
        from ..recon.trackfit import fit_tracks

        doc = self._require().document
        fit = fit_tracks(doc.tracks)
        doc.set_residuals(np.hypot(fit.residual_px[:, 0], fit.residual_px[:, 1]))
        self._status(f"Fit 3D: mean residual {fit.mean_residual_px:.2f} px, rms {fit.rms_px:.2f} px. "
                     "R jumps to the worst particle.")

    @report_errors("New tracks")
    def new_tracks(self) -> None:
        """Add an empty tracks layer for the top tilt series and curate it (then N and clicks add particles)."""
        image = tiltseries_layer(self.viewer)
        if image is None:
            raise CsptInputError("no tilt series is open", field="stack",
                                 expected="a tilt stack opened with napari-cspt2d (loader widget or File > Open)")
        meta = image.metadata["cspt2d"]
        if meta.get("tilts") is None:
            raise CsptInputError("has no tilt angles", file=meta.get("path"), field="angles",
                                 expected="the stack opened with its angles (Tilt-series loader)")
        tracks = TrackSet.empty(meta["tilts"], tuple(meta["shape_yx"]))
        uid = uuid.uuid4().hex
        pixel = meta["pixel_A"]
        source = f"napari-cspt2d:new:{meta.get('path') or meta['name']}"
        for data, kwargs, kind in (
            trajectory_layer_data(tracks, name=f"{meta['name']} trajectories", pixel_A=pixel, uid=uid),
            tracks_layer_data(tracks, name=f"{meta['name']} tracks", pixel_A=pixel, radius_px=DEFAULT_RADIUS_A / pixel,
                              source=source, uid=uid),
        ):
            self.viewer.add_layer(Layer.create(data, kwargs, kind))  # the tracks layer is adopted on insertion

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str]) -> list[Path]:
        """Save the current tracks (``.json``/``.pkl``/``.cistem`` by suffix); the autosave is removed, and later
        autosaves go beside the saved file."""
        ctl = self._require()
        ctl.flush()
        meta = ctl.points.metadata["cspt2d"]
        written = save_tracks(path, ctl.document.tracks, pixel_A=ctl.pixel_A, microscope=meta.get("microscope"))
        ctl.document.mark_saved()  # removes the autosave snapshot
        meta["source"] = str(written[0])  # reopening the saved file finds later autosaves
        self.autosaver.set_key(written[0])
        self._status(f"Saved {', '.join(p.name for p in written)}")
        return written

    @report_errors("Save")
    def save_dialog(self) -> None:
        self._require()
        path, _ = QFileDialog.getSaveFileName(self, "Save tracks", "", "track_data (*.json *.pkl);;pyp (*.cistem)")
        if path:
            if not path.lower().endswith(TRACK_SAVE_SUFFIXES):
                path += ".json"
            self.save(path)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Replace the current tracks by those in ``path`` (one undoable action)."""
        from .._reader import read_trackset

        doc = self._require().document
        tracks = read_trackset(path, doc.tracks.image_shape_yx)
        doc.set_tracks(tracks, f"Load {Path(path).name}")

    @report_errors("Load")
    def load_dialog(self) -> None:
        self._require()
        path, _ = QFileDialog.getOpenFileName(self, "Load tracks", "",
                                              "Tracks (*.json *.pkl *.cistem *.fid *.mod)")
        if path:
            self.load(path)

    # ------------------------------------------------------------------ table and window
    @report_errors("Particle table")
    def _on_table_clicked(self, particle: int) -> None:
        self._require().set_active_particle(particle, center=True)

    def close_session(self) -> None:
        """Flush the autosave and detach from the viewer (called when the napari window closes)."""
        self.unbind()
        self._table_timer.stop()
        self._disconnect_overlay()
        for event, handler in ((self.viewer.layers.events.inserted, self._on_layer_inserted),
                               (self.viewer.layers.events.removed, self._on_layer_removed),
                               (self.viewer.dims.events.current_step, self._update_labels)):
            try:
                event.disconnect(handler)
            except (TypeError, ValueError, RuntimeError):
                pass
        self._unbind_keys()
