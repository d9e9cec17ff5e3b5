"""Pins the conventions of geometry.py: Euler angles, handedness, shifts, and agreement with IMOD's solution."""

from pathlib import Path

import numpy as np
import pytest

from napari_cspt2d.errors import CsptInputError
from napari_cspt2d import geometry
from napari_cspt2d.geometry import symmetry_matrices

DATA = Path(__file__).parents[1].parent / "shared" / "data"
BBA = DATA / "imod_bba"


def _random_angles(rng, n):
    return rng.uniform(-180, 180, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)


def test_euler_round_trip_and_rotation_properties():
    rng = np.random.default_rng(0)
    phi, theta, psi = _random_angles(rng, 500)
    a = geometry.euler_to_matrix(phi, theta, psi)
    assert np.allclose(a @ np.swapaxes(a, -1, -2), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(a), 1.0)
    back = geometry.euler_to_matrix(*geometry.matrix_to_euler(a))
    assert np.allclose(back, a, atol=1e-9)
    # gimbal lock: theta = 0 keeps only phi + psi
    lock = geometry.euler_to_matrix(30.0, 0.0, 20.0)
    assert np.allclose(geometry.euler_to_matrix(*geometry.matrix_to_euler(lock)), lock, atol=1e-12)


def test_euler_matches_zyz_composition():
    """RELION: A = R_z(psi) · R_y(theta) · R_z(phi) in the *passive* (frame) sense, i.e. the transposes of the
    active rotations; independent construction from elementary rotations."""
    phi, theta, psi = 40.0, 25.0, -70.0
    rz, ry = geometry.rotation_z, geometry.rotation_y
    expected = rz(psi).T @ ry(theta).T @ rz(phi).T
    assert np.allclose(geometry.euler_to_matrix(phi, theta, psi), expected, atol=1e-12)


def test_tilt_handedness_with_asymmetric_object():
    """A point at +X seen at +60° tilt moves towards the source (z' < 0 per the docstring: z' = -X sin t);
    a point at +Z shows up at +x (x' = Z sin t). Mirroring (negating Z) changes the projection."""
    pts = np.array([[10.0, 0.0, 0.0], [0.0, 0.0, 10.0], [3.0, 7.0, -5.0]])
    t = 60.0
    proj = geometry.project_points(pts, np.full(3, t))
    s, c = np.sin(np.radians(t)), np.cos(np.radians(t))
    assert np.allclose(proj[0], [10 * c, 0, -10 * s])
    assert np.allclose(proj[1], [10 * s, 0, 10 * c])
    mirrored = geometry.project_points(pts * [1, 1, -1], np.full(3, t))
    assert not np.allclose(mirrored[:, 0], proj[:, 0])
    # the tilt-axis angle rotates counter-clockwise from the image y axis
    on_axis = geometry.project_points([[0.0, 10.0, 0.0]], 0.0, 90.0)
    assert np.allclose(on_axis[0, :2], [-10.0, 0.0])


def test_projection_matrix_consistent_with_project_points():
    """The orientation A_pt maps a particle-frame vector to the tilted view exactly as project_points maps a
    specimen point: A_pt @ (A_p^T r) == tilt_matrices @ r."""
    rng = np.random.default_rng(1)
    phi, theta, psi = _random_angles(rng, 20)
    tilt, axis = rng.uniform(-60, 60, 20), rng.uniform(-90, 90, 20)
    r = rng.normal(size=(20, 3))
    a_p = geometry.euler_to_matrix(phi, theta, psi)
    a_pt = geometry.projection_matrices(phi, theta, psi, tilt, axis)
    via_particle = np.einsum("nij,nj->ni", a_pt, np.einsum("nji,nj->ni", a_p, r))
    assert np.allclose(via_particle, geometry.project_points(r, tilt, axis))


def test_shift_sign_round_trip():
    rng = np.random.default_rng(2)
    xyz = rng.normal(scale=100, size=(30, 3))
    tilt, axis = rng.uniform(-60, 60, 30), np.full(30, 85.0)
    shift = rng.normal(size=(30, 2))
    pos = geometry.positions_from_shifts(xyz, tilt, axis, shift, (400, 600))
    assert np.allclose(pos - geometry.positions_from_shifts(xyz, tilt, axis, 0 * shift, (400, 600)), shift)
    assert np.allclose(geometry.shifts_from_positions(xyz, tilt, axis, pos, (400, 600)), shift)
    assert np.allclose(geometry.image_center_px((400, 600)), [299.5, 199.5])


def _load_bba():
    if not BBA.is_dir():
        pytest.skip(f"shared test data not found at {BBA}")
    resid = np.loadtxt(BBA / "BBa.resid", skiprows=1)
    xyz = np.loadtxt(BBA / "BBafid.xyz", usecols=range(6))
    tlt = np.loadtxt(BBA / "BBa.tlt")
    xf = np.loadtxt(BBA / "BBa.tltxf")
    view = resid[:, 2].astype(int)
    bead = np.cumsum(np.r_[0, np.diff(view) <= 0])  # a new bead starts where the view index does not increase
    assert bead.max() + 1 == len(xyz)
    return resid, xyz[bead, 1:4], tlt[view], xf[view]


def test_projection_agrees_with_imod_solution():
    """IMOD's solved 3D beads projected by project_points land on the aligned observations (≈0.26 px rms);
    the opposite handedness is off by tens of pixels."""
    resid, xyz, tilt, xf = _load_bba()
    centre = 256.0  # IMOD's nx/2 in corner-origin coordinates
    a = xf[:, :4].reshape(-1, 2, 2)
    aligned = np.einsum("nij,nj->ni", a, resid[:, :2] - centre) + xf[:, 4:]
    rel = xyz - [centre, centre, 0.0]
    rms = np.sqrt(((geometry.project_points(rel, tilt)[:, :2] - aligned) ** 2).mean(axis=0))
    assert np.all(rms < 0.35), rms
    flipped = np.sqrt(((geometry.project_points(rel * [1, 1, -1], tilt)[:, :2] - aligned) ** 2).mean(axis=0))
    assert flipped[0] > 10.0


def test_positions_with_tilt_axis_agree_with_imod_raw_frame():
    """With the tilt-axis angle and shift taken from each view's IMOD transform, positions_from_shifts (numpy
    pixel centres, +0.5 to IMOD) reproduces IMOD's predicted positions in the prealigned frame; the small
    magnification/skew of the IMOD transforms, which a rotation cannot express, limits the agreement to < 1 px."""
    resid, xyz, tilt, xf = _load_bba()
    centre = 256.0
    inv = np.linalg.inv(xf[:, :4].reshape(-1, 2, 2))
    u, _, vt = np.linalg.svd(inv)
    rot = u @ vt
    axis = np.degrees(np.arctan2(rot[:, 1, 0], rot[:, 0, 0]))
    shift = -np.einsum("nij,nj->ni", inv, xf[:, 4:])
    predicted_imod = resid[:, :2] + resid[:, 3:5]  # residual = projected - observed
    rel = xyz - [centre, centre, 0.0]
    pos = geometry.positions_from_shifts(rel, tilt, axis, shift, (512, 512)) + 0.5
    rms = np.sqrt(((pos - predicted_imod) ** 2).mean(axis=0))
    assert np.all(rms < 1.0), rms
    wrong_way = geometry.positions_from_shifts(rel, tilt, -axis, shift, (512, 512)) + 0.5
    assert np.sqrt(((wrong_way - predicted_imod) ** 2).mean()) > 10.0


@pytest.mark.parametrize("name, order", [("C1", 1), ("c4", 4), ("D7", 14), ("T", 12), ("O", 24), ("I", 60),
                                         ("I1", 60), ("I3", 60), ("I4", 60)])
def test_symmetry_groups_are_closed_rotation_groups(name, order):
    ops = symmetry_matrices(name)
    assert ops.shape == (order, 3, 3) and np.allclose(ops[0], np.eye(3))
    assert np.allclose(np.linalg.det(ops), 1.0) and np.allclose(ops @ np.swapaxes(ops, 1, 2), np.eye(3))
    flat = ops.reshape(order, 9)
    for a in ops:  # every product is again in the group
        products = (a @ ops).reshape(order, 1, 9)
        assert np.all(np.min(np.abs(products - flat[None]).max(-1), axis=1) < 1e-9)


def test_symmetry_axes_follow_relion():
    z4 = symmetry_matrices("C4")
    assert np.allclose(z4 @ [0, 0, 1], [0, 0, 1]) and not np.allclose(z4[1] @ [1, 0, 0], [1, 0, 0])
    d3 = symmetry_matrices("D3")
    assert any(np.allclose(s @ [1, 0, 0], [1, 0, 0]) and np.allclose(s @ [0, 0, 1], [0, 0, -1]) for s in d3)
    octa = symmetry_matrices("O")
    for axis in np.eye(3):  # 4-fold axes along x, y and z
        assert sum(np.allclose(s @ axis, axis) for s in octa) == 4
    fold = lambda ops, axis: sum(np.allclose(s @ axis, axis, atol=1e-6) for s in ops)  # noqa: E731
    for name, axes in RELION_SYMMETRY_AXES.items():
        ops = symmetry_matrices(name)
        assert [fold(ops, np.array(a) / np.linalg.norm(a)) for _, a in axes] == [n for n, _ in axes], name
    assert np.allclose(symmetry_matrices("I"), symmetry_matrices("I2"))


#: (fold, axis) of the generators RELION lists for its polyhedral groups (src/symmetries.cpp), to 6 digits.
RELION_SYMMETRY_AXES = {
    "T": [(3, (0, 0, 1)), (2, (0, 0.816497, 0.577350))],
    "I1": [(2, (1, 0, 0)), (5, (0.850651, 0, -0.525731)), (3, (0.934172, 0.356822, 0))],
    "I2": [(2, (0, 0, 1)), (5, (0.525731, 0, 0.850651)), (3, (0, 0.356822, 0.934172))],
    "I3": [(2, (-0.525731, 0, 0.850651)), (5, (0, 0, 1)), (3, (-0.491123, 0.356822, 0.794654))],
    "I4": [(2, (0.525731, 0, 0.850651)), (5, (0.894427, 0, 0.447214)), (3, (0.491123, 0.356822, 0.794654))],
}


@pytest.mark.parametrize("bad", ["I5", "C0", "X3", "D", ""])
def test_unsupported_symmetry_is_refused(bad):
    with pytest.raises(CsptInputError, match="particle_sym"):
        symmetry_matrices(bad)


def test_rotvec_matrices_match_scipy_rotation():
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(3)
    vectors = np.concatenate([rng.normal(size=(20, 3)) * rng.uniform(0, np.pi, (20, 1)), np.zeros((1, 3)),
                              [[1e-12, 0, 0], [0, 0, np.pi]]])
    np.testing.assert_allclose(geometry.rotvec_matrices(vectors), Rotation.from_rotvec(vectors).as_matrix(),
                               atol=1e-12)
    assert geometry.rotvec_matrices(vectors[0]).shape == (3, 3)
