"""``TracksLayerController``: keeps napari layers in step with a :class:`TrackDocument` (the single source of truth).

Layers (all views of the document):

* the tracks Points layer ``(tilt, y, x)``, one ring per projection, coloured per particle, features particle, tilt,
  angle_deg, score, occupancy, residual_px;
* a Tracks layer with every particle's whole trajectory (so a jump stands out), refreshed shortly after an edit
  (it is the slow one: ~0.2 s for 100k projections);
* a 2D Vectors layer with the active particle's trajectory: a thin line drawn beside the rings (shifted
  :data:`ACTIVE_OFFSET_RADII` particle radii up), so it never covers the particle being judged.

A layer edit (``points.events.data`` with its action and indices) becomes one document action; the layers are then
refreshed from the document. A move refreshes only the moved rows; anything else rebuilds the Points layer.
Selecting a point makes its particle the active one; stepping through tilts selects the active particle's point in
each tilt, so it can be dragged or deleted at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
from napari.layers import Layer, Points, Tracks, Vectors
from napari.layers.base import ActionType
from napari.utils.notifications import show_info
from qtpy.QtCore import QObject, QTimer, Signal

from .._reader import (
    particle_colors,
    points_data,
    points_features,
    trajectory_data,
    trajectory_layer_data,
)
from .._writer import tracks_from_layer
from ..errors import CsptInputError
from ..model.editing import Change, TrackDocument
from ._guard import report_errors
from ._layer_update import add_unselected
from ._stages import in_own_turn

__all__ = ["TracksLayerController", "active_track_layer"]

TRAJECTORY_DELAY_MS = 250
#: The active trajectory runs this many particle radii above the rings, its width 1/ACTIVE_WIDTH_DIVISOR radius.
ACTIVE_OFFSET_RADII = 1.3
ACTIVE_WIDTH_DIVISOR = 20


def active_track_layer(name: str, pixel_A: float, radius_px: float) -> Vectors:
    """The empty active-trajectory layer (2D, stack pixels of ``pixel_A`` Å; its width follows the particle radius
    ``radius_px``), not yet in a viewer."""
    return Vectors(np.zeros((0, 2, 2)), ndim=2, name=name, scale=(pixel_A, pixel_A), edge_color="white",
                   edge_width=max(1.0, radius_px / ACTIVE_WIDTH_DIVISOR), vector_style="line", opacity=0.9,
                   metadata={"cspt2d": {"role": "active-track"}})


class TracksLayerController(QObject):
    """Binds ``document`` to the tracks ``points`` layer of ``viewer`` (plus trajectories and the active track).

    Signals: ``active_particle_changed(object)`` (particle id or None) and ``tracks_changed(object)`` (the
    :class:`Change`) after the layers were refreshed."""

    active_particle_changed = Signal(object)
    tracks_changed = Signal(object)

    def __init__(self, viewer, document: TrackDocument, points: Points, trajectories: Tracks | None = None) -> None:
        super().__init__()
        self.viewer = viewer
        self.document = document
        self.points = points
        meta = points.metadata["cspt2d"] = dict(points.metadata.get("cspt2d", {}))  # own copy: it is updated
        self.pixel_A = float(meta.get("pixel_A", points.scale[-1]))
        self.radius_px = float(meta.get("radius_px", np.mean(points.size) / 2 if len(points.size) else 20.0))
        self._active: int | None = None
        self._syncing = False
        self._pending_added: list[int] = []
        self._hidden_while_empty = not len(document.tracks)
        if trajectories is None:
            data, kwargs, kind = trajectory_layer_data(document.tracks, name=f"{points.name} trajectories",
                                                        pixel_A=self.pixel_A, uid=meta.get("uid"))
            trajectories = viewer.add_layer(Layer.create(data, kwargs, kind))
        self.trajectories = trajectories
        shows_document = self._shows(document.tracks)
        self.active_track = self._make_active_layer()
        self._trajectory_timer = QTimer(self)
        self._trajectory_timer.setSingleShot(True)
        self._trajectory_timer.setInterval(TRAJECTORY_DELAY_MS)
        self._trajectory_timer.timeout.connect(self.refresh_trajectories)
        if shows_document:  # layers fresh from the reader: nothing to redraw
            meta["tracks"] = document.tracks
            self._refresh_active_track()
        else:
            self.refresh_all()
        self._unsubscribe = document.subscribe(self._on_change)
        points.events.data.connect(self._on_layer_data)
        points.selected_data.events.items_changed.connect(self._on_layer_selection)
        viewer.dims.events.current_step.connect(self._on_step)
        viewer.layers.events.removed.connect(self._on_layer_removed)
        self._closed = False

    # ------------------------------------------------------------------ life cycle
    def close(self) -> None:
        """Disconnect from the layers and the document (the layers stay)."""
        if self._closed:
            return
        self._closed = True
        self._trajectory_timer.stop()
        self._unsubscribe()
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            self.points.events.data.disconnect(self._on_layer_data)
            self.points.selected_data.events.items_changed.disconnect(self._on_layer_selection)
            self.viewer.dims.events.current_step.disconnect(self._on_step)
            self.viewer.layers.events.removed.disconnect(self._on_layer_removed)

    def _on_layer_removed(self, event) -> None:
        if event.value is self.points:
            self.close()

    @contextlib.contextmanager
    def _sync(self) -> Iterator[None]:
        previous, self._syncing = self._syncing, True
        try:
            yield
        finally:
            self._syncing = previous

    def _make_active_layer(self) -> Vectors:
        """The active-trajectory layer: the viewer's if it has one, else made now and added to the viewer in a later
        turn of the event loop of its own (its controls and visual cost 40–60 ms in software OpenGL; the tracks layer
        being bound is added in this turn). It is updated from the document either way."""
        name = f"{self.points.name} active"
        for layer in self.viewer.layers:
            if isinstance(layer, Vectors) and layer.name == name:
                return layer
        layer = active_track_layer(name, self.pixel_A, self.radius_px)
        in_own_turn(self.add_active_layer)
        return layer

    def add_active_layer(self) -> None:
        """Add the active-trajectory layer to the viewer (done in a later turn after binding; nothing if it is in
        already, or if the controller was closed or its tracks layer removed meanwhile)."""
        if self._closed or self.points not in self.viewer.layers or self.active_track in self.viewer.layers:
            return
        add_unselected(self.viewer.layers, self.active_track)  # picking goes on where it was
    # ------------------------------------------------------------------ model -> layers
    def current_tilt(self) -> int:
        """The tilt id (stack section) shown in the viewer."""
        return int(round(self.points.world_to_data(self.viewer.dims.point)[0]))

    def _shows(self, tracks) -> bool:
        """Whether the Points and trajectories layers already show ``tracks``."""
        points, features = self.points.data, self.points.features
        if not len(tracks):
            return not len(points)
        if len(points) != len(tracks) or len(self.trajectories.data) != len(tracks) or "particle" not in features:
            return False
        return (np.array_equal(features["particle"].to_numpy(), tracks.particle)
                and np.array_equal(points, points_data(tracks))
                and np.array_equal(self.trajectories.data, trajectory_data(tracks)[0]))

    def refresh_all(self) -> None:
        """Rebuild every layer from the document."""
        self._rebuild_points()
        self.refresh_trajectories()
        self._refresh_active_track()

    def _on_change(self, change: Change) -> None:
        if change.kind == "saved":
            self.tracks_changed.emit(change)
            return
        ts = self.document.tracks
        if change.kind == "residuals":
            with self._sync():
                self.points.features["residual_px"] = self.document.residual_px
        elif change.moved_rows is not None and len(self.points.data) == len(ts):
            self._refresh_rows(change.moved_rows)
        else:
            self._rebuild_points()
        if change.kind != "residuals":
            self._trajectory_timer.start()
        if self._active is not None and self._active not in set(ts.particles.id.tolist()):
            self.set_active_particle(None)
        else:
            self._refresh_active_track()
            self._select_active_in_current_tilt()
        self.tracks_changed.emit(change)

    def _refresh_rows(self, rows: np.ndarray) -> None:
        ts = self.document.tracks
        coords = points_data(ts, rows)
        with self._sync():
            self.points.metadata["cspt2d"]["tracks"] = ts
            data = self.points.data
            if not np.array_equal(data[rows], coords):
                data[rows] = coords
                self.points.refresh(extent=False, thumbnail=False)
            residual = self.document.residual_px
            features = self.points.features
            if not np.array_equal(features["residual_px"].to_numpy()[rows], residual[rows], equal_nan=True):
                features.loc[features.index[rows], "residual_px"] = residual[rows]

    def _rebuild_points(self) -> None:
        """Make the Points layer show the document; only what differs is set (after a layer-made deletion the
        layer already shows it: ~1 ms instead of ~0.1 s per property for 100k points)."""
        ts = self.document.tracks
        keep = self._selected_pairs()
        data = points_data(ts)
        features = points_features(ts, self.document.residual_px)
        colors = particle_colors(ts.particle)
        layer = self.points
        with self._sync():
            self.points.metadata["cspt2d"]["tracks"] = ts
            if layer.data.shape != data.shape or not np.array_equal(layer.data, data):
                layer.data = data
            if not _same_table(layer.features, features):
                layer.features = features
            if len(ts) and not np.array_equal(layer.border_color, colors):
                layer.border_color = colors
            layer.selected_data = {r for r in (ts.row_of(p, t) for p, t in keep) if r is not None}

    def _selected_pairs(self) -> list[tuple[int, int]]:
        features = self.points.features
        if not len(features) or "particle" not in features:
            return []
        rows = [r for r in self.points.selected_data if r < len(features)]
        return [(int(features["particle"].iat[r]), int(features["tilt"].iat[r])) for r in rows]

    def refresh_trajectories(self) -> None:
        """Redraw the trajectories (napari re-sorts Tracks rows and drops features on new data: both are set)."""
        self._trajectory_timer.stop()
        data, features = trajectory_data(self.document.tracks)
        layer = self.trajectories
        if len(data) == 0:  # napari has no empty Tracks layer: hide the old lines
            self._hidden_while_empty = self._hidden_while_empty or layer.visible
            layer.visible = False
            return
        layer.color_by = "track_id"  # the new data drops the features, and with them "colour"
        layer.data = data
        layer.features = features
        layer.color_by = "colour"
        if self._hidden_while_empty:
            layer.visible, self._hidden_while_empty = True, False

    def flush(self, *, trajectories: bool = True) -> None:
        """Apply pending layer additions and (unless ``trajectories`` is False) the pending trajectory refresh now
        (tests, benchmarks, saving)."""
        self._apply_pending_added()
        if trajectories and self._trajectory_timer.isActive():
            self.refresh_trajectories()

    # ------------------------------------------------------------------ active particle
    @property
    def active_particle(self) -> int | None:
        return self._active

    def set_active_particle(self, particle: int | None, *, center: bool = False) -> None:
        """Make ``particle`` the active one (None: no particle); ``center`` moves the view onto its point."""
        if particle is not None:
            particle = int(particle)
            if particle not in set(self.document.tracks.particles.id.tolist()):
                raise CsptInputError(f"particle {particle} does not exist", field="particle",
                                     expected="an existing particle id")
        changed = particle != self._active
        self._active = particle
        with self._sync():
            self.points.feature_defaults = {**self.points.feature_defaults.iloc[0].to_dict(),
                                            "particle": -1 if particle is None else particle}
        self._refresh_active_track()
        self._select_active_in_current_tilt()
        if center and particle is not None:
            self.center_on_active()
        if changed:
            self.active_particle_changed.emit(particle)

    def _refresh_active_track(self) -> None:
        """Draw the active particle's trajectory (segments between its consecutive tilts) on every tilt."""
        ts = self.document.tracks
        rows = np.flatnonzero(ts.particle == self._active) if self._active is not None else np.zeros(0, int)
        yx = points_data(ts, rows[np.argsort(ts.tilt[rows], kind="stable")])[:, 1:]
        yx[:, 0] -= ACTIVE_OFFSET_RADII * self.radius_px  # beside (above) the rings, not across the particle
        segments = np.stack([yx[:-1], np.diff(yx, axis=0)], axis=1) if len(yx) >= 2 else np.zeros((0, 2, 2))
        if len(segments) or len(self.active_track.data):
            with self._sync():
                self.active_track.data = segments

    def _select_active_in_current_tilt(self) -> None:
        if self._active is None:
            return
        row = self.document.tracks.row_of(self._active, self.current_tilt())
        with self._sync():
            self.points.selected_data = set() if row is None else {row}

    def center_on_active(self) -> None:
        """Centre the view on the active particle's point in the current tilt (or its nearest tilt)."""
        ts = self.document.tracks
        rows = np.flatnonzero(ts.particle == self._active)
        if not rows.size:
            return
        row = rows[np.argmin(np.abs(ts.tilt[rows] - self.current_tilt()))]
        _, y, x = points_data(ts, np.array([row]))[0]
        self.viewer.scene.camera.center = (y * self.pixel_A, x * self.pixel_A)

    # ------------------------------------------------------------------ layers -> model
    @report_errors("Track edit")
    def _on_layer_data(self, event) -> None:
        if self._syncing:
            return
        action = event.action
        try:
            if action == ActionType.ADDED:
                n = len(self.points.data)
                self._pending_added.extend(int(i) + n if i < 0 else int(i) for i in event.data_indices)
                QTimer.singleShot(0, self._apply_pending_added)  # napari selects the new point after this event
            elif action == ActionType.REMOVED:
                self.document.delete_points(np.asarray(event.data_indices, dtype=np.int64))
            elif action == ActionType.CHANGED:
                self._apply_layer_changes(np.asarray(event.data_indices, dtype=np.int64))
        except Exception:
            self._rebuild_points()  # the layer shows the model again
            raise

    def _apply_layer_changes(self, rows: np.ndarray) -> None:
        ts = self.document.tracks
        data = self.points.data
        if len(data) != len(ts):
            self.document.apply("Edit points", tracks_from_layer(data, self.points.features, self.points.metadata))
            return
        rows = rows[(rows >= 0) & (rows < len(ts))]
        model = points_data(ts, rows)
        if not np.array_equal(np.round(data[rows, 0]), model[:, 0]):
            self._refresh_rows(rows)
            show_info("A point keeps its tilt; add a point in the other tilt instead.")
            return
        changed = rows[np.any(data[rows, 1:] != model[:, 1:], axis=1)]
        if changed.size:
            self.document.move_points(changed, data[changed][:, [2, 1]])

    @report_errors("Add point")
    def _apply_pending_added(self) -> None:
        rows, self._pending_added = self._pending_added, []
        if not rows:
            return
        try:
            data = self.points.data
            ts = self.document.tracks
            if len(rows) != 1 or len(data) != len(ts) + 1:
                self.document.apply("Add points", tracks_from_layer(data, self.points.features, self.points.metadata))
                return
            tilt, y, x = data[rows[0]]
            tilt = int(round(tilt))
            active = self._active
            if active is not None and ts.row_of(active, tilt) is None:
                self.document.add_point(active, tilt, (x, y))
                new_particle = active
            else:
                new_particle = self.document.add_particle(tilt, (x, y))
                if active is not None:
                    show_info(f"Particle {active} already has a point in tilt {tilt}: started particle "
                              f"{new_particle}.")
            self.set_active_particle(new_particle)
        except Exception:
            self._rebuild_points()
            raise

    @report_errors("Select point")
    def _on_layer_selection(self, *_) -> None:
        if self._syncing:
            return
        rows = [r for r in self.points.selected_data if r < len(self.document.tracks)]
        particles = {int(self.document.tracks.particle[r]) for r in rows}
        if len(particles) == 1:
            particle = particles.pop()
            if particle != self._active:
                self._active = particle
                self._refresh_active_track()
                self.active_particle_changed.emit(particle)

    @report_errors("Change tilt")
    def _on_step(self, *_) -> None:
        self._select_active_in_current_tilt()


def _same_table(a, b) -> bool:
    """Whether two feature tables hold the same columns and values (NaN equal to NaN)."""
    if len(a) != len(b) or list(a.columns) != list(b.columns):
        return False
    return all(np.array_equal(a[c].to_numpy(), b[c].to_numpy(), equal_nan=b[c].dtype.kind == "f") for c in b.columns)
