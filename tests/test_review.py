"""Review of refined shifts without Qt: statuses through undo, accept/reject, the vectors and gallery the views show."""

from __future__ import annotations

import numpy as np
from conftest import GUI_SAMPLE as SMALL

from napari_cspt2d import pyp
from napari_cspt2d._reader import points_data
from napari_cspt2d.model.editing import TrackDocument
from napari_cspt2d.review import (
    ACCEPTED,
    ARROW_FACTORS,
    EDITED,
    PENDING,
    REJECTED,
    UNCHANGED,
    ShiftReview,
    arrow_factor,
    gallery_images,
    shift_vectors,
    worst_first,
)


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




def test_shift_vectors_match_the_refined_shifts_and_show_at_full_view(refined):
    sample, params, item, root = refined
    review = ShiftReview(sample.tracks, item.tracks, item.residual_px)
    vectors = shift_vectors(review)
    # the model's refined shifts: the iteration's .cistem written by the pipeline
    refined_file = pyp.Parameters.from_file(root / "frealign" / "maps" / "sample_r01_02.cistem")
    on_file = refined_file.to_trackset(sample.tracks.image_shape_yx, tilts=sample.tracks.tilts)
    picked = sample.tracks.positions_px()
    key = lambda t: t.particle * 1000 + t.tilt  # noqa: E731
    order = np.argsort(key(on_file))[np.searchsorted(np.sort(key(on_file)), key(sample.tracks))]
    expected = on_file.positions_px()[order] - picked
    start, direction = vectors.data[:, 0], vectors.data[:, 1]
    np.testing.assert_allclose(start, points_data(sample.tracks), atol=1e-9)  # from the picks...
    np.testing.assert_allclose(direction[:, 0], 0.0)  # ... within their tilt ...
    np.testing.assert_allclose(direction[:, [2, 1]], expected, atol=1e-3)  # ... to the refined positions (px)
    np.testing.assert_allclose(vectors.features["score"], on_file.score[order], atol=1e-4)
    # drawn long enough to see at full view: the median shift × N is at least 2 % of the image
    moved = review.shift_length_px[review.shift_length_px > 0]
    assert vectors.factor in ARROW_FACTORS and vectors.factor > 1
    assert vectors.factor * np.median(moved) >= 0.02 * max(sample.tracks.image_shape_yx)
    low, high = vectors.score_limits
    assert low < high and np.mean((review.score >= low) & (review.score <= high)) > 0.9


def test_arrow_factor_and_worst_first_order():
    assert arrow_factor(np.array([0.5, 1.0, 1.5]), 1000) == 20  # 1 px median -> 20 px = 2 % of 1000
    assert arrow_factor(np.array([30.0]), 1000) == 1
    assert arrow_factor(np.zeros(3), 1000) == 1  # nothing moved
    assert arrow_factor(np.array([1e-4]), 1000) == ARROW_FACTORS[-1]


def test_worst_first_is_lowest_score_then_longest_shift(refined):
    sample, _, item, _ = refined
    review = ShiftReview(sample.tracks, item.tracks, item.residual_px)
    order = worst_first(review)
    assert sorted(order.tolist()) == list(range(len(review)))
    scores = review.score[order]
    finite = np.isfinite(scores)
    assert np.all(np.diff(scores[finite]) >= 0) and order[0] == int(np.nanargmin(review.score))
