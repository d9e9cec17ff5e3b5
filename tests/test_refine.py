"""CSPT refinement (recon/refine.py): rules, and accuracy against the synthetic sample's ground truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from napari_cspt2d.errors import CsptInputError
from napari_cspt2d.model.tracks import ParticleTable, TiltTable
from napari_cspt2d import geometry
from napari_cspt2d.model.settings import Settings
from napari_cspt2d.recon import arguments
from napari_cspt2d.recon.reconstruct import reconstruct_tracks
from napari_cspt2d.recon.refine import (
    RefineOptions,
    TiltSelection,
    has_no_angles,
    orientation_grid,
    parameter_change,
    projection_cutoff_mask,
    refine_tracks,
    rotation_angle_deg,
    within_euler_range,
)
from napari_cspt2d.sample import make_sample


def particle_matrices(tracks):
    e = tracks.particles.euler_deg
    return geometry.euler_to_matrix(e[:, 2], e[:, 1], e[:, 0])


def with_matrices(tracks, matrices):
    phi, theta, psi = geometry.matrix_to_euler(matrices)
    p = tracks.particles
    return tracks.replace(particles=ParticleTable(p.id, p.xyz_px, np.column_stack([psi, theta, phi])))


def position_error_px(tracks, truth):
    """Length of each projection's position error (px)."""
    return np.linalg.norm(tracks.positions_px() - truth.positions_px(), axis=1)


def rms(values):
    return float(np.sqrt(np.mean(np.square(values))))


def reconstruct(sample, tracks):
    options = arguments.reconstruction_options(Settings.parse(sample.params))
    return reconstruct_tracks(sample.stack, tracks, **options).map


# ------------------------------------------------------------------------------------------------ rules
def test_tilt_selection_degrees_when_min_is_negative_else_exposure_order():
    tilts = TiltTable.from_angles(np.linspace(-60, 60, 41))  # dose-symmetric order: |angle| small first
    seed = TiltSelection(-60, 60)  # the seed's values: degrees
    assert seed.resolved_unit == "degrees" and seed.mask(tilts).all()
    assert TiltSelection(-30, 30).mask(tilts).sum() == 21
    pyp = TiltSelection(0, 10)  # pyp's values: acquisition indices 0..10, the 11 lowest tilts
    assert pyp.resolved_unit == "order"
    assert np.array_equal(np.sort(np.abs(tilts.angle_deg[pyp.mask(tilts)])).max(), 15.0)
    assert TiltSelection(5, -1).mask(tilts).sum() == 36  # -1 = up to the last exposure
    assert TiltSelection(0, 10, unit="degrees").mask(tilts).sum() == 4  # 0, 3, 6, 9 degrees
    assert arguments.tilt_selection(Settings.parse({"csp_UseImagesForRefinementMin": -60,
                                                    "csp_UseImagesForRefinementMax": 60})).resolved_unit == "degrees"
    with pytest.raises(CsptInputError, match="tilt unit"):
        TiltSelection(0, 1, unit="radians")


def test_projection_cutoff_rule():
    particle = np.repeat([1, 2], 5)
    score = np.array([0.40, 0.42, 0.38, 0.10, 0.41, 0.2, 0.21, 0.19, 0.2, np.nan])
    assert projection_cutoff_mask(score, particle, 0.0).all()
    keep = projection_cutoff_mask(score, particle, 0.5)  # below half the particle's median score
    assert keep.tolist() == [True, True, True, False, True] + [True] * 5
    strict = projection_cutoff_mask(score, particle, 1.5)  # below mean - 1.5 sd of the particle's scores
    assert strict.tolist()[:5] == [True, True, True, False, True]
    with pytest.raises(CsptInputError, match="refine_projection_score_cutoff"):
        projection_cutoff_mask(score, particle, -1)


def test_orientation_grid_covers_rotations():
    grid = orientation_grid(15.0)
    assert 3000 < len(grid) < 6000
    probes = Rotation.random(100, random_state=3).as_matrix()
    nearest = [rotation_angle_deg(grid, p).min() for p in probes]
    assert max(nearest) < 15.0


def test_options_from_params_follow_iteration_and_particle_radius():
    params = {"refine_rhref": "12:10:8", "refine_rlref": 200.0, "particle_rad": 80.0, "refine_shift_range_A": 0,
              "csp_RefineProjectionCutoff": 0.5, "csp_UseImagesForRefinementMin": -60,
              "csp_UseImagesForRefinementMax": 60, "refine_projection_score_cutoff": 2.0}
    settings = Settings.parse(params)
    assert [arguments.refine_options(settings, it).resolution_A for it in (2, 3, 4, 7)] == [12, 10, 8, 8]
    opt = arguments.refine_options(settings, 2)
    assert opt.shift_range_A == 20.0 and opt.tilts.resolved_unit == "degrees"
    assert opt.min_projections == 0.5 and opt.projection_cutoff == 2.0
    for bad in (1.5, -1):
        with pytest.raises(CsptInputError, match="csp_RefineProjectionCutoff"):
            RefineOptions(resolution_A=12.0, min_projections=bad)
    with pytest.raises(CsptInputError, match="refine_rhref"):
        RefineOptions(resolution_A=50, low_resolution_A=40)


# ------------------------------------------------------------------------------------------------ accuracy
@pytest.fixture(scope="module")
def noisy():
    """30 particles × 41 tilts, box 64, SNR 0.1, 2 px pick error (the sample's defaults otherwise)."""
    return make_sample(n_particles=30, n_tilts=41, box=64, snr=0.1, pick_error_px=2.0, seed=5)


def turned(n, degrees, seed):
    """Rotations by exactly ``degrees`` about random axes, in ± pairs (particle 2k turns one way about its axis,
    2k + 1 the other way about the same axis) so that the mean turn is ~0: a map reconstructed from the turned
    particles stays in the truth's frame (the frame is otherwise free: refinement cannot know it)."""
    axes = np.random.default_rng(seed).normal(size=((n + 1) // 2, 3))
    axes = np.repeat(axes / np.linalg.norm(axes, axis=1, keepdims=True), 2, axis=0)[:n]
    sign = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)[:, None]
    return Rotation.from_rotvec(np.deg2rad(degrees) * sign * axes).as_matrix()


def frame_offset_deg(matrices, truth):
    """Angle of the mean rotation between refined and true orientations (the global frame's drift)."""
    mean = Rotation.from_matrix(np.einsum("pji,pjk->pik", truth, matrices)).mean().as_matrix()
    return float(rotation_angle_deg(mean, np.eye(3)))


@pytest.fixture(scope="module")
def refined(noisy):
    """Two rounds of reconstruct → refine from the picks, with every orientation turned ±10° off the truth."""
    truth = noisy.truth_tracks
    start = with_matrices(noisy.tracks, turned(truth.n_particles, 10.0, seed=1) @ particle_matrices(truth))
    imaging = arguments.imaging(Settings.parse(noisy.params))
    tracks = start
    for resolution in (12.0, 10.0):
        options = RefineOptions(resolution_A=resolution, shift_range_A=0.25 * noisy.params["particle_rad"])
        tracks = refine_tracks(noisy.stack, tracks, reconstruct(noisy, tracks), options, imaging,
                               origin_px=start.positions_px()).tracks
    return start, tracks


@pytest.mark.slow
def test_shifts_refine_to_half_a_pixel(noisy, refined):
    start, tracks = refined
    before, after = rms(position_error_px(start, noisy.truth_tracks)), rms(position_error_px(tracks,
                                                                                            noisy.truth_tracks))
    assert before > 2.5  # 2 px per axis
    assert after <= 0.5, f"RMS position error {after:.3f} px (from {before:.2f} px)"


@pytest.mark.slow
def test_orientations_refine_to_three_degrees(noisy, refined):
    start, tracks = refined
    truth = particle_matrices(noisy.truth_tracks)
    before = np.median(rotation_angle_deg(particle_matrices(start), truth))
    after = np.median(rotation_angle_deg(particle_matrices(tracks), truth))
    assert before == pytest.approx(10.0)
    assert after <= 3.0, f"median orientation error {after:.2f}° (from {before:.1f}°)"
    assert frame_offset_deg(particle_matrices(tracks), truth) < 1.5
    assert np.all(np.isfinite(tracks.score)) and np.median(tracks.score) > 0.1
    assert np.all(tracks.occupancy == 100.0)


def test_global_search_finds_particles_without_angles(small_sample):
    s = small_sample
    truth = s.truth_tracks
    lost = np.isin(truth.particles.id, truth.particles.id[:2])
    euler = truth.particles.euler_deg.copy()
    euler[lost] = 0.0
    tracks = truth.replace(particles=ParticleTable(truth.particles.id, truth.particles.xyz_px, euler))
    assert has_no_angles(tracks.particles.euler_deg).tolist() == lost.tolist()
    keep = np.isin(tracks.particle, tracks.particles.id[lost])
    tracks = tracks.select(keep)
    options = RefineOptions(resolution_A=12.0, refine_shifts=False, global_step_deg=20.0)
    out = refine_tracks(s.stack, tracks, s.truth_map, options, arguments.imaging(Settings.parse(s.params)))
    assert out.searched_globally.all()
    error = rotation_angle_deg(particle_matrices(out.tracks), particle_matrices(s.truth_tracks)[lost])
    assert np.all(error < 3.0), error


def test_global_search_from_a_low_resolution_reference():
    """Every particle without angles, picks 2 px off, a 30 Å reference (the true map under a Gaussian whose
    transform falls to 1/2 at 1/30 Å⁻¹): one round with shift refinement finds the orientations (about 1° median
    error here; benchmarks/global_search.py runs the full-size case)."""
    s = make_sample(n_particles=6, n_tilts=21, shape_yx=(384, 384), box=48, snr=0.1, thickness_px=60.0, seed=3)
    sigma_px = np.sqrt(np.log(2) / 2) / np.pi * 30.0 / s.pixel_A
    reference = gaussian_filter(s.truth_map, sigma_px)
    euler = np.zeros_like(s.tracks.particles.euler_deg)
    tracks = s.tracks.replace(particles=ParticleTable(s.tracks.particles.id, s.tracks.particles.xyz_px, euler))
    options = arguments.refine_options(Settings.parse(s.params), 2, global_step_deg=20.0)
    out = refine_tracks(s.stack, tracks, reference, options, arguments.imaging(Settings.parse(s.params)),
                        origin_px=tracks.positions_px())
    assert out.searched_globally.all()
    error = rotation_angle_deg(particle_matrices(out.tracks), particle_matrices(s.truth_tracks))
    assert np.median(error) <= 5.0 and np.all(error < 10.0), error


def test_tilt_range_and_cutoff_are_applied(small_sample):
    s = small_sample
    tracks = s.tracks
    far = np.flatnonzero(tracks.particle == tracks.particles.id[0])[:1]  # push one pick onto background
    shift = tracks.shift_px.copy()
    shift[far] += 40.0
    tracks = tracks.replace(shift_px=shift)
    options = RefineOptions(resolution_A=12.0, refine_angles=False, projection_cutoff=0.5,
                            tilts=TiltSelection(-30, 30, unit="degrees"))
    out = refine_tracks(s.stack, tracks, s.truth_map, options, arguments.imaging(Settings.parse(s.params)))
    angle = tracks.tilts.angle_deg[tracks.tilt_rows()]
    outside = np.abs(angle) > 30
    assert np.array_equal(out.tracks.shift_px[outside], tracks.shift_px[outside])
    assert not np.array_equal(out.tracks.shift_px[~outside], tracks.shift_px[~outside])
    assert np.all(np.abs(out.tracks.shift_px - tracks.shift_px) <= options.shift_range_A / 4.0 + 1e-6)
    assert out.tracks.occupancy[far] == 0.0 and not out.used[far].any()
    # refined projections score well; unrefined ones (outside the range, 2 px off) may fall below the cutoff
    assert (out.tracks.occupancy[~outside] == 0).sum() <= 0.05 * (~outside).sum()
    assert np.isfinite(out.particle_score).all()
    assert parameter_change(out.tracks, out.tracks) == (0.0, 0.0)


def euler(matrices):
    return np.column_stack(geometry.matrix_to_euler(matrices))


def test_each_euler_angle_stays_within_its_own_tolerance():
    """pyp's csp_ToleranceParticlesPhi/Theta/Psi bound each angle, not the rotation: a candidate outside the box is
    moved onto it angle by angle, one inside is kept, and a candidate written with negative theta (the other Euler
    triple of the same rotation) is read in the triple nearer the start."""
    start = geometry.euler_to_matrix(30.0, 60.0, 100.0)
    far = geometry.euler_to_matrix(40.0, 65.0, 60.0)
    np.testing.assert_allclose(euler(within_euler_range(far[None], start, (0.0, 2.0, 30.0))), [[30.0, 62.0, 70.0]],
                               atol=1e-9)
    inside = geometry.euler_to_matrix(29.0, 61.0, 101.0)
    np.testing.assert_allclose(within_euler_range(inside[None], start, (2.0, 2.0, 2.0))[0], inside, atol=1e-12)
    near_pole = geometry.euler_to_matrix(10.0, 3.0, 20.0)
    flipped = geometry.euler_to_matrix(10.0, -2.0, 20.0)  # = (190, 2, 200): 1° of theta from the start's triple
    np.testing.assert_allclose(within_euler_range(flipped[None], near_pole, (0.0, 10.0, 0.0))[0], flipped,
                               atol=1e-9)
    with pytest.raises(CsptInputError, match="euler_range_deg"):
        RefineOptions(resolution_A=12.0, euler_range_deg=(5.0, -1.0, 5.0))


def test_a_zero_tolerance_holds_its_angle_while_the_others_refine(small_sample):
    """csp_ToleranceParticlesPhi = Theta = 0, Psi = 30 (pyp's docs: search the in-plane rotation only): phi and
    theta stay exactly where they started and psi moves back towards the truth. The old rule (one ball of the
    largest tolerance) moved all three."""
    s = small_sample
    truth = euler(particle_matrices(s.truth_tracks))
    start = truth + np.array([4.0, 4.0, 8.0])
    tracks = with_matrices(s.tracks.with_positions(np.arange(len(s.tracks)), s.truth_tracks.positions_px()),
                           geometry.euler_to_matrix(start[:, 0], start[:, 1], start[:, 2]))
    imaging = arguments.imaging(Settings.parse(s.params))
    settings = Settings.parse({**s.params, "csp_refine_particles": True, "csp_ToleranceParticlesPhi": 0.0,
                               "csp_ToleranceParticlesTheta": 0.0, "csp_ToleranceParticlesPsi": 30.0})
    options = arguments.refine_options(settings, 2, refine_shifts=False, resolution_A=10.0)
    assert options.euler_range_deg == (0.0, 0.0, 30.0)
    out = euler(particle_matrices(refine_tracks(s.stack, tracks, s.truth_map, options, imaging).tracks))
    np.testing.assert_allclose(out[:, :2], start[:, :2], atol=1e-6)
    psi_error_before = np.abs(start[:, 2] - truth[:, 2])
    psi_error_after = np.abs((out[:, 2] - truth[:, 2] + 180.0) % 360.0 - 180.0)
    assert np.median(psi_error_after) < 0.5 * np.median(psi_error_before), (psi_error_before, psi_error_after)


def test_only_particles_with_enough_projections_are_refined(small_sample):
    """pyp's csp_RefineProjectionCutoff: a particle with fewer projections than the minimum keeps its parameters."""
    s = small_sample
    first = s.tracks.particles.id[0]
    rows = np.flatnonzero((s.tracks.particle != first) | (s.tracks.tilt < 6))  # particle `first` in 6 of 21 tilts
    tracks = s.tracks.select(rows)
    few = tracks.particle == first
    imaging = arguments.imaging(Settings.parse(s.params))
    for cutoff, refined_few in ((0.5, False), (7, False), (6, True), (0, True)):  # 0.5 of 21 tilts = 11
        options = RefineOptions(resolution_A=12.0, refine_angles=False, min_projections=cutoff)
        out = refine_tracks(s.stack, tracks, s.truth_map, options, imaging)
        moved = np.any(out.tracks.shift_px != tracks.shift_px, axis=1)
        assert moved[few].any() == refined_few, cutoff
        assert moved[~few].mean() > 0.5, cutoff
        assert np.isnan(out.particle_score[0]) != refined_few


def test_gold_standard_refines_each_half_against_its_own_map(small_sample):
    s = small_sample
    half = (s.tracks.particle % 2).astype(np.int64)  # odd ids: half 1, whose map is empty here
    options = RefineOptions(resolution_A=12.0, refine_angles=False)
    out = refine_tracks(s.stack, s.tracks, (s.truth_map, np.zeros_like(s.truth_map)), options,
                        arguments.imaging(Settings.parse(s.params)), half=half)
    assert np.median(out.tracks.score[half == 0]) > 0.2
    assert np.all(out.tracks.score[half == 1] == 0.0)


def test_bad_inputs_are_named(small_sample):
    s = small_sample
    imaging = arguments.imaging(Settings.parse(s.params))
    options = RefineOptions(resolution_A=12.0)
    with pytest.raises(CsptInputError, match="references"):
        refine_tracks(s.stack, s.tracks, np.zeros((32, 32, 32), np.float32), options, imaging)
    with pytest.raises(CsptInputError, match="half"):
        refine_tracks(s.stack, s.tracks, (s.truth_map, s.truth_map), options, imaging)
    with pytest.raises(CsptInputError, match="image_shape_yx"):
        refine_tracks(s.stack[:, :200], s.tracks, s.truth_map, options, imaging)
