"""recon/autotrack.py on a synthetic tilt series: Gaussian beads on noise, known 3D positions, geometry.py
projection."""

from __future__ import annotations

import numpy as np
import pytest

from napari_cspt2d.errors import CsptCancelled, CsptInputError
from napari_cspt2d.model.tracks import TiltTable, TrackSet
from napari_cspt2d import geometry
from napari_cspt2d.recon import autotrack, trackfit

SHAPE = (200, 220)
AXIS = 6.0
OPTIONS = autotrack.AutotrackOptions(box_px=20, search_px=7, n_ref=5)


@pytest.fixture(scope="module")
def series():
    """(stack (T, ny, nx), tilts, true 3D points (P, 3), true positions (P, T, 2))."""
    rng = np.random.default_rng(11)
    angles = np.arange(-60.0, 61.0, 4.0)
    n_t, n_p = len(angles), 6
    xyz = np.column_stack([rng.uniform(-60, 60, n_p), rng.uniform(-60, 60, n_p), rng.uniform(-25, 25, n_p)])
    xyz[0] = [-70.0, -65.0, 20.0]
    pid = np.repeat(np.arange(n_p), n_t)
    tid = np.tile(np.arange(n_t), n_p)
    truth = geometry.positions_from_shifts(xyz[pid], angles[tid], np.full(pid.size, AXIS), np.zeros((pid.size, 2)),
                                           SHAPE)
    stack = rng.normal(0.0, 1.0, (n_t,) + SHAPE).astype(np.float32)
    for (x, y), t in zip(truth, tid):
        x0, y0 = int(x) - 12, int(y) - 12
        yy, xx = np.mgrid[y0:y0 + 25, x0:x0 + 25]
        stack[t, y0:y0 + 25, x0:x0 + 25] -= 4.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.2**2))
    return stack, TiltTable.from_angles(angles, axis_deg=AXIS), xyz, truth.reshape(n_p, n_t, 2)


def picked_tracks(series, tilt_rows=(14, 15, 16), noise=0.25, particles=None):
    _, tilts, xyz, truth = series
    rng = np.random.default_rng(2)
    particles = range(len(xyz)) if particles is None else particles
    pid = np.repeat(list(particles), len(tilt_rows))
    tid = np.tile(tilt_rows, len(list(particles)))
    pos = truth[pid, tid] + rng.normal(0, noise, (pid.size, 2))
    return TrackSet.from_positions(pid, tid, pos, tilts, SHAPE)


def test_tracks_every_bead_through_the_series(series):
    stack, tilts, xyz, truth = series
    tracks = picked_tracks(series)
    calls = []
    result = autotrack.autotrack_all(tracks, stack, options=OPTIONS, progress=lambda *a: calls.append(a))
    assert calls == [("autotrack", k + 1, len(xyz)) for k in range(len(xyz))]
    out = result.tracks
    assert result.accepted.mean() > 0.95 and len(out) > 0.95 * len(xyz) * len(tilts)
    err = np.linalg.norm(out.positions_px() - truth[out.particle, out.tilt], axis=1)
    assert np.median(err) < 0.5 and np.percentile(err, 95) < 1.2
    assert np.nanmin(result.confidence[result.accepted]) >= OPTIONS.min_confidence
    # picked projections are untouched
    for row in range(len(tracks)):
        new_row = out.row_of(int(tracks.particle[row]), int(tracks.tilt[row]))
        np.testing.assert_array_equal(out.positions_px()[new_row], tracks.positions_px()[row])
    conf = result.confidence_of_rows()
    assert np.isnan(conf).sum() == len(tracks) and np.nanmin(conf) >= OPTIONS.min_confidence
    fit = trackfit.fit_tracks(out)
    assert np.median(np.linalg.norm(fit.xyz_px - xyz, axis=1)) < 0.5


def test_pick_on_empty_background_is_rejected(series):
    stack = series[0]
    tracks = picked_tracks(series, particles=[1])
    empty = np.array([[30.0, 30.0], [30.0, 30.0], [30.0, 30.0]]) + geometry.image_center_px(SHAPE) + [0, 40]
    ghost = tracks.append([9, 9, 9], [14, 15, 16], empty - geometry.image_center_px(SHAPE))
    result = autotrack.autotrack_all(ghost, stack, options=OPTIONS)
    ghost_rows = result.particle == 9
    assert result.accepted[ghost_rows].mean() < 0.3
    assert result.accepted[~ghost_rows].mean() > 0.95
    assert np.nanmedian(result.confidence[ghost_rows]) < np.nanmedian(result.confidence[~ghost_rows]) - 0.3


def test_single_particle_and_subset_of_tilts(series):
    stack = series[0]
    tracks = picked_tracks(series, tilt_rows=(15,), particles=[2, 3])
    result = autotrack.autotrack_particle(tracks, stack, 2, options=OPTIONS)
    assert set(result.particle) == {2}
    limited = autotrack.autotrack_all(tracks, stack, tilt_ids=[12, 13, 17], options=OPTIONS)
    assert set(limited.tilt) == {12, 13, 17}


def test_cancel_stops_without_touching_input(series):
    stack, _, _, _ = series
    tracks = picked_tracks(series)
    seen = []

    def cancel():
        seen.append(1)
        return len(seen) > 2

    with pytest.raises(CsptCancelled):
        autotrack.autotrack_all(tracks, stack, options=OPTIONS, cancel=cancel)
    assert len(seen) == 3 and len(tracks) == 18


def test_bad_input(series):
    stack, _, _, _ = series
    tracks = picked_tracks(series)
    with pytest.raises(CsptInputError, match="images"):
        autotrack.autotrack_all(tracks, stack[:, :50, :50], options=OPTIONS)
    with pytest.raises(CsptInputError, match="particle_ids"):
        autotrack.autotrack_all(tracks, stack, particle_ids=[42], options=OPTIONS)
    with pytest.raises(CsptInputError, match="box_px"):
        autotrack.AutotrackOptions(box_px=4)
    with pytest.raises(CsptInputError, match="min_confidence"):
        autotrack.AutotrackOptions(min_confidence=2.0)


def test_cli_autotrack(series, tmp_path, capsys):
    import mrcfile

    from napari_cspt2d import cli
    from napari_cspt2d.io.trackdata import read_track_data, write_track_data

    stack, _, _, truth = series
    with mrcfile.new(tmp_path / "ts.mrc") as mrc:
        mrc.set_data(stack)
    write_track_data(tmp_path / "picks.json", picked_tracks(series))
    code = cli.main(["autotrack", str(tmp_path / "picks.json"), str(tmp_path / "ts.mrc"), "--out",
                     str(tmp_path / "out.json"), "--box", "20", "--search", "7"])
    assert code == 0 and "accepted" in capsys.readouterr().out
    out = read_track_data(tmp_path / "out.json")
    assert len(out) > 0.95 * truth.shape[0] * truth.shape[1]
    err = np.linalg.norm(out.positions_px() - truth[out.particle, out.tilt], axis=1)
    assert np.median(err) < 0.6
