"""io/cryodrgn.py: pose and CTF pickles, checked against cryoDRGN-ET's own test files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from napari_cspt2d.errors import CsptInputError
from napari_cspt2d.io import cryodrgn, star
from napari_cspt2d.model.tracks import ParticleTable, TiltTable, TrackSet
from napari_cspt2d import geometry
from napari_cspt2d.recon import ctf


@pytest.fixture(scope="module")
def sta(request):
    folder = request.getfixturevalue("shared_data") / "cryodrgn_tilt"
    ps = star.read_particle_series_star(folder / "sta_testing_bin8.star", (4096, 4096))
    return folder, ps


def _angle_deg(a, b):
    rel = np.einsum("nij,nkj->nik", a, b)
    return np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)))


def test_poses_follow_cryodrgn_convention(sta):
    """Rotations from (particle orientation, tilt, axis) reproduce the per-image poses cryoDRGN was given."""
    folder, ps = sta
    rot_ref, trans_ref = cryodrgn.read_poses(folder / "sta_pose.pkl")
    assert rot_ref.shape == (219, 3, 3) and np.all(np.abs(trans_ref) < 0.002)
    zero = np.zeros((len(ps.tracks), 2))
    rot, trans = cryodrgn.poses(ps.tracks, box_px=64, offset_px=zero)
    err = _angle_deg(rot[ps.projection_row], rot_ref)
    assert np.median(err) < 3.0 and np.all(trans == 0)
    mirrored = ps.tracks.replace(tilts=TiltTable.from_angles(-ps.tracks.tilts.angle_deg,
                                                             axis_deg=ps.tracks.tilts.axis_deg))
    wrong, _ = cryodrgn.poses(mirrored, box_px=64, offset_px=zero)
    assert np.median(_angle_deg(wrong[ps.projection_row], rot_ref)) > 10.0


def test_ctf_layout_matches_cryodrgn_file(sta, tmp_path):
    folder, ps = sta
    ref = cryodrgn.read_ctf(folder / "sta_ctf.pkl")
    inverse = np.argsort(ps.projection_row)  # star row of each TrackSet row
    du, dv = ps.defocus_u_A[inverse], ps.defocus_v_A[inverse]
    params = cryodrgn.ctf_params(ps.tracks, box_px=512, pixel_A=1.82, tilt_pixel_A=1.82, voltage_kV=300,
                                 cs_mm=2.7, amp_contrast=0.07, defocus_A=0.5 * (du + dv), astigmatism_A=du - dv,
                                 astigmatism_angle_deg=ps.defocus_angle_deg[inverse])
    np.testing.assert_allclose(params[ps.projection_row], ref, rtol=1e-6)
    path = tmp_path / "ctf.pkl"
    cryodrgn.write_ctf(path, params)
    with open(path, "rb") as fh:
        plain = pickle.load(fh)  # what cryoDRGN does
    assert plain.dtype == np.float32 and plain.shape == (219, 9)
    np.testing.assert_array_equal(cryodrgn.read_ctf(path), params)


def _tracks():
    tilts = TiltTable.from_angles([-30.0, 0.0, 30.0], defocus_um=[2.0, 2.5, 3.0], axis_deg=80.0)
    particles = ParticleTable(np.array([0, 1]), np.array([[10.0, 5.0, 40.0], [0.0, 0.0, 0.0]]),
                              np.array([[20.0, 30.0, 40.0], [0.0, 0.0, 0.0]]))
    return TrackSet(np.array([0, 0, 1]), np.array([0, 1, 2]), np.array([[2.0, -1.0], [0.0, 0.0], [0.5, 0.5]]),
                    np.zeros(3), np.full(3, 100.0), particles, tilts, (100, 100))


def test_poses_and_trans_sign_round_trip(tmp_path):
    tracks = _tracks()
    rot, trans = cryodrgn.poses(tracks, box_px=64, binning=2.0)
    expected = geometry.projection_matrices(40.0, 30.0, 20.0, -30.0, 80.0)  # (phi, theta, psi) = stored reversed
    np.testing.assert_allclose(rot[0], expected)
    np.testing.assert_allclose(trans[0], [-2.0 / 2 / 64, 1.0 / 2 / 64])  # RELION origin = -offset
    path = tmp_path / "poses.pkl"
    cryodrgn.write_poses(path, rot, trans)
    with open(path, "rb") as fh:
        plain_rot, plain_trans = pickle.load(fh)
    np.testing.assert_array_equal(plain_rot, rot)
    np.testing.assert_array_equal(plain_trans, trans)
    back_rot, back_trans = cryodrgn.read_poses(path)
    np.testing.assert_array_equal(back_rot, rot)
    np.testing.assert_array_equal(back_trans, trans)


def test_ctf_height_defocus():
    tracks = _tracks()
    params = cryodrgn.ctf_params(tracks, box_px=64, pixel_A=2.0, tilt_pixel_A=1.0, astigmatism_A=100.0)
    height = tracks.projected_px()[:, 2]
    mean = ctf.projection_defocus_A(tracks.tilts.defocus_um[tracks.tilt_rows()], height, 1.0)
    np.testing.assert_allclose(params[:, 2], mean + 50.0, rtol=1e-6)
    np.testing.assert_allclose(params[:, 3], mean - 50.0, rtol=1e-6)
    assert params[1, 2] < 2.5e4 + 50  # particle 0 sits above the centre at 0 deg: less underfocus
    flat = cryodrgn.ctf_params(tracks, box_px=64, pixel_A=2.0, tilt_pixel_A=1.0, height_defocus=False)
    np.testing.assert_allclose(flat[:, 2], [2e4, 2.5e4, 3e4])
    assert list(flat[0, [0, 1, 5, 6, 7, 8]]) == pytest.approx([64, 2.0, 300, 2.7, 0.07, 0])


def test_bad_input(tmp_path):
    tracks = _tracks()
    with pytest.raises(CsptInputError, match="box_px"):
        cryodrgn.poses(tracks, box_px=0)
    with pytest.raises(CsptInputError, match="offset_px"):
        cryodrgn.poses(tracks, box_px=64, offset_px=np.zeros((2, 2)))
    with pytest.raises(CsptInputError, match="defocus_A"):
        cryodrgn.ctf_params(tracks, box_px=64, pixel_A=1.0, tilt_pixel_A=1.0, defocus_A=[1.0])
    with pytest.raises(CsptInputError, match="poses"):
        cryodrgn.write_poses(tmp_path / "p.pkl", np.zeros((2, 3, 3)), np.zeros((3, 2)))
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(print))
    with pytest.raises(CsptInputError, match="refused"):
        cryodrgn.read_poses(path)
    path.write_bytes(pickle.dumps((np.zeros((2, 3, 3)), np.zeros((2, 3)))))
    with pytest.raises(CsptInputError, match="shapes"):
        cryodrgn.read_poses(path)
