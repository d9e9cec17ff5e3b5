"""recon/trackfit.py: per-particle 3D fit, global refinement, robust weights, and agreement with IMOD tiltalign."""

from __future__ import annotations

import numpy as np
import pytest

from napari_cspt2d.errors import CsptInputError
from napari_cspt2d.io import imod
from napari_cspt2d.model.tracks import TiltTable, TrackSet
from napari_cspt2d import geometry
from napari_cspt2d.recon import ctf, trackfit

SHAPE = (300, 420)


def synthetic(n_particles=30, axis=8.0, seed=0, shifts=None, mags=None, rotations=None):
    """Exact 2D tracks of random 3D points through a tilt series, with optional per-tilt distortions."""
    rng = np.random.default_rng(seed)
    angles = np.arange(-60.0, 61.0, 4.0)
    n_t = len(angles)
    xyz = np.column_stack([rng.uniform(-150, 150, n_particles), rng.uniform(-110, 110, n_particles),
                           rng.uniform(-40, 40, n_particles)])
    pid = np.repeat(np.arange(n_particles), n_t)
    tid = np.tile(np.arange(n_t), n_particles)
    rot = np.zeros(n_t) if rotations is None else rotations
    proj = geometry.project_points(xyz[pid], angles[tid], axis + rot[tid])[:, :2]
    mag = np.ones(n_t) if mags is None else mags
    shift = np.zeros((n_t, 2)) if shifts is None else shifts
    pos = geometry.image_center_px(SHAPE) + shift[tid] + mag[tid, None] * proj
    tilts = TiltTable.from_angles(angles, axis_deg=axis)
    return TrackSet.from_positions(pid, tid, pos, tilts, SHAPE), xyz


def test_exact_tracks_give_exact_points_and_zero_residual():
    tracks, xyz = synthetic()
    fit = trackfit.fit_tracks(tracks, robust="none")
    np.testing.assert_allclose(fit.xyz_px, xyz, atol=1e-8)
    assert fit.rms_px < 1e-8 and fit.determined.all()
    assert np.all(fit.n_used == tracks.n_tilts)


def test_residual_sign_is_projected_minus_observed():
    tracks, _ = synthetic(n_particles=5)
    moved = tracks.with_positions([0], tracks.positions_px()[:1] + [3.0, 0.0])
    fit = trackfit.fit_tracks(moved, robust="none")
    assert fit.residual_px[0, 0] < -1.0  # the observation moved right of the prediction


def test_robust_weights_resist_outliers():
    tracks, xyz = synthetic(seed=3)
    rng = np.random.default_rng(4)
    pos = tracks.positions_px() + rng.normal(0, 0.2, (len(tracks), 2))
    bad = rng.choice(len(tracks), len(tracks) // 15, replace=False)
    pos[bad] += rng.uniform(15, 30, (len(bad), 2)) * rng.choice([-1, 1], (len(bad), 2))
    noisy = tracks.with_positions(np.arange(len(tracks)), pos)
    err = {r: np.median(np.linalg.norm(trackfit.fit_tracks(noisy, robust=r).xyz_px - xyz, axis=1))
           for r in ("none", "huber", "tukey")}
    assert err["none"] > 0.5
    assert err["huber"] < 0.6 * err["none"]
    assert err["tukey"] < 0.15
    fit = trackfit.fit_tracks(noisy, robust="tukey")
    assert np.all(fit.weight[bad] < 0.05) and np.median(np.delete(fit.weight, bad)) > 0.8


def test_global_refinement_recovers_tilt_geometry():
    rng = np.random.default_rng(7)
    n_t = 31
    shifts = rng.normal(0, 6, (n_t, 2))
    mags = 1 + rng.normal(0, 0.01, n_t)
    rotations = rng.normal(0, 0.8, n_t)
    ref = n_t // 2  # the 0 deg tilt is the reference: no shift, unit magnification
    shifts[ref], mags[ref] = 0.0, 1.0
    tracks, xyz = synthetic(n_particles=25, shifts=shifts, mags=mags, rotations=rotations, seed=8)
    plain = trackfit.fit_tracks(tracks, robust="none")
    fit = trackfit.fit_tracks(tracks, refine=("rotation", "shift", "mag"), robust="none")
    assert plain.mean_residual_px > 2.0
    assert fit.mean_residual_px < 1e-5
    assert fit.reference_tilt == tracks.tilts.id[ref]
    np.testing.assert_allclose(fit.geometry.axis_deg, 8.0 + rotations, atol=1e-5)
    np.testing.assert_allclose(fit.geometry.mag, mags, atol=1e-7)
    # translation gauge: points agree up to one translation, shifts up to its projection
    delta = fit.xyz_px - xyz
    np.testing.assert_allclose(delta, np.broadcast_to(delta.mean(0), delta.shape), atol=1e-5)
    np.testing.assert_allclose(fit.predict_px(tracks.particle, tracks.tilt), tracks.positions_px(), atol=1e-5)


def test_axis_search_and_global_axis():
    tracks, _ = synthetic(axis=-63.0, seed=5)
    assert trackfit.estimate_axis_deg(tracks) == pytest.approx(-63.0, abs=0.05)
    wrong = tracks.replace(tilts=tracks.tilts.__class__.from_angles(tracks.tilts.angle_deg, axis_deg=0.0))
    wrong = wrong.with_positions(np.arange(len(tracks)), tracks.positions_px())
    fit = trackfit.fit_tracks(wrong, refine=("axis",), axis_search=True, robust="none")
    assert fit.geometry.axis_deg == pytest.approx(np.full(tracks.n_tilts, -63.0), abs=1e-6)
    assert fit.mean_residual_px < 1e-6


def test_gaps_single_views_and_use_mask():
    tracks, xyz = synthetic(n_particles=6)
    rng = np.random.default_rng(1)
    keep = rng.random(len(tracks)) > 0.3
    keep[tracks.particle == 5] = False
    keep[(tracks.particle == 5) & (tracks.tilt == 3)] = True  # particle 5: one view only
    sub = tracks.select(keep)
    fit = trackfit.fit_tracks(sub, robust="none")
    np.testing.assert_allclose(fit.xyz_px[:5], xyz[:5], atol=1e-8)
    assert not fit.determined[5] and fit.xyz_px[5, 2] == pytest.approx(0.0, abs=1e-3)
    assert fit.residual_px[sub.particle == 5] == pytest.approx(0.0, abs=1e-3)
    moved = sub.with_positions([0], sub.positions_px()[:1] + 50.0)
    use = np.ones(len(sub), bool)
    use[0] = False
    masked = trackfit.fit_tracks(moved, robust="none", use=use)
    np.testing.assert_allclose(masked.xyz_px[:5], xyz[:5], atol=1e-8)
    assert masked.weight[0] == 0 and np.hypot(*masked.residual_px[0]) > 40


def test_apply_fit_keeps_positions_and_fill_missing_predicts():
    tracks, _ = synthetic(n_particles=8)
    removed = (tracks.tilt % 5 == 0) & (tracks.particle % 2 == 0)
    sub = tracks.select(~removed)
    fit = trackfit.fit_tracks(sub)
    applied = trackfit.apply_fit(sub, fit)
    np.testing.assert_allclose(applied.positions_px(), sub.positions_px(), atol=1e-9)
    assert np.abs(applied.shift_px).max() < 1e-6  # exact tracks: pyp shifts become (zero) residuals
    pid, tid = trackfit.missing_pairs(sub)
    assert len(pid) == removed.sum() and np.all(tid % 5 == 0) and np.all(pid % 2 == 0)
    filled = trackfit.fill_missing(applied, fit)
    assert len(filled) == len(tracks)
    np.testing.assert_allclose(filled.positions_px(), tracks.positions_px(), atol=1e-6)


def test_apply_fit_with_refined_tilts_updates_tilt_table():
    rotations = np.linspace(-1, 1, 31)
    tracks, _ = synthetic(rotations=rotations)
    fit = trackfit.fit_tracks(tracks, refine=("rotation",), robust="none")
    applied = trackfit.apply_fit(tracks, fit)
    np.testing.assert_allclose(applied.tilts.axis_deg, 8.0 + rotations, atol=1e-6)
    np.testing.assert_allclose(applied.positions_px(), tracks.positions_px(), atol=1e-9)
    assert np.abs(applied.shift_px).max() < 1e-5


def test_defocus_offset_follows_ctf_convention():
    tracks, _ = synthetic(n_particles=4)
    moved = tracks.with_particle_xyz(np.array([[0, 0, 50.0], [0, 0, -50.0], [100, 0, 0], [0, 0, 0]]))
    off = trackfit.defocus_offset_um(moved, 2.0)
    height = moved.projected_px()[:, 2]
    np.testing.assert_allclose(off, (ctf.projection_defocus_A(0.0, height, 2.0)) * 1e-4)
    zero_tilt = moved.tilt == moved.tilts.id[np.argmin(np.abs(moved.tilts.angle_deg))]
    assert np.all(off[zero_tilt & (moved.particle == 0)] < 0)  # nearer the source: less underfocus


@pytest.mark.parametrize("kwargs, field", [
    ({"robust": "cauchy"}, "robust"),
    ({"refine": ("shift", "skew")}, "refine"),
    ({"use": np.ones(3, bool)}, "use"),
    ({"scale_px": -1.0}, "scale_px"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    tracks, _ = synthetic(n_particles=3)
    with pytest.raises(CsptInputError) as info:
        trackfit.fit_tracks(tracks, **kwargs)
    assert info.value.field == field


def test_fit_needs_image_shape_and_known_ids():
    tracks, _ = synthetic(n_particles=3)
    with pytest.raises(CsptInputError, match="image_shape_yx"):
        trackfit.fit_tracks(tracks.replace(image_shape_yx=None))
    fit = trackfit.fit_tracks(tracks)
    with pytest.raises(CsptInputError):
        fit.predict_px([99], [0])


# ------------------------------------------------------------------------------------ real IMOD bead data
IMOD_SETS = {"imod_bba": ("BBa", (512, 512)), "imod_midzone2": ("midzone2a", (1024, 1950))}


def _imod(shared_data, folder):
    stem, shape = IMOD_SETS[folder]
    base = shared_data / folder / stem
    resid = imod.read_resid(base.with_suffix(".resid"))
    ref = imod.read_fid_xyz(base.parent / f"{stem}fid.xyz")
    return base, shape, resid, ref


@pytest.mark.parametrize("folder", sorted(IMOD_SETS))
def test_imod_beads_aligned_frame_match_tiltalign(shared_data, folder):
    """Tracks mapped through IMOD's .tltxf: 3D points and mean residual agree with tiltalign's own solution."""
    base, shape, resid, ref = _imod(shared_data, folder)
    xf = imod.read_xf(base.with_suffix(".tltxf"))
    tracks = imod.tracks_from_resid(resid, base.with_suffix(".tlt"), shape, xf=xf)
    assert tracks.n_particles == len(ref.point)
    fit = trackfit.fit_tracks(tracks)
    err = np.linalg.norm(fit.xyz_px - ref.xyz_px(), axis=1)
    assert np.median(err) < 0.5
    assert fit.mean_residual_px == pytest.approx(resid.mean_residual_px, rel=0.10)


@pytest.mark.parametrize("folder, refine", [
    ("imod_bba", ("rotation", "shift", "mag")),
    ("imod_midzone2", ("rotation", "shift", "mag", "tilt")),
])
def test_imod_beads_global_refinement_from_prealigned_frame(shared_data, folder, refine):
    """From the prealigned tracks alone (axis found by search): same residual level as tiltalign, and the same 3D
    bead constellation up to the weakly determined global scale/skew (an affine map close to identity)."""
    base, shape, resid, ref = _imod(shared_data, folder)
    tracks = imod.tracks_from_resid(resid, base.with_suffix(".tlt"), shape)
    fit = trackfit.fit_tracks(tracks, refine=refine, robust="none", axis_search=True)
    assert fit.mean_residual_px == pytest.approx(resid.mean_residual_px, rel=0.10)
    ours, theirs = fit.xyz_px - fit.xyz_px.mean(0), ref.xyz_px() - ref.xyz_px().mean(0)
    m, *_ = np.linalg.lstsq(theirs, ours, rcond=None)
    assert np.abs(m - np.eye(3)).max() < 0.02  # same hand, axis and scale within 2 %
    assert np.median(np.linalg.norm(theirs @ m - ours, axis=1)) < 0.05
    # IMOD's .tltxf rotation is the inverse of ours: prealigned = A^-1 (aligned)
    a = imod.read_xf(base.with_suffix(".tltxf"))[:, :, :2]
    imod_axis = -np.degrees(np.arctan2(a[:, 1, 0] - a[:, 0, 1], a[:, 0, 0] + a[:, 1, 1]))
    assert np.median(np.abs(fit.geometry.axis_deg - imod_axis)) < 1.0


def test_cli_fit(tmp_path, capsys):
    from napari_cspt2d import cli
    from napari_cspt2d.io.trackdata import read_track_data, write_track_data

    tracks, xyz = synthetic(n_particles=5)
    write_track_data(tmp_path / "t.json", tracks)
    assert cli.main(["fit", str(tmp_path / "t.json"), "--robust", "none", "--out", str(tmp_path / "f.json")]) == 0
    assert "mean residual 0.000 px" in capsys.readouterr().out
    np.testing.assert_allclose(read_track_data(tmp_path / "f.json").particles.xyz_px, xyz, atol=1e-8)
    assert cli.main(["fit", str(tmp_path / "t.json"), "--refine", "skew"]) == 2
