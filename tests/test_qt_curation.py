"""Curation in a real, shown napari viewer (Xvfb): layer edits become undoable model actions, keys, autosave.

Run under pytest-xvfb (``QT_QPA_PLATFORM=offscreen`` does not work for a napari Viewer)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

from napari.layers import Points, Tracks, Vectors  # noqa: E402
from napari.layers.base import ActionType  # noqa: E402
from napari.utils.notifications import notification_manager  # noqa: E402
from qtpy.QtCore import Qt  # noqa: E402

from napari_cspt2d._qt import CurationWidget  # noqa: E402
from napari_cspt2d._qt._loader import add_layers  # noqa: E402
from napari_cspt2d._qt._tracks_layer import ACTIVE_OFFSET_RADII  # noqa: E402
from napari_cspt2d._reader import points_data  # noqa: E402
from napari_cspt2d._sample_data import SAMPLE_SOURCE, make_sample_data  # noqa: E402
from napari_cspt2d.model.editing import autosave_path  # noqa: E402

SMALL = {"n_particles": 12, "n_tilts": 21, "shape_yx": (384, 384), "box": 48, "thickness_px": 60.0}
DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def sample_layers():
    return make_sample_data(**SMALL)


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def open_curation(make_napari_viewer, layers):
    viewer = make_napari_viewer(show=True)
    add_layers(viewer, layers)
    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    cockpit.show_tab("Curate")
    widget = cockpit.curate
    assert isinstance(widget, CurationWidget) and widget.controller is not None
    return viewer, widget


def layers_match_model(widget: CurationWidget) -> None:
    ctl = widget.controller
    ctl.flush()
    ts = ctl.document.tracks
    np.testing.assert_allclose(ctl.points.data, points_data(ts), atol=1e-9)
    np.testing.assert_array_equal(ctl.points.features["particle"].to_numpy(), ts.particle)
    np.testing.assert_array_equal(ctl.points.features["tilt"].to_numpy(), ts.tilt)
    assert ctl.points.metadata["cspt2d"]["tracks"] is ts
    traj = ctl.trajectories.data
    order = np.lexsort((ts.tilt, ts.particle))
    np.testing.assert_array_equal(traj[:, 0], ts.particle[order])
    np.testing.assert_allclose(traj[:, 1:], points_data(ts)[order], atol=1e-9)


def test_layers_of_the_curated_sample(make_napari_viewer, sample_layers, cache_home):
    viewer, widget = open_curation(make_napari_viewer, sample_layers)
    ctl = widget.controller
    ts = ctl.document.tracks
    assert isinstance(ctl.points, Points) and isinstance(ctl.trajectories, Tracks)
    assert isinstance(ctl.active_track, Vectors)
    assert viewer.dims.axis_labels == ("tilt", "y", "x")
    pixel = sample_layers[0][1]["scale"][-1]
    assert tuple(ctl.points.scale) == (1.0, pixel, pixel)
    assert set(ctl.points.features.columns) >= {"particle", "tilt", "score", "occupancy", "residual_px"}
    # one colour per particle, different for neighbouring particles
    colours = ctl.points.border_color
    first = {p: tuple(colours[np.flatnonzero(ts.particle == p)[0]]) for p in ts.particles.id}
    assert all(np.allclose(colours[r], first[p]) for r, p in enumerate(ts.particle))
    assert first[1] != first[2]
    np.testing.assert_allclose(ctl.points.size, 2 * ctl.radius_px)
    layers_match_model(widget)
    # the trajectories layer has exactly one track per particle
    assert np.array_equal(np.unique(ctl.trajectories.data[:, 0]), ts.particles.id)
    assert "tilt" in viewer.canvas.overlays.text.text and "°" in viewer.canvas.overlays.text.text
    assert widget.table.source.rowCount() == ts.n_particles


def test_move_point_through_layer_then_undo_redo(make_napari_viewer, sample_layers, cache_home):
    viewer, widget = open_curation(make_napari_viewer, sample_layers)
    ctl, doc = widget.controller, widget.document
    original = doc.tracks
    row = int(np.flatnonzero((original.particle == 3) & (original.tilt == 10))[0])
    layer = ctl.points
    before = layer.data[row].copy()
    # what napari's select-mode drag does: CHANGING, the points move, one CHANGED with the moved indices
    layer.events.data(value=layer.data, action=ActionType.CHANGING, data_indices=(row,), vertex_indices=((),))
    layer.data[row, 1:] += (4.5, -3.25)
    layer.events.data(value=layer.data, action=ActionType.CHANGED, data_indices=(row,), vertex_indices=((),))
    moved = doc.tracks
    assert doc.undo_name == "Move point (particle 3, tilt 10)"
    np.testing.assert_allclose(moved.positions_px()[row], before[[2, 1]] + (-3.25, 4.5), atol=1e-9)
    np.testing.assert_array_equal(np.delete(moved.shift_px, row, 0), np.delete(original.shift_px, row, 0))
    layers_match_model(widget)

    # setting the whole data array (another kind of layer edit) moves only the points that changed
    data = layer.data.copy()
    data[row + 1, 2] += 7.0
    layer.data = data
    assert doc.undo_name == "Move point (particle 3, tilt 11)" and len(doc.history_names) == 2

    widget.undo()
    widget.undo()
    assert doc.tracks.equals(original) and not doc.dirty
    layers_match_model(widget)
    np.testing.assert_allclose(layer.data[row], before)
    widget.redo()
    assert doc.tracks.equals(moved)
    layers_match_model(widget)


def test_move_through_model_refreshes_layers_and_keeps_tilt(make_napari_viewer, sample_layers, cache_home):
    viewer, widget = open_curation(make_napari_viewer, sample_layers)
    ctl, doc = widget.controller, widget.document
    doc.move_points([5, 6], [[100.0, 110.0], [120.0, 130.0]])
    np.testing.assert_allclose(ctl.points.data[[5, 6], 1:], [[110.0, 100.0], [130.0, 120.0]])
    layers_match_model(widget)
    # dragging a point into another tilt is refused: the layer snaps back to the model
    layer = ctl.points
    layer.data[7, 0] += 1
    layer.events.data(value=layer.data, action=ActionType.CHANGED, data_indices=(7,), vertex_indices=((),))
    assert doc.undo_name == "Move 2 points"
    layers_match_model(widget)


def test_add_and_delete_particles(make_napari_viewer, sample_layers, cache_home, qtbot):
    viewer, widget = open_curation(make_napari_viewer, sample_layers)
    ctl, doc = widget.controller, widget.document
    n0, p0 = len(doc.tracks), doc.tracks.n_particles
    # selecting a point makes its particle active (and overwrites napari's feature defaults)
    ctl.points.selected_data = {int(np.flatnonzero(doc.tracks.particle == 4)[0])}
    assert ctl.active_particle == 4
    viewer.dims.set_current_step(0, 7)
    assert ctl.points.selected_data == {doc.tracks.row_of(4, 7)}  # the particle's point in the new tilt
    segments = ctl.active_track.data  # the active trajectory: one segment between consecutive tilts
    track = points_data(doc.tracks, np.flatnonzero(doc.tracks.particle == 4))[:, 1:]
    assert len(segments) == doc.tracks.n_tilts - 1
    # drawn thin and beside the rings (shifted up by more than a radius), not across the particle
    beside = track - [ACTIVE_OFFSET_RADII * ctl.radius_px, 0.0]
    assert ACTIVE_OFFSET_RADII > 1.0 and ctl.active_track.edge_width < ctl.radius_px / 4
    np.testing.assert_allclose(segments[:, 0], beside[:-1])
    np.testing.assert_allclose(segments[:, 0] + segments[:, 1], beside[1:])

    widget.delete_particle()  # Shift+D
    assert 4 not in doc.tracks.particles.id and len(doc.tracks) == n0 - doc.tracks.n_tilts
    layers_match_model(widget)

    widget.new_particle()
    assert ctl.points.mode == "add" and ctl.active_particle is None
    ctl.points.add([7.0, 50.0, 60.0])  # what a click in add mode does
    qtbot.waitUntil(lambda: doc.tracks.n_particles == p0, timeout=2000)
    new_id = int(doc.tracks.particles.id.max())
    assert new_id == p0 + 1 and ctl.active_particle == new_id
    assert doc.undo_name == f"Add particle {new_id}"
    row = doc.tracks.row_of(new_id, 7)
    np.testing.assert_allclose(doc.tracks.positions_px()[row], [60.0, 50.0])
    assert ctl.points.selected_data == {row}
    # next tilt: a click adds the second point of the same particle
    widget.next_tilt()
    ctl.points.add([8.0, 52.0, 61.0])
    qtbot.waitUntil(lambda: doc.tracks.row_of(new_id, 8) is not None, timeout=2000)
    assert doc.tracks.n_particles == p0
    layers_match_model(widget)
    assert int(ctl.points.features["particle"].iloc[doc.tracks.row_of(new_id, 8)]) == new_id

    # delete the selected point through the layer (napari's Delete key)
    ctl.points.selected_data = {doc.tracks.row_of(new_id, 8)}
    ctl.points.remove_selected()
    assert doc.tracks.row_of(new_id, 8) is None and doc.undo_name == f"Delete point (particle {new_id}, tilt 8)"
    layers_match_model(widget)
    for _ in range(4):
        widget.undo()
    assert len(doc.tracks) == n0 and 4 in doc.tracks.particles.id
    layers_match_model(widget)


def test_merge_and_split_from_the_widget(make_napari_viewer, sample_layers, cache_home):
    viewer, widget = open_curation(make_napari_viewer, sample_layers)
    ctl, doc = widget.controller, widget.document
    ctl.set_active_particle(2)
    viewer.dims.set_current_step(0, 12)
    widget.split_here()
    new_id = ctl.active_particle
    assert sorted(doc.tracks.tilt[doc.tracks.particle == new_id].tolist()) == list(range(12, 21))
    widget.refresh_table()
    widget.table.show_particle(2)
    widget.table.select_particle(new_id, add=True)
    assert widget.table.selected_particles() == [2, new_id]
    widget.merge_selected()
    assert new_id not in doc.tracks.particles.id and ctl.active_particle == 2
    assert np.count_nonzero(doc.tracks.particle == 2) == 21
    layers_match_model(widget)


def test_keyboard_navigation(make_napari_viewer, sample_layers, cache_home, qtbot):
    viewer, widget = open_curation(make_napari_viewer, sample_layers)
    ctl, doc = widget.controller, widget.document
    canvas = viewer.window._qt_viewer.canvas.native
    canvas.setFocus()
    start = viewer.dims.current_step[0]
    qtbot.keyClick(canvas, Qt.Key.Key_BracketRight)
    assert viewer.dims.current_step[0] == start + 1
    qtbot.keyClick(canvas, Qt.Key.Key_BracketLeft)
    assert viewer.dims.current_step[0] == start
    qtbot.keyClick(canvas, Qt.Key.Key_Period)
    assert ctl.active_particle == 1
    qtbot.keyClick(canvas, Qt.Key.Key_Period)
    assert ctl.active_particle == 2
    qtbot.keyClick(canvas, Qt.Key.Key_Comma)
    assert ctl.active_particle == 1
    assert widget.table.selected_particles() == [1]
    visible = ctl.trajectories.visible
    qtbot.keyClick(canvas, Qt.Key.Key_T)
    assert ctl.trajectories.visible is not visible

    # residuals: R goes to the particle with the largest residual, in its worst tilt
    worst_particle, worst_tilt = 6, 15
    row = doc.tracks.row_of(worst_particle, worst_tilt)
    doc.move_points([row], doc.tracks.positions_px()[[row]] + 40.0)
    widget.fit_residuals()
    assert np.all(np.isfinite(ctl.points.features["residual_px"]))
    qtbot.keyClick(canvas, Qt.Key.Key_R)
    assert ctl.active_particle == worst_particle and viewer.dims.current_step[0] == worst_tilt
    qtbot.keyClick(canvas, Qt.Key.Key_R)  # again: the next worst
    assert ctl.active_particle != worst_particle
    # the table sorted by largest residual puts the worst particle first, and keeps the selection
    widget.refresh_table()
    widget.table.sortByColumn(3, Qt.SortOrder.DescendingOrder)
    first = widget.table.proxy.mapToSource(widget.table.proxy.index(0, 0)).row()
    assert widget.table.source.particle_at(first) == worst_particle
    assert widget.table.selected_particles() == [ctl.active_particle]

    qtbot.keyClick(canvas, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    assert doc.can_redo and not doc.can_undo
    qtbot.keyClick(canvas, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier)
    assert doc.undo_name.startswith("Move point")


def test_errors_become_notifications(make_napari_viewer, sample_layers, cache_home):
    viewer, widget = open_curation(make_napari_viewer, sample_layers)
    n = len(notification_manager.records)
    widget.merge_selected()  # nothing selected in the table
    widget.delete_point()  # no point selected
    viewer.layers.selection.active = widget.controller.points
    widget.controller.points.mode = "select"
    messages = [r.message for r in notification_manager.records[n:]]
    assert any(m.startswith("Merge:") and "particle(s) selected" in m for m in messages)
    assert any(m.startswith("Delete point:") and "no point is selected" in m for m in messages)
    widget.next_particle()  # napari and the widget keep working
    assert widget.controller.active_particle == 1


@pytest.mark.slow
def test_autosave_and_recovery_after_closing_without_saving(make_napari_viewer, sample_layers, cache_home, qtbot):
    viewer, widget = open_curation(make_napari_viewer, sample_layers)
    doc = widget.document
    doc.move_points([3], [[200.0, 210.0]])
    doc.delete_particles([5])
    edited = doc.tracks
    snapshot = autosave_path(SAMPLE_SOURCE)
    assert snapshot.parent.is_relative_to(cache_home)
    qtbot.waitUntil(snapshot.exists, timeout=5000)
    viewer.close()

    viewer2, widget2 = open_curation(make_napari_viewer, sample_layers)
    assert widget2.recovery_offered and not widget2.recovery_frame.isHidden()
    widget2.recover_button.click()
    assert widget2.document.tracks.equals(edited)
    assert widget2.document.undo_name == "Recover autosave"
    layers_match_model(widget2)

    # saving removes the autosave; later edits are autosaved beside the saved file
    out = widget2.save(cache_home / "saved.json")
    assert out[0].exists() and not snapshot.exists() and not widget2.document.dirty
    assert widget2.controller.points.metadata["cspt2d"]["source"] == str(out[0])
    widget2.document.delete_particles([1])
    qtbot.waitUntil(autosave_path(out[0]).exists, timeout=5000)
    assert autosave_path(out[0]).parent == cache_home


def test_screenshot_of_curated_sample(make_napari_viewer, qtbot, request):
    if not os.environ.get("CSPT2D_SAVE_SCREENSHOT"):  # napari's theme icons live in the user cache folder
        request.getfixturevalue("cache_home")
    layers = make_sample_data(n_particles=20, n_tilts=31, shape_yx=(512, 512), box=48, thickness_px=60.0)
    viewer, widget = open_curation(make_napari_viewer, layers)
    viewer.window._qt_window.resize(1366, 768)  # a laptop screen
    widget.controller.set_active_particle(7)
    viewer.dims.set_current_step(0, 15)
    widget.fit_residuals()
    widget.refresh_table()
    widget.controller.flush()
    qtbot.wait(1000)  # let the window lay out its docks at the new size (the cockpit fits its width)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=False, flash=False)
    assert shot.ndim == 3 and shot.shape[0] > 300 and shot.shape[1] > 500
    assert shot[..., :3].std() > 10  # not blank
    canvas = viewer.screenshot(canvas_only=True, flash=False)
    rgb = canvas[..., :3].reshape(-1, 3).astype(int)
    saturated = np.abs(rgb - rgb.mean(axis=1, keepdims=True)).max(axis=1) > 60
    assert saturated.mean() > 0.002  # the coloured tracks are drawn over the grey image
    if os.environ.get("CSPT2D_SAVE_SCREENSHOT"):
        from imageio.v3 import imwrite

        DOCS.mkdir(exist_ok=True)

        imwrite(DOCS / "cockpit_curate_1366x768.png", shot)
