"""TrackDocument: named undoable actions, change notifications, residual carry-over, autosave snapshots (no display)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from napari_cspt2d.errors import CsptInputError
from napari_cspt2d.model.editing import (
    TrackDocument,
    autosave_path,
    find_recovery,
    particle_summary,
    read_snapshot,
    write_snapshot,
)
from napari_cspt2d.model.tracks import ParticleTable, TiltTable, TrackSet

SHAPE = (200, 300)


def make_tracks(n_particles: int = 4, n_tilts: int = 5, seed: int = 0) -> TrackSet:
    """Particles with non-zero 3D points and tilt axes, so shift != position - centre."""
    rng = np.random.default_rng(seed)
    tilts = TiltTable.from_angles(np.linspace(-40, 40, n_tilts), axis_deg=rng.uniform(-5, 5, n_tilts))
    ids = np.arange(1, n_particles + 1)
    particles = ParticleTable(ids, rng.uniform(-40, 40, (n_particles, 3)), rng.uniform(0, 90, (n_particles, 3)))
    pid, tid = (a.ravel() for a in np.meshgrid(ids, tilts.id, indexing="ij"))
    n = pid.size
    return TrackSet(pid, tid, rng.normal(0, 3, (n, 2)), rng.uniform(0, 1, n), np.full(n, 100.0), particles, tilts,
                    SHAPE)


def positions_by_pair(ts: TrackSet) -> dict[tuple[int, int], tuple[float, float]]:
    return {(int(p), int(t)): tuple(xy) for p, t, xy in zip(ts.particle, ts.tilt, ts.positions_px())}


@pytest.fixture
def doc() -> TrackDocument:
    return TrackDocument(make_tracks(), source="memory:test")


def test_move_undo_redo_restores_exact_states(doc):
    original = doc.tracks
    changes = []
    doc.subscribe(changes.append)
    target = np.array([[123.25, 45.5]])
    doc.move_points([7], target)
    moved = doc.tracks
    assert moved.equals(original.with_positions([7], target))  # the fast path is TrackSet.with_positions
    np.testing.assert_allclose(moved.positions_px()[7], target[0], atol=1e-9)
    others = np.delete(np.arange(len(moved)), 7)
    np.testing.assert_array_equal(moved.shift_px[others], original.shift_px[others])
    assert doc.dirty and doc.can_undo and not doc.can_redo
    assert changes[-1].kind == "edit" and changes[-1].moved_rows.tolist() == [7]
    assert "particle 2" in changes[-1].name and "tilt 2" in changes[-1].name

    assert doc.undo() == changes[-1].name
    assert doc.tracks.equals(original) and not doc.dirty
    assert changes[-1].kind == "undo" and changes[-1].moved_rows.tolist() == [7]
    assert doc.redo() is not None
    assert doc.tracks.equals(moved)
    assert doc.redo() is None and doc.can_undo


def test_new_action_clears_redo(doc):
    doc.move_points([0], [[10.0, 10.0]])
    doc.undo()
    assert doc.can_redo
    doc.move_points([1], [[20.0, 20.0]])
    assert not doc.can_redo and doc.history_names == [doc.undo_name]


def test_add_point_and_particle(doc):
    ts = doc.tracks
    row = ts.row_of(3, 2)
    doc.delete_points([row])
    assert doc.tracks.row_of(3, 2) is None and len(doc.tracks) == len(ts) - 1
    new_row = doc.add_point(3, 2, (50.0, 60.0))
    assert doc.tracks.particle[new_row] == 3 and doc.tracks.tilt[new_row] == 2
    np.testing.assert_allclose(doc.tracks.positions_px()[new_row], [50.0, 60.0], atol=1e-9)
    with pytest.raises(CsptInputError, match="already has a point"):
        doc.add_point(3, 2, (1.0, 1.0))
    with pytest.raises(CsptInputError, match="does not exist"):
        doc.add_point(99, 0, (1.0, 1.0))
    with pytest.raises(CsptInputError, match="tilt 17"):
        doc.add_point(3, 17, (1.0, 1.0))

    pid = doc.add_particle(4, (70.0, 80.0))
    assert pid == 5 and 5 in doc.tracks.particles.id
    np.testing.assert_allclose(doc.tracks.positions_px()[doc.tracks.row_of(5, 4)], [70.0, 80.0])
    # every other projection stays where it was
    before, after = positions_by_pair(ts), positions_by_pair(doc.tracks)
    for key, xy in before.items():
        if key != (3, 2):
            np.testing.assert_allclose(after[key], xy, atol=1e-9)
    assert doc.undo() == "Add particle 5"
    assert 5 not in doc.tracks.particles.id


def test_delete_particle_and_points(doc):
    ts = doc.tracks
    doc.delete_particles([2])
    assert 2 not in doc.tracks.particles.id and not np.any(doc.tracks.particle == 2)
    assert len(doc.tracks) == len(ts) - ts.n_tilts
    rows = np.flatnonzero(doc.tracks.particle == 4)
    doc.delete_points(rows)
    assert 4 not in doc.tracks.particles.id  # a particle without projections disappears
    doc.undo()
    doc.undo()
    assert doc.tracks.equals(ts)
    with pytest.raises(CsptInputError, match="particle 42"):
        doc.delete_particles([42])
    with pytest.raises(CsptInputError, match="rows"):
        doc.delete_points([len(ts)])


def test_split_then_merge_keeps_positions(doc):
    ts = doc.tracks
    before = positions_by_pair(ts)
    new_id = doc.split_particle(2, from_tilt=3)
    split = doc.tracks
    assert new_id == 5
    assert sorted(split.tilt[split.particle == 2].tolist()) == [0, 1, 2]
    assert sorted(split.tilt[split.particle == 5].tolist()) == [3, 4]
    np.testing.assert_allclose(split.particles.xyz_px[-1], ts.particles.xyz_px[1])
    with pytest.raises(CsptInputError, match="does not split"):
        doc.split_particle(2, from_tilt=0)
    with pytest.raises(CsptInputError, match="share tilts"):
        doc.merge_particles([1, 2])

    kept = doc.merge_particles([5, 2])
    assert kept == 2 and 5 not in doc.tracks.particles.id
    after = positions_by_pair(doc.tracks)
    assert after.keys() == before.keys()
    for key, xy in before.items():
        np.testing.assert_allclose(after[key], xy, atol=1e-9)


def test_merge_particles_with_different_3d_points_keeps_image_positions():
    ts = make_tracks()
    doc = TrackDocument(ts.select(~((ts.particle == 1) & (ts.tilt >= 2)) & ~((ts.particle == 3) & (ts.tilt < 2))))
    before = positions_by_pair(doc.tracks)
    doc.merge_particles([1, 3])
    after = doc.tracks
    assert set(after.particle[after.particle != 2].tolist()) <= {1, 4}
    assert sorted(after.tilt[after.particle == 1].tolist()) == [0, 1, 2, 3, 4]
    moved = {(1 if p == 3 else p, t): xy for (p, t), xy in before.items()}
    for key, xy in positions_by_pair(after).items():
        np.testing.assert_allclose(xy, moved[key], atol=1e-9)


def test_residuals_follow_projections_until_they_move(doc):
    res = np.arange(len(doc.tracks), dtype=float)
    doc.set_residuals(res)
    np.testing.assert_array_equal(doc.residual_px, res)
    doc.move_points([3], [[5.0, 5.0]])
    expected = res.copy()
    expected[3] = np.nan
    np.testing.assert_array_equal(doc.residual_px, expected)
    doc.delete_particles([1])  # rows 0..4 go away
    np.testing.assert_array_equal(doc.residual_px, expected[5:])
    doc.undo()
    doc.undo()
    np.testing.assert_array_equal(doc.residual_px, res)
    with pytest.raises(CsptInputError, match="residual_px"):
        doc.set_residuals(res[:-1])


def test_particle_summary(doc):
    ts = doc.tracks
    res = np.full(len(ts), np.nan)
    res[ts.particle == 3] = np.linspace(0, 2, ts.n_tilts)
    summary = particle_summary(doc.tracks.drop_rows([0]), np.delete(res, 0))
    assert summary.id.tolist() == [1, 2, 3, 4]
    assert summary.n_tilts.tolist() == [4, 5, 5, 5]
    np.testing.assert_allclose(summary.mean_score[1], ts.score[ts.particle == 2].mean())
    assert np.isnan(summary.max_residual_px[0]) and summary.max_residual_px[2] == 2.0


def test_history_budget_drops_oldest(doc):
    doc.max_undo = 3
    for i in range(6):
        doc.move_points([i], [[float(i), 1.0]])
    assert len(doc.history_names) == 3
    assert sum(doc.undo() is not None for _ in range(10)) == 3


def test_dirty_and_saved_notification(doc):
    kinds = []
    unsubscribe = doc.subscribe(lambda c: kinds.append(c.kind))
    doc.move_points([0], [[1.0, 2.0]])
    doc.mark_saved()
    assert not doc.dirty
    doc.undo()
    assert doc.dirty
    unsubscribe()
    doc.redo()
    assert kinds == ["edit", "saved", "undo"]


def test_document_needs_image_shape():
    ts = make_tracks()
    with pytest.raises(CsptInputError, match="image_shape_yx"):
        TrackDocument(ts.replace(image_shape_yx=None))


def test_snapshot_round_trip_is_exact(tmp_path):
    ts = make_tracks(seed=3)
    path = write_snapshot(tmp_path / "snap.npz", ts, source="somewhere")
    back, meta = read_snapshot(path)
    assert back.equals(ts) and back.image_shape_yx == ts.image_shape_yx
    assert meta["source"] == "somewhere"
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CsptInputError, match="bad.npz"):
        read_snapshot(tmp_path / "bad.npz")


def test_autosave_path_and_recovery(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = tmp_path / "tracks.json"
    source.write_text("{}")
    snap = autosave_path(source)
    assert snap.parent == tmp_path and snap.name.startswith(".tracks.json")
    assert find_recovery(source) is None
    write_snapshot(snap, make_tracks())
    assert find_recovery(source) == snap
    older = snap.stat().st_mtime - 10
    os.utime(snap, (older, older))
    assert find_recovery(source) is None  # the source was saved after the snapshot
    memory = autosave_path("sample:demo")
    assert memory.parent == tmp_path / "cache" / "napari-cspt2d" / "autosave"
    assert autosave_path("sample:demo") == memory != autosave_path("sample:other")
