"""The cockpit's Validate tab in a real, shown napari viewer (Xvfb): the vectors layer (made once, updated in place),
colour bar and ×N, worst-first navigation, projection table, gallery (made in a worker), accept/reject into the curated
tracks with undo.

Run under pytest-xvfb (``QT_QPA_PLATFORM=offscreen`` does not work for a napari Viewer)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("cache_home")]

from napari.layers import Vectors  # noqa: E402
from qtpy.QtCore import QPoint, Qt  # noqa: E402

from conftest import GUI_SAMPLE as SMALL  # noqa: E402
from napari_cspt2d._qt._loader import add_layers  # noqa: E402
from napari_cspt2d._qt._stages import pending  # noqa: E402
from napari_cspt2d._qt.validation import add_shift_vectors_layer  # noqa: E402
from napari_cspt2d._sample_data import make_sample_data  # noqa: E402
from napari_cspt2d.review import ACCEPTED, PENDING, REJECTED, UNCHANGED, ShiftReview, shift_vectors  # noqa: E402


def open_validation(make_napari_viewer, refined):
    """The cockpit on the sample, showing the refinement's review in its Validate tab."""
    sample, params, item, _ = refined
    viewer = make_napari_viewer(show=True)
    add_layers(viewer, make_sample_data(**SMALL))
    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    curation, validation = cockpit.curate, cockpit.validate
    document = curation.document
    assert document.tracks.equals(sample.tracks)  # the same deterministic sample
    review = ShiftReview(document.tracks, item.tracks, item.residual_px)
    cockpit.show_tab("Validate")
    validation.set_review(review, stack=sample.stack, params=params, volume=item.reconstruction.map,
                          document=document, label=item.label, iteration=item.iteration)
    return viewer, curation, validation


def wait_gallery(qtbot, validation, particle: int) -> None:
    qtbot.waitUntil(lambda: validation.gallery.images is not None and validation.gallery.images.particle == particle,
                    timeout=30000)


def test_vectors_layer_colour_bar_and_worst_first(make_napari_viewer, refined, qtbot):
    sample, params, item, _ = refined
    viewer, curation, validation = open_validation(make_napari_viewer, refined)
    review = validation.review
    layer = viewer.layers["refined shifts"]
    assert isinstance(layer, Vectors) and validation.layer == layer  # (the cockpit holds napari's proxy of it)
    vectors = shift_vectors(review)
    np.testing.assert_allclose(layer.data, vectors.data)
    np.testing.assert_allclose(layer.scale, [1.0, sample.pixel_A, sample.pixel_A])
    assert layer.length == vectors.factor > 1 and layer.edge_width == vectors.width_px  # exaggerated, data exact
    assert f"×{vectors.factor}" in validation.colour_bar.text()
    assert f"{vectors.score_limits[0]:.2f}" in validation.colour_bar.text()
    # it opened on the worst projection (lowest score); "Next worse" walks on, "Worst first" comes back
    worst = int(np.nanargmin(review.score))
    assert validation.table.selected_rows() == [worst]
    wait_gallery(qtbot, validation, int(review.before.particle[worst]))
    qtbot.mouseClick(validation.next_button, Qt.MouseButton.LeftButton)
    second = validation.table.selected_rows()[0]
    assert second != worst and review.score[second] >= review.score[worst]
    assert int(round(viewer.dims.point[0])) == int(review.before.tilt[second])
    qtbot.mouseClick(validation.worst_button, Qt.MouseButton.LeftButton)
    assert validation.table.selected_rows() == [worst]
    # a new review (other shifts: other scores, colour range, arrows) updates the same layer in place, coloured as a
    # layer made afresh from its vectors
    rng, n = np.random.default_rng(1), len(review)
    after = review.after.with_positions(np.arange(n), review.after_px + rng.normal(0.0, 3.0, (n, 2)))
    after = after.replace(score=rng.uniform(0.2, 0.6, n))
    again = ShiftReview(review.before, after)
    validation.set_review(again, stack=sample.stack, params=params, volume=item.reconstruction.map,
                          document=curation.document, label="again")
    assert viewer.layers["refined shifts"] is layer and [lyr.name for lyr in viewer.layers].count("refined shifts") == 1
    new_vectors = shift_vectors(again)
    np.testing.assert_allclose(layer.data, new_vectors.data)
    assert not np.allclose(layer.data, vectors.data)
    assert tuple(layer.edge_contrast_limits) == pytest.approx(new_vectors.score_limits)
    assert layer.length == new_vectors.factor and layer.edge_width == new_vectors.width_px
    fresh = add_shift_vectors_layer(viewer, new_vectors, sample.pixel_A)
    np.testing.assert_allclose(layer.edge_color, fresh.edge_color)
    viewer.layers.remove(fresh)


def test_accept_in_the_widget_changes_tracks_and_undo_restores(make_napari_viewer, refined, cache_home, qtbot):
    sample, _, item, _ = refined
    viewer, curation, validation = open_validation(make_napari_viewer, refined)
    review, doc = validation.review, curation.document
    row = int(np.argsort(review.shift_length_px)[-2])
    validation.jump(row)
    assert validation.table.selected_rows() == [row]
    wait_gallery(qtbot, validation, int(review.before.particle[row]))
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
    wait_gallery(qtbot, validation, particle)  # made in a worker
    assert validation.gallery.current_row == target
    # clicking a gallery column jumps to that tilt
    column = 2
    row = int(validation.gallery.images.rows[column])
    x = validation.gallery.column_x(column) + validation.gallery.cell // 2
    qtbot.mouseClick(validation.gallery, Qt.MouseButton.LeftButton, pos=QPoint(x, validation.gallery.top + 10))
    assert int(round(viewer.dims.point[0])) == int(review.before.tilt[row])
    assert validation.table.selected_rows() == [row]


def test_the_shifts_layer_is_prepared_without_ever_taking_the_selection(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    add_layers(viewer, make_sample_data(**SMALL))
    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    validation = cockpit.validate
    picking = viewer.layers.selection.active
    assert picking is not None and "refined shifts" not in viewer.layers
    activated = []
    viewer.layers.selection.events.active.connect(lambda event: activated.append(event.value))
    validation.prepare_layer(0.5)
    qtbot.waitUntil(lambda: "refined shifts" in viewer.layers, timeout=5000)
    layer = viewer.layers["refined shifts"]
    assert validation.layer == layer and not layer.visible and len(layer.data) == 0
    np.testing.assert_allclose(layer.scale, [1.0, 0.5, 0.5])
    # the layer controls never switched to it: the picking layer stayed the active one throughout
    assert activated == [] and viewer.layers.selection.active is picking
    validation.prepare_layer(0.5)  # a second call keeps the one layer
    qtbot.wait(50)
    assert [lyr.name for lyr in viewer.layers].count("refined shifts") == 1


def test_a_staged_review_shows_its_vectors_and_worst_a_turn_later_and_a_newer_review_wins(make_napari_viewer, refined,
                                                                                        qtbot):
    sample, params, item, _ = refined
    viewer, curation, validation = open_validation(make_napari_viewer, refined)
    review, layer = validation.review, viewer.layers["refined shifts"]
    rng, n = np.random.default_rng(2), len(review)
    after = review.after.with_positions(np.arange(n), review.after_px + rng.normal(0.0, 3.0, (n, 2)))
    other = ShiftReview(review.before, after.replace(score=rng.uniform(0.2, 0.6, n)))
    other_worst = int(np.nanargmin(other.score))
    assert other_worst != validation.table.selected_rows()[0]
    kwargs = dict(stack=sample.stack, params=params, volume=item.reconstruction.map, document=curation.document)
    validation.set_review(other, label="staged", staged=True, **kwargs)
    # the table and summary at once; the vectors and the jump to the worst wait for turns of their own
    assert validation.review is other and "staged" in validation.summary.text()
    assert not np.allclose(layer.data, shift_vectors(other).data) and pending() > 0
    qtbot.waitUntil(lambda: pending() == 0, timeout=5000)
    np.testing.assert_allclose(layer.data, shift_vectors(other).data)
    assert validation.table.selected_rows() == [other_worst]
    assert int(round(viewer.dims.point[0])) == int(other.before.tilt[other_worst])
    # a review shown before the staged steps ran: they are dropped, the newer one stays on screen
    validation.set_review(review, label="staged again", staged=True, **kwargs)
    validation.set_review(other, label="newest", **kwargs)
    qtbot.waitUntil(lambda: pending() == 0, timeout=5000)
    np.testing.assert_allclose(layer.data, shift_vectors(other).data)
    assert validation.table.selected_rows() == [other_worst] and "newest" in validation.summary.text()


def test_a_staged_jump_goes_to_the_tilt_then_the_particle_and_an_active_particle_is_only_centred(
        make_napari_viewer, refined, qtbot):
    sample, params, item, _ = refined
    viewer, curation, validation = open_validation(make_napari_viewer, refined)
    review, controller = validation.review, curation.controller
    kwargs = dict(stack=sample.stack, params=params, volume=item.reconstruction.map, document=curation.document)
    qtbot.waitUntil(lambda: pending() == 0, timeout=5000)
    # staged: the vectors, the worst's tilt and its particle are three steps, each in an event-loop turn of its own
    validation.set_review(review, label="staged", staged=True, **kwargs)
    assert pending() == 3
    qtbot.waitUntil(lambda: pending() == 0, timeout=5000)
    worst = int(np.nanargmin(review.score))
    assert validation.table.selected_rows() == [worst]
    assert int(round(viewer.dims.point[0])) == int(review.before.tilt[worst])
    assert controller.active_particle == int(review.before.particle[worst])
    # another projection of the active particle, at another tilt: the tilt changes, the view is centred on it, the
    # particle (its track, its defaults) is not made active again
    particle = int(review.before.particle[worst])
    tilt = review.before.tilt[worst]
    other = next(int(r) for r in review.rows_of_particle(particle) if review.before.tilt[r] != tilt)
    made_active, centred = [], []
    controller.set_active_particle = lambda *a, **k: made_active.append(a)
    controller.center_on_active = lambda: centred.append(True)
    validation.jump(other)
    assert made_active == [] and centred == [True]
    assert int(round(viewer.dims.point[0])) == int(review.before.tilt[other])
    assert validation.table.selected_rows() == [other]
    # a projection of another particle makes that one active
    another = next(int(r) for r in range(len(review)) if int(review.before.particle[r]) != particle)
    validation.jump(another)
    assert made_active == [(int(review.before.particle[another]),)]


def test_a_history_entry_whose_review_is_shown_leaves_the_view_where_the_user_is(make_napari_viewer, refined, qtbot):
    from types import SimpleNamespace

    viewer, curation, validation = open_validation(make_napari_viewer, refined)
    qtbot.waitUntil(lambda: pending() == 0, timeout=5000)
    review = validation.review
    row = int(validation._order[3])
    validation.jump(row)
    tilt = int(round(viewer.dims.point[0]))
    # e.g. the last finished run's step, shown again after a cancelled run that made no step of its own
    validation.show_entry(SimpleNamespace(result=SimpleNamespace(review=review),
                                          session=SimpleNamespace(document=curation.document)))
    assert pending() == 0 and validation.review is review
    qtbot.wait(60)
    assert validation.table.selected_rows() == [row] and int(round(viewer.dims.point[0])) == tilt
