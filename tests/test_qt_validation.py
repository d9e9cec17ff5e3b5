"""Visual validation of refined shifts in a real, shown napari viewer (Xvfb): vectors layer, projection table,
gallery, accept/reject into the curated tracks with undo, and the Refine run end to end.

Run under pytest-xvfb (``QT_QPA_PLATFORM=offscreen`` does not work for a napari Viewer)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

from napari.layers import Vectors  # noqa: E402
from qtpy.QtCore import QPoint, Qt  # noqa: E402

from napari_cspt2d import pyp  # noqa: E402
from napari_cspt2d._qt._loader import add_layers  # noqa: E402
from napari_cspt2d._qt.params_widget import Session  # noqa: E402
from napari_cspt2d._qt.run_widget import run_job  # noqa: E402
from napari_cspt2d._qt.validation import (  # noqa: E402
    ACCEPTED,
    EDITED,
    PENDING,
    REJECTED,
    UNCHANGED,
    ShiftReview,
    ShiftValidation,
    gallery_images,
)
from napari_cspt2d._reader import points_data  # noqa: E402
from napari_cspt2d._sample_data import make_sample_data  # noqa: E402
from napari_cspt2d.model.editing import TrackDocument  # noqa: E402
from napari_cspt2d.model.params import PypParameters  # noqa: E402
from napari_cspt2d.sample import make_sample  # noqa: E402

SMALL = {"n_particles": 8, "n_tilts": 15, "shape_yx": (256, 256), "box": 32}
DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """Autosaves of edited sample tracks go to a temporary cache (not used by the screenshot test, as napari keeps
    its theme icons in the cache folder)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def refined(tmp_path_factory):
    """The small sample refined headless (one CSPT iteration) by the Run widget's job, in a pyp project."""
    sample = make_sample(**SMALL)
    root = tmp_path_factory.mktemp("project")
    params = PypParameters(sample.params)
    pyp.create_project(root, "sample", sample.stack, sample.tracks, params, angles=sample.tracks.tilts)
    session = Session(sample.stack, None, sample.tracks.tilts, TrackDocument(sample.tracks), sample.tracks, params,
                      root, "sample")
    items = list(run_job(session, "refine", lambda *a: None, lambda: False))
    assert [i.iteration for i in items] == [1, 2]
    return sample, params, items[-1], root


def open_viewer(make_napari_viewer, layers):
    viewer = make_napari_viewer(show=True)
    add_layers(viewer, layers)
    _, curation = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Tracks curation")
    return viewer, curation


def open_validation(make_napari_viewer, refined):
    sample, params, item, _ = refined
    viewer, curation = open_viewer(make_napari_viewer, make_sample_data(**SMALL))
    document = curation.document
    assert document.tracks.equals(sample.tracks)  # the same deterministic sample
    review = ShiftReview(document.tracks, item.tracks, item.residual_px)
    validation = ShiftValidation(viewer)
    validation.set_review(review, stack=sample.stack, params=params, volume=item.reconstruction.map,
                          document=document, label=item.label)
    return viewer, curation, validation


def test_review_status_follows_the_document_through_undo(refined):
    sample, _, item, _ = refined
    doc = TrackDocument(sample.tracks)
    review = ShiftReview(sample.tracks, item.tracks, item.residual_px)
    moved = review.shift_length_px > 0
    status = review.status(doc.tracks)
    assert np.all(status[moved] == PENDING) and np.all(status[~moved] == UNCHANGED)
    assert moved.mean() > 0.5 and review.shift_length_px.max() > 0.5  # the refinement moved the noisy picks
    rows = review.rows_of_particle(3)
    assert review.accept(doc, rows) == rows.size
    assert doc.undo_name == "Accept refined shifts of particle 3"
    status = review.status(doc.tracks)
    assert np.all(status[rows] == ACCEPTED) and np.all(np.delete(status, rows) != ACCEPTED)
    np.testing.assert_allclose(doc.tracks.positions_px()[review.document_rows(doc.tracks)[rows]],
                               review.after_px[rows], atol=1e-9)
    np.testing.assert_array_equal(doc.tracks.score[rows], item.tracks.score[rows])
    assert review.accept(doc, rows) == 0  # nothing left to accept
    assert review.reject(doc, rows[:1]) == 1  # back to the pick
    assert review.status(doc.tracks)[rows[0]] == REJECTED
    doc.undo()
    assert review.status(doc.tracks)[rows[0]] == ACCEPTED
    doc.undo()  # the acceptance undone: picks are back, the row the user rejected stays marked so
    status = review.status(doc.tracks)
    assert status[rows[0]] == REJECTED and np.all(np.delete(status, rows[:1]) != ACCEPTED)
    assert doc.tracks.equals(sample.tracks)
    doc.move_points([int(rows[1])], [[50.0, 60.0]])  # a hand edit since the run
    assert review.status(doc.tracks)[rows[1]] == EDITED


def test_vectors_layer_matches_the_refined_shifts(make_napari_viewer, refined, cache_home):
    sample, params, item, root = refined
    viewer, curation, validation = open_validation(make_napari_viewer, refined)
    layer = viewer.layers["refined shifts"]
    assert isinstance(layer, Vectors) and layer is validation.layer
    # the model's refined shifts: the iteration's .cistem written by the pipeline
    refined_file = pyp.Parameters.from_file(root / "frealign" / "maps" / "sample_r01_02.cistem")
    on_file = refined_file.to_trackset(sample.tracks.image_shape_yx, tilts=sample.tracks.tilts)
    picked = sample.tracks.positions_px()
    key = lambda t: t.particle * 1000 + t.tilt  # noqa: E731
    order = np.argsort(key(on_file))[np.searchsorted(np.sort(key(on_file)), key(sample.tracks))]
    expected = on_file.positions_px()[order] - picked
    start, direction = layer.data[:, 0], layer.data[:, 1]
    np.testing.assert_allclose(start, points_data(sample.tracks), atol=1e-9)  # from the picks...
    np.testing.assert_allclose(direction[:, 0], 0.0)  # ... within their tilt ...
    np.testing.assert_allclose(direction[:, [2, 1]], expected, atol=1e-3)  # ... to the refined positions (px)
    np.testing.assert_allclose(layer.features["score"], on_file.score[order], atol=1e-4)
    np.testing.assert_allclose(layer.scale, [1.0, sample.pixel_A, sample.pixel_A])
    assert layer.length > 1  # drawn exaggerated, data exact


def test_accept_in_the_widget_changes_tracks_and_undo_restores(make_napari_viewer, refined, cache_home, qtbot):
    sample, _, item, _ = refined
    viewer, curation, validation = open_validation(make_napari_viewer, refined)
    review, doc = validation.review, curation.document
    row = int(np.argsort(review.shift_length_px)[-2])
    validation.jump(row)
    assert validation.table.selected_rows() == [row]
    validation.accept_button.click()
    assert doc.undo_name.startswith("Accept refined shift (particle")
    drow = review.document_rows(doc.tracks)[row]
    np.testing.assert_allclose(doc.tracks.positions_px()[drow], review.after_px[row], atol=1e-9)
    points = curation.controller.points
    np.testing.assert_allclose(points.data[drow, [2, 1]], review.after_px[row], atol=1e-9)  # the layer follows
    qtbot.waitUntil(lambda: validation.table.source.status[row] == ACCEPTED, timeout=2000)
    assert validation.gallery.status[row] == ACCEPTED

    curation.undo_button.click()  # the curation widget's undo restores the picked position
    assert doc.tracks.equals(sample.tracks)
    qtbot.waitUntil(lambda: validation.table.source.status[row] == PENDING, timeout=2000)

    validation.accept_particle_button.click()
    rows = review.rows_of_particle(review.before.particle[row])
    assert np.all(review.status(doc.tracks)[rows] == ACCEPTED)
    validation.reject_particle_button.click()
    assert np.all(review.status(doc.tracks)[rows] == REJECTED)
    pending = int((review.status(doc.tracks) == PENDING).sum())
    validation.accept_all_button.click()
    status = review.status(doc.tracks)
    assert np.all(status[rows] == REJECTED) and np.all(np.isin(np.delete(status, rows), [ACCEPTED, UNCHANGED]))
    assert doc.undo_name == f"Accept {pending} refined shifts"


def test_table_sorts_and_jumps_to_tilt_and_particle(make_napari_viewer, refined, cache_home, qtbot):
    viewer, curation, validation = open_validation(make_napari_viewer, refined)
    review, table = validation.review, validation.table
    shifts = [float(table.model().index(r, 3).data()) for r in range(table.model().rowCount())]
    assert shifts == sorted(shifts, reverse=True)  # largest shift first
    table.sortByColumn(4, Qt.SortOrder.AscendingOrder)  # by score, worst first
    target = table.proxy.mapToSource(table.model().index(0, 0)).row()
    assert target == int(np.argmin(review.score))
    rect = table.visualRect(table.model().index(0, 1))
    qtbot.mouseClick(table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    particle, tilt = int(review.before.particle[target]), int(review.before.tilt[target])
    assert int(round(viewer.dims.point[0])) == tilt
    assert curation.controller.active_particle == particle
    assert validation.gallery.images.particle == particle and validation.gallery.current_row == target
    # clicking a gallery column jumps to that tilt
    column = 2
    row = int(validation.gallery.images.rows[column])
    x = validation.gallery.column_x(column) + validation.gallery.cell // 2
    qtbot.mouseClick(validation.gallery, Qt.MouseButton.LeftButton, pos=QPoint(x, validation.gallery.top + 10))
    assert int(round(viewer.dims.point[0])) == int(review.before.tilt[row])
    assert validation.table.selected_rows() == [row]


def test_gallery_boxes_and_reprojection(refined):
    sample, params, item, _ = refined
    review = ShiftReview(sample.tracks, item.tracks, item.residual_px)
    images = gallery_images(sample.stack, review, 2, item.reconstruction.map, params)
    n = params["extract_box"]
    assert images.picked.shape == images.refined.shape == images.reference.shape == (SMALL["n_tilts"], n, n)
    assert np.all(np.diff(images.angle_deg) > 0)
    assert np.all(sample.tracks.particle[images.rows] == 2)

    def agreement(boxes):
        return np.mean([np.corrcoef(b.ravel(), r.ravel())[0, 1] for b, r in zip(boxes, images.reference)])

    # the map's reprojection looks like the particle, and more so at the refined positions than at the picks
    assert agreement(images.refined) > 0.2
    assert agreement(images.refined) > agreement(images.picked)


def test_refine_end_to_end_with_fsc_per_iteration(make_napari_viewer, cache_home, qtbot, tmp_path):
    viewer, curation = open_viewer(make_napari_viewer, make_sample_data(**SMALL))
    _, params = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Parameters")
    _, run = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Run")
    run.map_window.show = lambda: False
    params.create_project(tmp_path / "project")
    labels = []
    run.iteration_done.connect(lambda item: labels.append((item.label, len(run.fsc_plot.curves))))
    run.refine_button.click()
    qtbot.waitUntil(lambda: not run.busy, timeout=180000)
    assert run.state == "done", run.log_view.toPlainText()
    assert labels == [("curated tracks", 1), ("iteration 2", 2)]  # the FSC plot grows per iteration
    maps = tmp_path / "project" / "frealign" / "maps"
    assert (maps / "sample_r01_02.mrc").is_file() and (maps / "sample_r01_02.cistem").is_file()
    assert run.validation is not None and run.validation.review is not None
    layer = run.validation.layer
    assert layer in viewer.layers and len(layer.data) == len(curation.document.tracks)
    assert "iteration" in run.validation.summary.text()


@pytest.mark.slow
def test_screenshots_of_run_and_validation(make_napari_viewer, qtbot, tmp_path):
    """docs/screenshot_run.png (main window with the run and FSC docks, beside the map window) and
    docs/screenshot_validation.png (shift vectors, table and gallery); written when CSPT2D_SAVE_SCREENSHOT is set."""
    layers = make_sample_data(n_particles=16, n_tilts=25, shape_yx=(512, 512), box=48, thickness_px=60.0)
    viewer, curation = open_viewer(make_napari_viewer, layers)
    window = viewer.window._qt_window
    window.resize(1600, 1000)
    params_dock, params = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Parameters")
    _, run = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Run")
    curation_dock, _ = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Tracks curation")
    window.tabifyDockWidget(curation_dock, params_dock)
    params.create_project(tmp_path / "project")
    run.refine_button.click()
    qtbot.waitUntil(lambda: not run.busy, timeout=300000)
    assert run.state == "done", run.log_view.toPlainText()
    params_dock.raise_()
    run.fsc_dock.raise_()
    viewer.reset_view()
    qtbot.wait(300)
    main = viewer.screenshot(canvas_only=False, flash=False)
    run.map_window.viewer.window.resize(760, main.shape[0])
    qtbot.wait(300)
    volume = run.map_window.viewer.screenshot(canvas_only=False, flash=False)
    height = max(main.shape[0], volume.shape[0])
    background = np.array([38, 41, 48, 255], np.uint8)  # napari's dark theme

    def pad(img):
        out = np.empty((height, *img.shape[1:]), np.uint8)
        out[:] = background[: img.shape[2]]
        out[: img.shape[0]] = img
        return out

    run_shot = np.concatenate([pad(main), pad(volume)], axis=1)
    assert run_shot[..., :3].std() > 10
    rgb = volume[..., :3].reshape(-1, 3).astype(int)
    assert (np.abs(rgb - rgb.mean(axis=1, keepdims=True)).max(axis=1) > 40).mean() > 0.01  # the orange surface

    validation = run.validation
    run_dock, _ = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Run")
    window.tabifyDockWidget(curation_dock, run_dock)
    validation.dock.raise_()
    curation_dock.raise_()
    worst = int(np.argmax(validation.review.shift_length_px))
    validation.jump(worst)
    viewer.reset_view()
    viewer.scene.camera.zoom *= 1.6
    qtbot.wait(300)
    valid_shot = viewer.screenshot(canvas_only=False, flash=False)
    canvas = viewer.screenshot(canvas_only=True, flash=False)
    assert valid_shot[..., :3].std() > 10 and canvas[..., :3].std() > 10
    if os.environ.get("CSPT2D_SAVE_SCREENSHOT"):
        from imageio.v3 import imwrite

        imwrite(DOCS / "screenshot_run.png", run_shot)
        imwrite(DOCS / "screenshot_validation.png", valid_shot)
