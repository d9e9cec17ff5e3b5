"""pyp's constrained (CSP) modes (recon/constrained.py) and heights for the CTF (recon/heights.py), on synthetic
truth: measured positions = true positions + per-projection noise, with tilt-geometry and particle errors injected."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from napari_cspt2d import geometry, pyp
from napari_cspt2d.errors import CsptInputError
from napari_cspt2d.io import cistem
from napari_cspt2d.io.mrc import open_stack, read_image
from napari_cspt2d.io.toml import load_params, save_params
from napari_cspt2d.model.params import PypParameters
from napari_cspt2d.model.settings import Settings
from napari_cspt2d.model.tracks import TiltTable, TrackSet
from napari_cspt2d.recon import arguments, csp_run, pipeline
from napari_cspt2d.recon.constrained import (
    CspModes,
    place_projections,
    regularize_residuals,
    solve_constrained,
    start_constrained,
)
from napari_cspt2d.recon.heights import fit_heights, has_heights, with_fitted_heights
from napari_cspt2d.recon.reconstruct import reconstruct_tracks
from napari_cspt2d.recon.refine import RefineOptions, TiltSelection, refine_tracks
from napari_cspt2d.recon.trackfit import TiltGeometry, fit_tracks
from napari_cspt2d.sample import write_sample

PIXEL_A = 1.35
SHAPE = (2048, 2048)


class Series:
    """A tilt series' truth: P particles in a slab, T tilts ±60° with tilt axis 5°, per-tilt shifts."""

    def __init__(self, n_particles=40, n_tilts=31, seed=0, tilt_shift_px=0.0):
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.angles = np.linspace(-60.0, 60.0, n_tilts)
        self.ref = int(np.argmin(np.abs(self.angles)))
        self.xyz = np.column_stack([rng.uniform(-800, 800, n_particles), rng.uniform(-800, 800, n_particles),
                                    rng.uniform(-150, 150, n_particles)])
        shift = rng.normal(0.0, 1.0, (n_tilts, 2))
        shift *= tilt_shift_px / np.sqrt(np.mean(np.sum(shift**2, axis=1)))  # RMS length = tilt_shift_px
        shift[self.ref] = 0.0  # the reference tilt defines the frame
        self.geometry = TiltGeometry(self.angles.copy(), np.full(n_tilts, 5.0), shift, np.ones(n_tilts),
                                     geometry.image_center_px(SHAPE))
        self.pid = np.repeat(np.arange(1, n_particles + 1), n_tilts)
        self.tid = np.tile(np.arange(n_tilts), n_particles)
        self.positions = self.geometry.predict_px(self.xyz[self.pid - 1], self.tid)

    def measured(self, noise_px, tilts: TiltTable, xyz=None) -> TrackSet:
        """A TrackSet at the true positions + Gaussian noise (per axis), seen through ``tilts``, points ``xyz``."""
        pos = self.positions + self.rng.normal(0.0, noise_px, self.positions.shape)
        tracks = TrackSet.from_positions(self.pid, self.tid, pos, tilts, SHAPE)
        return tracks if xyz is None else tracks.with_particle_xyz(xyz)


def gauge_free_shift_error(shift_px, truth_px, angles_deg):
    """Per-tilt shift errors (T, 2) after removing what a common 3D translation of all particles explains
    (``a_x cos t + a_z sin t``, ``a_y``): the model cannot tell those apart."""
    t = np.deg2rad(angles_deg)
    design = np.zeros((2 * t.size, 3))
    design[0::2, 0], design[0::2, 2], design[1::2, 1] = np.cos(t), np.sin(t), 1.0
    diff = (shift_px - truth_px).reshape(-1)
    a, *_ = np.linalg.lstsq(design, diff, rcond=None)
    return (diff - design @ a).reshape(-1, 2)


def gauge_free_angle_error(angle_deg, truth_deg):
    """Tilt-angle errors after removing their mean: turning every point about the tilt axis and every tilt angle
    the other way leaves all positions as they are (only the reference tilt weakly tells), and the map is then
    merely turned, so the model's tilt offset is free."""
    error = np.asarray(angle_deg) - truth_deg
    return error - error.mean()


def rms(values):
    return float(np.sqrt(np.mean(np.square(values))))


# ------------------------------------------------------------------------------------------------ modes
def test_modes_from_params_free_for_the_seed_settings():
    seed = arguments.csp_modes(Settings.parse(PypParameters({"csp_no_3d_points": True,
                                                             "csp_frame_refinement": True})))
    assert not seed.constrained and seed.frame_refinement
    on = arguments.csp_modes(Settings.parse({"csp_refine_micrographs": True, "csp_ToleranceMicrographTiltAngles": 2.0,
                                             "csp_ToleranceParticlesPhi": 5.0, "csp_ToleranceParticlesPsi": 12.0,
                                             "csp_ToleranceParticlesTheta": 3.0}))
    assert on.constrained and on.tilt_angle_deg == 2.0 and on.euler_range_deg == (5.0, 3.0, 12.0)
    assert CspModes(transreg=True).constrained
    with pytest.raises(CsptInputError, match="csp_time_sigma"):
        CspModes(time_sigma=-1)


def test_parameters_round_trip_through_pyp_config_toml(tmp_path):
    values = {"csp_refine_micrographs": True, "csp_refine_particles": True, "csp_transreg": True,
              "csp_ToleranceMicrographTiltAngles": 1.25, "csp_ToleranceMicrographTiltAxisAngles": 0.75,
              "csp_ToleranceMicrographShifts": 40.0, "csp_ToleranceParticlesShifts": 15.0,
              "csp_ToleranceParticlesPhi": 10.0, "csp_spatial_sigma": 300.0, "csp_time_sigma": 7,
              "fitted_heights_ctf": False, "fitted_heights_max_error_A": 50.0}
    path = save_params(PypParameters(values), tmp_path / ".pyp_config.toml")
    back = load_params(path)
    assert {k: back[k] for k in values} == values
    assert arguments.csp_modes(Settings.parse(back)) == arguments.csp_modes(Settings.parse(values))
    with pytest.raises(CsptInputError, match="csp_ToleranceMicrographTiltAngles"):
        PypParameters({"csp_ToleranceMicrographTiltAngles": -1.0})


def test_tilt_geometry_round_trips_through_the_cistem_pair(tmp_path):
    series = Series(n_particles=6, n_tilts=9, tilt_shift_px=3.0)
    tilts = TiltTable.from_angles(series.angles + 0.3, axis_deg=4.5)
    tracks = series.measured(0.1, tilts, xyz=series.xyz)
    main, particles, tilt_table = cistem.tables_from_tracks(tracks, pixel_A=PIXEL_A, voltage_kV=300, cs_mm=2.7,
                                                            amp_contrast=0.07,
                                                            tilt_shift_px=series.geometry.shift_px)
    path = tmp_path / "ts_r01_02.cistem"
    cistem.write_pair(path, main, particles, tilt_table)
    main2, particles2, tilts2 = cistem.read_pair(path)
    back = cistem.tracks_from_tables(main2, particles2, tilts2, image_shape_yx=SHAPE)
    np.testing.assert_allclose(back.tilts.angle_deg, tilts.angle_deg, atol=1e-4)
    np.testing.assert_allclose(back.tilts.axis_deg, tilts.axis_deg, atol=1e-4)
    np.testing.assert_allclose(cistem.tilt_shifts_px(tilts2, back.tilts.order, PIXEL_A), series.geometry.shift_px,
                               atol=1e-4)
    np.testing.assert_allclose(back.positions_px(), tracks.positions_px(), atol=2e-3)
    assert tilts2.names[:6] == cistem.TILT_LAYOUT
    with pytest.raises(CsptInputError, match="tilt_shift_px"):
        cistem.tables_from_tracks(tracks, pixel_A=PIXEL_A, voltage_kV=300, cs_mm=2.7, amp_contrast=0.07,
                                  tilt_shift_px=np.zeros((3, 2)))


# ------------------------------------------------------------------------------------------------ recovery
@pytest.fixture(scope="module")
def injected():
    """Tilt angles off by ±1°, the axis by 1°, per-tilt shifts of 3 px RMS (the reference tilt exact: it fixes the
    frame), particles' points off by 8 px RMS per coordinate; measurements with 0.5 px noise per axis."""
    series = Series(n_particles=40, n_tilts=31, seed=3, tilt_shift_px=3.0)
    rng = np.random.default_rng(4)
    angle_error = rng.choice([-1.0, 1.0], series.angles.size)
    angle_error[series.ref] = 0.0
    tilts = TiltTable.from_angles(series.angles + angle_error, axis_deg=6.0)
    start_xyz = series.xyz + rng.normal(0.0, 8.0, series.xyz.shape)
    measured = series.measured(0.5, tilts, xyz=start_xyz)
    start = TiltGeometry.from_tracks(measured)
    modes = CspModes(refine_micrographs=True, refine_particles=True, tilt_shift_A=10 * PIXEL_A,
                     particle_shift_A=40 * PIXEL_A)
    fit = solve_constrained(measured, modes, pixel_A=PIXEL_A, start=start)
    return series, angle_error, start_xyz, measured, modes, fit


def test_constrained_refinement_recovers_injected_tilt_geometry(injected):
    series, angle_error, _, _, _, fit = injected
    g = fit.geometry
    assert rms(gauge_free_angle_error(g.angle_deg, series.angles)) <= 0.1 * rms(angle_error)
    assert np.max(np.abs(g.axis_deg - 5.0)) <= 0.1
    shift_error = gauge_free_shift_error(g.shift_px, series.geometry.shift_px, series.angles)
    assert rms(np.linalg.norm(shift_error, axis=1)) <= 0.3
    assert fit.rms_px < 0.5 * np.sqrt(2) * 1.1  # the measurements' own noise, nothing left unexplained


def test_constrained_refinement_recovers_particle_offsets(injected):
    series, _, start_xyz, _, _, fit = injected
    before = start_xyz - series.xyz
    after = fit.xyz_px - series.xyz
    after -= after.mean(axis=0)  # a common translation is the model's free frame
    assert rms(after) <= 0.1 * rms(before)
    prediction_error = np.linalg.norm(fit.predicted_px - series.positions, axis=1)
    assert rms(prediction_error) < 0.25 and prediction_error.max() < 1.0  # measurements: 0.7 px RMS


def test_tolerances_bound_the_refinement(injected):
    series, _, start_xyz, measured, _, _ = injected
    tight = CspModes(refine_micrographs=True, refine_particles=True, tilt_angle_deg=0.25, tilt_axis_deg=0.2,
                     tilt_shift_A=1.0 * PIXEL_A, particle_shift_A=2.0 * PIXEL_A)
    start = TiltGeometry.from_tracks(measured)
    fit = solve_constrained(measured, tight, pixel_A=PIXEL_A, start=start)
    assert np.max(np.abs(fit.geometry.angle_deg - start.angle_deg)) <= 0.25 + 1e-6
    assert np.max(np.abs(fit.geometry.axis_deg - start.axis_deg)) <= 0.2 + 1e-6
    assert np.max(np.abs(fit.geometry.shift_px)) <= 1.0 + 1e-6
    assert np.max(np.abs(fit.xyz_px - start_xyz)) <= 2.0 + 1e-6
    fixed = solve_constrained(measured, CspModes(refine_micrographs=True), pixel_A=PIXEL_A, start=start)
    np.testing.assert_allclose(fixed.xyz_px, start_xyz)  # particles off, no picks: points stay
    picks = series.positions + series.rng.normal(0.0, 2.0, series.positions.shape)
    anchored = solve_constrained(measured, CspModes(refine_micrographs=True), pixel_A=PIXEL_A, start=start,
                                 picks_px=picks)
    np.testing.assert_allclose(anchored.xyz_px, fit_tracks(measured.with_positions(np.arange(len(measured)), picks),
                                                           start=anchored.geometry).xyz_px)  # ... the picks' fit


def test_place_projections_follows_the_per_projection_rule(injected):
    series, _, _, measured, modes, fit = injected
    pure = place_projections(measured, fit, CspModes(refine_micrographs=True, frame_refinement=False))
    np.testing.assert_allclose(pure.positions_px(), fit.predicted_px, atol=1e-6)
    np.testing.assert_allclose(pure.tilts.angle_deg, fit.geometry.angle_deg)
    free_residuals = place_projections(measured, fit, modes)
    np.testing.assert_allclose(free_residuals.positions_px(), measured.positions_px(), atol=1e-6)
    pulled = place_projections(measured, fit, CspModes(refine_micrographs=True, transreg=True, time_sigma=9))
    err = {name: rms(np.linalg.norm(t.positions_px() - series.positions, axis=1))
           for name, t in (("pure", pure), ("free", free_residuals), ("pulled", pulled))}
    assert err["pure"] < err["pulled"] < err["free"], err


def test_with_per_projection_noise_only_constrained_and_free_agree():
    """No geometry error, no particle error: the free positions are the measurements; the constrained model must
    not invent geometry changes or bias, and it averages the noise away."""
    series = Series(n_particles=40, n_tilts=31, seed=8, tilt_shift_px=0.0)
    tilts = TiltTable.from_angles(series.angles, axis_deg=5.0)
    measured = series.measured(1.0, tilts, xyz=series.xyz)
    start = TiltGeometry.from_tracks(measured)
    modes = CspModes(refine_micrographs=True, refine_particles=True, transreg=True)
    fit = solve_constrained(measured, modes, pixel_A=PIXEL_A, start=start)
    constrained = place_projections(measured, fit, modes)
    free = measured  # free mode: each projection at its own measurement
    assert np.max(np.abs(gauge_free_angle_error(fit.geometry.angle_deg, series.angles))) < 0.3
    assert np.max(np.abs(fit.geometry.axis_deg - 5.0)) < 0.05
    difference = constrained.positions_px() - free.positions_px()
    per_tilt_bias = np.array([difference[measured.tilt == t].mean(axis=0) for t in range(series.angles.size)])
    assert np.max(np.abs(per_tilt_bias)) < 4.0 / np.sqrt(40)  # no systematic disagreement per tilt
    assert rms(difference) < 1.2 * np.sqrt(2)  # they differ by the measurement noise, no more
    err_free = rms(np.linalg.norm(free.positions_px() - series.positions, axis=1))
    err_constrained = rms(np.linalg.norm(constrained.positions_px() - series.positions, axis=1))
    assert err_constrained < 0.5 * err_free


def test_regularize_residuals_follows_pyp_rules():
    prow = np.repeat(np.arange(6), 5)
    trow = np.tile(np.arange(5), 6)
    xyz = np.column_stack([np.arange(6) * 10.0, np.zeros(6), np.zeros(6)])
    residual = np.zeros((30, 2))
    residual[prow == 0] = [3.0, -3.0]
    off = regularize_residuals(residual, prow, trow, trow, xyz, spatial_sigma_px=0.0, time_sigma=0)
    np.testing.assert_array_equal(off, residual)
    spatial = regularize_residuals(residual, prow, trow, trow, xyz, spatial_sigma_px=10.0, time_sigma=0)
    near, far = spatial[(prow == 1) & (trow == 0), 0][0], spatial[(prow == 5) & (trow == 0), 0][0]
    assert 0 < far < near < spatial[(prow == 0) & (trow == 0), 0][0] < 3.0  # weights fall with distance
    spike = np.zeros((30, 2))
    spike[(prow == 2) & (trow == 2)] = 5.0
    timed = regularize_residuals(spike, prow, trow, trow, xyz, spatial_sigma_px=0.0, time_sigma=5)
    np.testing.assert_allclose(timed, 0.0)  # a lone spike is removed by the median of 3
    ramp = np.column_stack([trow * 1.0, trow * 1.0])
    smooth = regularize_residuals(ramp, prow, trow, trow, xyz, spatial_sigma_px=0.0, time_sigma=3)
    np.testing.assert_allclose(smooth[(prow == 0) & (trow > 0) & (trow < 4)], ramp[1:4], atol=1e-9)


# ------------------------------------------------------------------------------------------------ heights
def test_fitted_heights_feed_the_ctf_when_trustworthy():
    series = Series(n_particles=12, n_tilts=31, seed=5)
    tilts = TiltTable.from_angles(series.angles, axis_deg=5.0, defocus_um=2.5)
    tracks = series.measured(1.0, tilts)  # zero-filled 3D points: the seed's tracks
    assert not has_heights(tracks)
    bad = np.flatnonzero(tracks.particle == 3)
    tracks = tracks.with_positions(bad, tracks.positions_px()[bad] + tracks_noise(bad.size, 40.0))  # a bad track
    narrow = (tracks.particle == 4) & (np.abs(tracks.tilts.angle_deg[tracks.tilt_rows()]) > 2.0)
    tracks = tracks.select(~narrow)  # particle 4 seen at 0° only: no height
    fit = fit_heights(tracks, pixel_A=PIXEL_A, max_error_A=5.0)
    assert not fit.trusted[2] and not fit.trusted[3] and fit.trusted[[0, 1, 4, 5, 6]].all()
    used = with_fitted_heights(tracks, fit)
    np.testing.assert_allclose(used.positions_px(), tracks.positions_px(), atol=1e-6)
    true_height = geometry.project_points(series.xyz[used.particle - 1], used.tilts.angle_deg[used.tilt_rows()],
                                          5.0)[:, 2]
    trusted = fit.trusted[used.particle_rows()]
    height_error_A = (used.projected_px()[:, 2] - true_height)[trusted] * PIXEL_A
    assert rms(height_error_A) < 0.5 * 5.0  # within the uncertainty bound
    defocus = cistem.tables_from_tracks(used, pixel_A=PIXEL_A, voltage_kV=300, cs_mm=2.7, amp_contrast=0.07)[0]
    expected = 2.5e4 - true_height * PIXEL_A
    assert rms((defocus["DEFOCUS_1"] - expected)[trusted]) < 0.5 * 5.0  # each projection's own defocus
    np.testing.assert_array_equal(used.particles.xyz_px[~fit.trusted], 0.0)  # untrusted: the tilt's defocus


def tracks_noise(n, sd):
    return np.random.default_rng(9).normal(0.0, sd, (n, 2))


def test_fitted_heights_check_their_input():
    series = Series(n_particles=4, n_tilts=5)
    tracks = series.measured(0.5, TiltTable.from_angles(series.angles))
    with pytest.raises(CsptInputError, match="pixel_A"):
        fit_heights(tracks, pixel_A=0.0)
    other = fit_heights(tracks.select(tracks.particle != 1), pixel_A=PIXEL_A)
    with pytest.raises(CsptInputError, match="fit"):
        with_fitted_heights(tracks, other)


def test_zero_filled_points_are_fitted_from_the_tracks_first(injected):
    """With the seed's zero 3D coordinates the run starts from the track fit; constrained refinement from there
    still recovers the geometry."""
    series, angle_error, _, measured, modes, _ = injected
    zero = measured.with_particle_xyz(np.zeros_like(series.xyz))
    start_fit = fit_tracks(zero)
    tracks = zero.with_particle_xyz(start_fit.xyz_px)
    start = TiltGeometry.from_tracks(tracks)
    fit = solve_constrained(tracks, modes, pixel_A=PIXEL_A, start=start)
    assert rms(gauge_free_angle_error(fit.geometry.angle_deg, series.angles)) <= 0.1 * rms(angle_error)


# ------------------------------------------------------------------------------------------------ the run
@pytest.fixture(scope="module")
def constrained_run(tmp_path_factory, small_sample):
    """The small sample's project run with every constrained mode on (2 iterations, jobs in this process)."""
    root = tmp_path_factory.mktemp("constrained") / "project"
    write_sample(small_sample, root, name="sample")
    params = pyp.load_parameters(root)
    params.update({"refine_maxiter": 3, "refine_rhref": "12:10", "slurm_bundle_size": 4,
                   "csp_refine_micrographs": True, "csp_refine_particles": True, "csp_transreg": True})
    pyp.save_parameters(params, root)
    return root, params, pipeline.run_cspt(params, project_dir=root, serial=True, stop_when_converged=False)


def test_constrained_run_writes_the_model_and_its_map(constrained_run, small_sample):
    root, params, run = constrained_run
    assert [it["iteration"] for it in run.iterations] == [2, 3]
    _, tracks, _ = pyp.load_project(root, "sample", 3)
    par = pyp.Parameters.from_file(run.parameters[0])
    tilts = par.extended.tilts
    assert np.any(np.abs(tracks.tilts.angle_deg - small_sample.tracks.tilts.angle_deg) > 1e-3)  # refined, read back
    shifts = cistem.tilt_shifts_px(tilts, tracks.tilts.order, params["scope_pixel"])
    assert np.all(np.isfinite(shifts)) and np.any(shifts != 0)
    assert np.all(np.any(tracks.particles.xyz_px != 0, axis=1))  # points fitted from the zero-filled tracks
    stack = open_stack(root / "sample_stack.mrc")[0]
    expected = reconstruct_tracks(stack, tracks, **arguments.reconstruction_options(Settings.parse(params))).map
    got = read_image(root / "frealign" / "maps" / "sample_r01_03.mrc")
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    error = np.linalg.norm(tracks.positions_px() - small_sample.truth_tracks.positions_px(), axis=1)
    picks = np.linalg.norm(small_sample.tracks.positions_px() - small_sample.truth_tracks.positions_px(), axis=1)
    assert rms(error) < 0.3 * rms(picks)


def test_constrained_run_resumes_from_its_tilt_geometry(constrained_run):
    root, params, _ = constrained_run
    before = pyp.Parameters.from_file(root / "frealign" / "maps" / "sample_r01_03.cistem").extended.tilts
    again = pipeline.run_cspt(params, project_dir=root, serial=True, first_iteration=4, last_iteration=4,
                              stop_when_converged=False)
    after = pyp.Parameters.from_file(again.parameters[0]).extended.tilts
    change = np.abs(after["TILTANG"] - before["TILTANG"])
    assert change.max() <= params["csp_ToleranceMicrographTiltAngles"] + 1e-4  # from iteration 3's, not the pkl's
    assert np.abs(after["TSHIFT_X"] - before["TSHIFT_X"]).max() < 2.0 * params["scope_pixel"]


@pytest.mark.slow
def test_constrained_run_on_a_local_cluster_equals_the_serial_run(constrained_run, small_sample, tmp_path):
    """Bundles on dask workers return measurements; the main process solves: the same files as in one process."""
    serial_root, params, _ = constrained_run
    root = tmp_path / "project"
    write_sample(small_sample, root, name="sample")
    pyp.save_parameters(params, root)
    pipeline.run_cspt(params, project_dir=root, workers=2, last_iteration=2, stop_when_converged=False)
    name = "frealign/maps/sample_r01_02"
    ours, theirs = (pyp.Parameters.from_file(r / f"{name}.cistem") for r in (root, serial_root))
    np.testing.assert_allclose(ours.data, theirs.data, atol=1e-4)
    for column in ("TILTANG", "TILTAXIS", "TSHIFT_X", "TSHIFT_Y"):
        np.testing.assert_allclose(ours.extended.tilts[column], theirs.extended.tilts[column], atol=1e-4)
    a, b = (read_image(r / f"{name}.mrc") for r in (root, serial_root))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_tilts_outside_the_refinement_range_follow_pyps_micrograph_refinement():
    """pyp's micrograph refinement runs on every exposure, its particle refinement on csp_UseImagesForRefinementMin/Max
    (pyp/align/core.py). The +60° tilt, given as +61° (outside -60..60) and seen 3 px off in the stack: its
    geometry is fitted to its own measurements (its projections land on the shifted truth, not on the picks), and
    its measurements do not move the particles' points."""
    series = Series(n_particles=30, n_tilts=21, seed=6, tilt_shift_px=3.0)
    angles = series.angles.copy()
    angles[-1] += 1.0
    tilts = TiltTable.from_angles(angles, axis_deg=5.0)
    picks = TrackSet.from_positions(series.pid, series.tid, series.positions, tilts, SHAPE)
    picks, state = start_constrained(picks)
    last = picks.tilt == 20
    seen = series.positions + np.where(last[:, None], [3.0, -2.0], 0.0)
    measured = picks.with_positions(np.arange(len(picks)), seen)
    settings = Settings.parse({"csp_refine_micrographs": True, "csp_refine_particles": True, "scope_pixel": PIXEL_A,
                               "csp_ToleranceMicrographShifts": 10 * PIXEL_A, "csp_UseImagesForRefinementMin": -60,
                               "csp_UseImagesForRefinementMax": 60})
    options = arguments.refine_options(settings, 2)
    assert options.measure_all_tilts and not options.tilts.mask(tilts)[-1]
    placed, solved = csp_run.place(measured, state, picks, options, settings)
    assert abs(solved.geometry.angle_deg[-1] - 60.0) < 0.1
    assert rms(np.linalg.norm(placed.positions_px()[last] - seen[last], axis=1)) < 0.3
    wild = measured.with_positions(np.flatnonzero(last), seen[last] + series.rng.normal(0, 20.0, (last.sum(), 2)))
    placed_wild, _ = csp_run.place(wild, state, picks, options, settings)
    np.testing.assert_allclose(placed_wild.particles.xyz_px, placed.particles.xyz_px, atol=1e-6)
    free = Settings.parse({"csp_refine_particles": True, "scope_pixel": PIXEL_A, "csp_UseImagesForRefinementMin": -60,
                           "csp_UseImagesForRefinementMax": 60})
    assert not arguments.refine_options(free, 2).measure_all_tilts  # without micrograph refinement: not measured


def test_refinement_measures_tilts_outside_the_range_only_for_the_tilt_geometry(small_sample):
    """RefineOptions.measure_all_tilts: projections outside the refinement tilts get refined shifts, but neither
    count as used nor change the particles' scores."""
    s = small_sample
    imaging = arguments.imaging(Settings.parse(s.params))
    base = RefineOptions(resolution_A=12.0, refine_angles=False, tilts=TiltSelection(-30, 30, unit="degrees"))
    kept = refine_tracks(s.stack, s.tracks, s.truth_map, base, imaging)
    measured = refine_tracks(s.stack, s.tracks, s.truth_map, replace(base, measure_all_tilts=True), imaging)
    outside = np.abs(s.tracks.tilts.angle_deg[s.tracks.tilt_rows()]) > 30
    assert np.array_equal(kept.tracks.shift_px[outside], s.tracks.shift_px[outside])
    before = np.linalg.norm(s.tracks.positions_px() - s.truth_tracks.positions_px(), axis=1)[outside]
    after = np.linalg.norm(measured.tracks.positions_px() - s.truth_tracks.positions_px(), axis=1)[outside]
    assert np.median(after) < 0.5 * np.median(before)
    assert not measured.used[outside].any()
    np.testing.assert_allclose(measured.tracks.shift_px[~outside], kept.tracks.shift_px[~outside])
    np.testing.assert_allclose(measured.particle_score, kept.particle_score)


def test_changing_how_points_are_fitted_rebuilds_the_initial_map(constrained_run):
    """Iteration 1's map was made with every particle's fitted height in its CTF: without the constrained modes
    (trusted heights only) or without fitted heights it is another map, so a run builds it again."""
    root, params, _ = constrained_run
    assert "iteration 1" not in pipeline.plan_cspt(params, project_dir=root)
    free = params.copy()
    for key in ("csp_refine_micrographs", "csp_refine_particles", "csp_transreg"):
        free[key] = False
    assert "iteration 1: sample_r01_01.mrc is built first" in pipeline.plan_cspt(free, project_dir=root)
    assert csp_run.fitted_points(Settings.parse(free)) == ("heights", 100.0)
    free["fitted_heights_ctf"] = False
    assert csp_run.fitted_points(Settings.parse(free)) == ("none", 0.0)
