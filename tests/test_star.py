"""io/star.py: RELION 5 tomography stars (projection model, round trips) and the Warp/cryoDRGN particle-series star."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import starfile

from napari_cspt2d.errors import CsptInputError
from napari_cspt2d.io import star
from napari_cspt2d.recon import trackfit

SHAPE = (3710, 3838)  # EMPIAR-10164 tilt images (ny, nx)


@pytest.fixture(scope="module")
def relion(request):
    shared = request.getfixturevalue("shared_data")
    series = star.read_relion5_tomograms(shared / "relion5" / "Tomograms" / "job006" / "tomograms.star")
    tracks = star.read_relion5_particles(shared / "relion5" / "Picks" / "job019" / "particles.star", series, SHAPE)
    return shared, series, tracks


def _rotation(axis, degrees):
    """Right-handed rotation about a unit axis (Rodrigues), written independently of geometry.py."""
    a = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], dtype=float)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _relion_positions(series, centered_A, shape_yx):
    """RELION 5's projection written out with 4x4 matrices: P = S(c_img) S(shift) Rz Ry Rx S(-int(size/2))."""
    ny, nx = shape_yx
    w, h, d = series.tomogram_size
    out = np.empty((len(centered_A), len(series.tilts), 2))
    t = series.table
    for f in range(len(series.tilts)):
        m = np.eye(4)
        m[:3, :3] = (_rotation([0, 0, 1], t.rlnTomoZRot.iloc[f]) @ _rotation([0, 1, 0], t.rlnTomoYTilt.iloc[f])
                     @ _rotation([1, 0, 0], t.rlnTomoXTilt.iloc[f]))
        s0 = np.eye(4)
        s0[:3, 3] = [-(w // 2), -(h // 2), -(d // 2)]
        s12 = np.eye(4)
        s12[:2, 3] = [nx // 2 + t.rlnTomoXShiftAngst.iloc[f] / series.pixel_A,
                      ny // 2 + t.rlnTomoYShiftAngst.iloc[f] / series.pixel_A]
        p = centered_A / series.pixel_A + np.array([w, h, d]) / 2.0
        out[:, f] = ((s12 @ m @ s0) @ np.column_stack([p, np.ones(len(p))]).T).T[:, :2]
    return out


def test_tomograms_star(relion):
    shared, series, _ = relion
    assert list(series) == ["TS_01", "TS_03", "TS_43", "TS_45", "TS_54"]
    ts = series["TS_01"]
    raw = starfile.read(shared / "relion5" / "Tomograms" / "job006" / "tilt_series" / "TS_01.star")
    assert len(ts.tilts) == 40 and ts.pixel_A == 1.35 and ts.tomogram_size == (4000, 4000, 2000) and ts.hand == -1
    np.testing.assert_array_equal(ts.tilts.angle_deg, raw.rlnTomoYTilt)
    np.testing.assert_array_equal(ts.tilts.axis_deg, raw.rlnTomoZRot)
    np.testing.assert_allclose(ts.shift_px * 1.35, raw[["rlnTomoXShiftAngst", "rlnTomoYShiftAngst"]], atol=1e-12)
    np.testing.assert_allclose(ts.tilts.accumulated_dose(), raw.rlnMicrographPreExposure, atol=1e-9)
    np.testing.assert_allclose(ts.tilts.defocus_um, (raw.rlnDefocusU + raw.rlnDefocusV) / 2e4)
    assert ts.tilts.order[np.argmin(np.abs(ts.tilts.angle_deg))] == 0 and np.median(ts.tilts.dose) == 3.0


@pytest.mark.parametrize("shape, size", [(SHAPE, (4000, 4000, 2000)), ((3711, 3837), (3999, 4001, 1999))])
def test_particle_tracks_follow_relion_projection(relion, shape, size):
    """Positions equal RELION 5's own projection, also for odd image and tomogram sizes (TS_54: ZRot varies)."""
    shared, series, _ = relion
    ts = replace(series["TS_54"], tomogram_size=size)
    df = starfile.read(shared / "relion5" / "Picks" / "job019" / "particles.star")
    coords = df[df.rlnTomoName == "TS_54"][list(star._COORDS)].to_numpy()[:40]
    tracks = star.relion5_tracks(ts, coords, shape)
    expected = _relion_positions(ts, coords, shape).reshape(-1, 2)
    np.testing.assert_allclose(tracks.positions_px(), expected, atol=1e-6)


def test_particle_star_counts_and_fit_consistency(relion):
    _, series, tracks = relion
    assert {k: v.n_particles for k, v in tracks.items()} == {"TS_54": 1418, "TS_45": 1672, "TS_01": 1960,
                                                             "TS_43": 2521, "TS_03": 1871}
    ts = tracks["TS_45"]
    assert len(ts) == ts.n_particles * len(series["TS_45"].tilts)
    fit = trackfit.fit_tracks(ts, refine=("shift",), robust="none")
    assert fit.mean_residual_px < 1e-6
    delta = fit.xyz_px - ts.particles.xyz_px
    assert np.abs(delta - delta.mean(axis=0)).max() < 1e-6  # same points up to the fit's translation gauge


def test_relion5_round_trip_loses_nothing(relion, tmp_path):
    shared, series, tracks = relion
    out = tmp_path / "Tomograms" / "job100" / "tomograms.star"
    written = star.write_relion5_tomograms(out, {k: star.relion5_series_from_tracks(v, tracks[k])
                                                 for k, v in series.items()}, project_dir=tmp_path)
    assert written[0] == out and len(written) == 6
    star.write_relion5_particles(tmp_path / "particles.star", tracks, series)
    series2 = star.read_relion5_tomograms(out)
    tracks2 = star.read_relion5_particles(tmp_path / "particles.star", series2, SHAPE)
    assert list(tracks2) == list(tracks)
    for name, ts in tracks.items():
        other = tracks2[name]
        np.testing.assert_allclose(other.positions_px(), ts.positions_px(), atol=1e-5)
        np.testing.assert_allclose(other.particles.xyz_px, ts.particles.xyz_px, atol=1e-5)
        for col in ("angle_deg", "axis_deg", "defocus_um", "dose"):
            np.testing.assert_allclose(getattr(other.tilts, col), getattr(ts.tilts, col), atol=1e-6)
        np.testing.assert_array_equal(other.tilts.order, ts.tilts.order)
    src = shared / "relion5" / "Tomograms" / "job006"
    for name in tracks:
        before = starfile.read(src / "tilt_series" / f"{name}.star")
        after = starfile.read(out.parent / "tilt_series" / f"{name}.star")
        assert list(after.columns) == list(before.columns)
        for col in before.columns:
            if before[col].dtype.kind in "fi":
                np.testing.assert_allclose(after[col], before[col], atol=2e-6, err_msg=col)
            else:
                assert list(after[col]) == list(before[col]), col
    glob_before = starfile.read(src / "tomograms.star")
    glob_after = starfile.read(out)
    assert list(glob_after.columns) == list(glob_before.columns)
    assert list(glob_after.rlnTomoTiltSeriesStarFile) == [f"Tomograms/job100/tilt_series/{n}.star" for n in series]
    same = [c for c in glob_before.columns if c != "rlnTomoTiltSeriesStarFile"]
    pd.testing.assert_frame_equal(glob_after[same], glob_before[same])
    p_before = starfile.read(shared / "relion5" / "Picks" / "job019" / "particles.star")
    p_after = starfile.read(tmp_path / "particles.star")
    assert list(p_after.columns) == list(p_before.columns)
    assert list(p_after.rlnTomoName) == list(p_before.rlnTomoName)
    np.testing.assert_allclose(p_after[list(star._COORDS)], p_before[list(star._COORDS)], atol=2e-6)


def test_edits_reach_the_written_files(relion, tmp_path):
    _, series, tracks = relion
    ts = tracks["TS_01"].select(tracks["TS_01"].particle < 20)
    fit = trackfit.fit_tracks(ts, refine=("shift", "rotation"), robust="none")
    edited = trackfit.apply_fit(ts, fit)
    edited = edited.with_particle_xyz(edited.particles.xyz_px + [5.0, 0.0, 0.0], keep_positions=False)
    new_series = star.relion5_series_from_tracks(series["TS_01"], edited)
    star.write_relion5_tomograms(tmp_path / "tomograms.star", {"TS_01": new_series})
    star.write_relion5_particles(tmp_path / "p.star", {"TS_01": edited}, series)
    back = star.read_relion5_particles(tmp_path / "p.star", star.read_relion5_tomograms(tmp_path / "tomograms.star"),
                                       SHAPE)["TS_01"]
    np.testing.assert_allclose(back.particles.xyz_px, edited.particles.xyz_px, atol=1e-5)
    np.testing.assert_allclose(back.tilts.axis_deg, fit.geometry.axis_deg, atol=1e-5)
    # RELION has one shift per tilt: positions agree up to the per-projection residuals of the fit
    assert np.median(np.linalg.norm(back.positions_px() - edited.positions_px(), axis=1)) < 1e-4


@pytest.mark.parametrize("shape", [(300, 420), (301, 419)])
def test_new_relion5_project_from_tracks(tmp_path, shape):
    """A TrackSet that never came from RELION: written as a new project, read back at the same positions."""
    from napari_cspt2d.model.tracks import TiltTable, TrackSet

    rng = np.random.default_rng(0)
    tilts = TiltTable.from_angles(np.arange(-45.0, 46.0, 15.0), defocus_um=2.5, axis_deg=84.0, dose=3.0)
    xyz = rng.uniform(-100, 100, (4, 3))
    tracks = TrackSet.from_positions(np.repeat(np.arange(4), 7), np.tile(np.arange(7), 4), np.zeros((28, 2)), tilts,
                                     shape).with_particle_xyz(xyz, keep_positions=False)
    shifted = tracks.replace(shift_px=tracks.shift_px + rng.normal(0, 3, (7, 2))[tracks.tilt])  # per-tilt shifts
    series = star.relion5_series("TS_new", shifted, 2.0, tomogram_size=(419, 301, 201))
    star.write_relion5_tomograms(tmp_path / "tomograms.star", {"TS_new": series})
    star.write_relion5_particles(tmp_path / "particles.star", {"TS_new": shifted}, {"TS_new": series})
    back = star.read_relion5_particles(tmp_path / "particles.star",
                                       star.read_relion5_tomograms(tmp_path / "tomograms.star"), shape)["TS_new"]
    np.testing.assert_allclose(back.positions_px(), shifted.positions_px(), atol=1e-5)
    np.testing.assert_allclose(back.particles.xyz_px, xyz, atol=1e-5)
    np.testing.assert_allclose(back.tilts.accumulated_dose(), tilts.accumulated_dose(), atol=1e-6)
    written = starfile.read(tmp_path / "tilt_series" / "TS_new.star")
    assert written.rlnMicrographName.iloc[0] == "000001@TS_new.mrcs"


def test_particle_series_star(shared_data):
    path = shared_data / "cryodrgn_tilt" / "sta_testing_bin8.star"
    ps = star.read_particle_series_star(path, (4096, 4096))
    df = starfile.read(path)
    assert ps.tracks.n_particles == 6 and ps.tracks.n_tilts == 39 and len(ps.tracks) == 219
    assert list(np.bincount(ps.tracks.particle)) == [39] * 5 + [24]
    frame = df.rlnMicrographName.str.extract(r"_(\d+)\.mrc$")[0].astype(int).to_numpy()
    angle = ps.tracks.tilts.angle_deg[ps.tracks.tilt[ps.projection_row]]
    np.testing.assert_allclose(angle, 3.0 * (frame - 21), atol=0.05)
    np.testing.assert_allclose(ps.tracks.positions_px()[ps.projection_row], df[["rlnCoordinateX", "rlnCoordinateY"]])
    assert ps.pixel_A == pytest.approx(1.96) and ps.optics["amp_contrast"] == pytest.approx(0.07)
    assert np.all(ps.tracks.tilts.dose == pytest.approx(3.25))
    # the tilt axis from the image orientations matches the one the coordinates imply (mod 180: the hand)
    from_coords = trackfit.estimate_axis_deg(ps.tracks)
    assert abs((ps.tracks.tilts.axis_deg[0] - from_coords + 90) % 180 - 90) < 1.0
    fit = trackfit.fit_tracks(ps.tracks, refine=("shift", "rotation"))
    assert fit.mean_residual_px < 2.0


def test_bad_star_files(tmp_path, shared_data):
    bad = tmp_path / "p.star"
    starfile.write({"particles": pd.DataFrame({"rlnTomoName": ["TS_01"], "rlnCenteredCoordinateXAngst": [1.0]})}, bad)
    series = star.read_relion5_tomograms(shared_data / "relion5" / "Tomograms" / "job006" / "tomograms.star")
    with pytest.raises(CsptInputError) as info:
        star.read_relion5_particles(bad, series, SHAPE)
    assert info.value.field == "rlnCenteredCoordinateYAngst" and info.value.file == str(bad)
    starfile.write({"particles": pd.DataFrame({"rlnTomoName": ["TS_99"], **{c: [1.0] for c in star._COORDS}})}, bad)
    with pytest.raises(CsptInputError, match="TS_99"):
        star.read_relion5_particles(bad, series, SHAPE)
    starfile.write({"particles": pd.DataFrame({"rlnTomoName": ["TS_01"], **{c: ["x"] for c in star._COORDS}})}, bad)
    with pytest.raises(CsptInputError, match="finite numbers"):
        star.read_relion5_particles(bad, series, SHAPE)
    tomo = tmp_path / "tomograms.star"
    starfile.write({"global": pd.DataFrame({"rlnTomoName": ["A"], "rlnTomoTiltSeriesPixelSize": [1.0],
                                            "rlnTomoTiltSeriesStarFile": ["nowhere/A.star"]})}, tomo)
    with pytest.raises(CsptInputError, match="nowhere/A.star"):
        star.read_relion5_tomograms(tomo)
    (tmp_path / "junk.star").write_text("data_\nloop_\n_rlnA #1\n_rlnB #2\n1 2 3\n4\n")
    with pytest.raises(CsptInputError):
        star.read_particle_series_star(tmp_path / "junk.star", (10, 10))
