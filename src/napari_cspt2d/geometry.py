"""The one place for angles and projection geometry. Every extraction, projection and refinement goes through here.

Conventions (all of napari-cspt2d follows them; tests pin them with an asymmetric object)
----------------------------------------------------------------------------------------
Image coordinates
    A tilt image is a numpy array ``image[y, x]``: x is the column, y the row. A position ``(x_px, y_px)`` is in
    pixels of the tilt stack (``{name}_stack.mrc``, i.e. ``scope_pixel * data_bin`` Å per pixel, called "unbinned"),
    with pixel *centres* at integer values (numpy convention). IMOD's model coordinates put the origin at the pixel
    corner: ``x_numpy = x_imod - 0.5`` and a model point's z is the 0-based section.
    The image centre is the geometric centre ``((nx - 1) / 2, (ny - 1) / 2)`` (IMOD's ``nx / 2`` in its own
    corner-origin coordinates), see :func:`image_center_px`.

3D coordinates
    A particle's 3D position ``(X, Y, Z)`` is in the same unbinned pixels, relative to the tomogram centre, X and Y
    parallel to the image x and y of the untilted view, Z along the beam at zero tilt.

Tilt (IMOD's geometry, which pyp follows)
    Tilt images are rotations about the Y axis. A point appears in tilt ``t`` (angle ``theta_t``) at::

        x' = X cos(theta_t) + Z sin(theta_t)
        y' = Y
        z' = -X sin(theta_t) + Z cos(theta_t)      (height along the beam; + is towards the source)

    i.e. ``(x', y', z') = R_y(theta_t) @ (X, Y, Z)`` with the right-handed rotation matrix ``R_y``. When a tilt has
    a tilt-axis angle ``axis_t`` (degrees, counter-clockwise from the image y axis in the (x, y) plane, IMOD's
    "rotation angle"), the aligned coordinates are rotated into the raw image by ``R_z(axis_t)``::

        (x_img, y_img) = centre + R_z(axis_t)[:2, :2] @ (x', y') + (shift_x, shift_y)

    where ``(shift_x, shift_y)`` is the projection's 2D shift (the pyp track-data shift). With zero 3D coordinates
    the shift is the position relative to the image centre.

Euler angles (cisTEM/pyp = Frealign = RELION)
    A particle's orientation is cisTEM's ``(phi, theta, psi)`` in degrees, which is RELION's ``(rot, tilt, psi)``:
    ZYZ, and the rotation matrix ``A = euler_to_matrix(phi, theta, psi)`` is RELION's ``Euler_angles2matrix``. ``A``
    maps map (model) coordinates to view coordinates: a map voxel at ``r`` is seen at ``A @ r``, and the projection
    image is the integral of the map along the view z. In Fourier space the image is the central slice
    ``F_map(A.T @ (kx, ky, 0))``.

Orientation of particle p in tilt t
    ``A_pt = R_z(axis_t) @ R_y(theta_t) @ A_p``: the particle's own orientation, then the specimen tilt, then the
    in-plane tilt-axis rotation. See :func:`projection_matrices`.

Shifts
    cisTEM shifts are in Å: the particle centre's offset from the box centre. A particle boxed at the predicted
    position (centre + projection of its 3D point) with its true centre at ``+shift_px`` from the box centre has
    cisTEM shift ``+shift_px * pixel_A``. Reconstruction moves the image by ``-shift`` before insertion.

Symmetry (``particle_sym``, RELION's settings)
    ``Cn``: n-fold axis along z. ``Dn``: ``Cn`` plus a 2-fold axis along x. ``T``: a 3-fold axis along z and a
    2-fold axis in the yz plane. ``O``: 4-fold axes along x, y and z. ``I`` (= ``I2``): 2-fold axes along x, y and
    z, a 5-fold axis in the xz plane; ``I1``: the same 2-fold axes, the 5-fold axis turned 90° about y; ``I3`` and
    ``I4``: a 5-fold axis along z, with the 2-fold axes placed as RELION places them. A
    symmetric map satisfies ``map(S @ r) = map(r)`` for every operator ``S`` of :func:`symmetry_matrices`, so an image
    seen through ``A`` is also a view through every ``A @ S``; reconstruction inserts it once per operator.

Box centre
    For an extracted box of size N (even or odd) the centre is pixel index ``N // 2`` (the FFT origin after
    ``fftshift``), as in RELION and cisTEM.
"""

from __future__ import annotations

import re

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .errors import CsptInputError

__all__ = [
    "euler_to_matrix",
    "matrix_to_euler",
    "rotation_y",
    "rotation_z",
    "tilt_matrices",
    "projection_matrices",
    "project_points",
    "image_center_px",
    "positions_from_shifts",
    "shifts_from_positions",
    "symmetry_matrices",
    "rotvec_matrices",
]


def image_center_px(shape_yx: tuple[int, int]) -> NDArray[np.float64]:
    """Geometric centre ``(x, y)`` of an image of shape ``(ny, nx)`` in numpy pixel coordinates."""
    ny, nx = shape_yx
    return np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])


def rotation_y(angle_deg: ArrayLike) -> NDArray[np.float64]:
    """Right-handed rotation about Y, shape ``(..., 3, 3)``: ``x' = X cos + Z sin``, ``z' = -X sin + Z cos``."""
    a = np.deg2rad(np.asarray(angle_deg, dtype=np.float64))
    c, s = np.cos(a), np.sin(a)
    out = np.zeros(a.shape + (3, 3))
    out[..., 0, 0] = c
    out[..., 0, 2] = s
    out[..., 1, 1] = 1.0
    out[..., 2, 0] = -s
    out[..., 2, 2] = c
    return out


def rotation_z(angle_deg: ArrayLike) -> NDArray[np.float64]:
    """Right-handed in-plane rotation about Z, shape ``(..., 3, 3)``: ``x' = x cos - y sin``, ``y' = x sin + y cos``."""
    a = np.deg2rad(np.asarray(angle_deg, dtype=np.float64))
    c, s = np.cos(a), np.sin(a)
    out = np.zeros(a.shape + (3, 3))
    out[..., 0, 0] = c
    out[..., 0, 1] = -s
    out[..., 1, 0] = s
    out[..., 1, 1] = c
    out[..., 2, 2] = 1.0
    return out


def euler_to_matrix(phi_deg: ArrayLike, theta_deg: ArrayLike, psi_deg: ArrayLike) -> NDArray[np.float64]:
    """RELION/cisTEM ZYZ Euler angles (degrees) to rotation matrices ``A``, shape ``(..., 3, 3)``.

    ``phi`` = RELION rot, ``theta`` = RELION tilt, ``psi`` = RELION psi. ``A`` maps map coordinates to view
    coordinates (RELION's ``Euler_angles2matrix``)."""
    alpha, beta, gamma = (np.deg2rad(np.asarray(v, dtype=np.float64)) for v in (phi_deg, theta_deg, psi_deg))
    alpha, beta, gamma = np.broadcast_arrays(alpha, beta, gamma)
    ca, sa = np.cos(alpha), np.sin(alpha)
    cb, sb = np.cos(beta), np.sin(beta)
    cg, sg = np.cos(gamma), np.sin(gamma)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    out = np.empty(alpha.shape + (3, 3))
    out[..., 0, 0] = cg * cc - sg * sa
    out[..., 0, 1] = cg * cs + sg * ca
    out[..., 0, 2] = -cg * sb
    out[..., 1, 0] = -sg * cc - cg * sa
    out[..., 1, 1] = -sg * cs + cg * ca
    out[..., 1, 2] = sg * sb
    out[..., 2, 0] = sc
    out[..., 2, 1] = ss
    out[..., 2, 2] = cb
    return out


def matrix_to_euler(matrix: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Inverse of :func:`euler_to_matrix`: ``(phi, theta, psi)`` in degrees, each of shape ``matrix.shape[:-2]``.

    theta is in [0, 180]; at the gimbal-lock poles (theta = 0 or 180) psi is set to 0 and phi carries the rotation."""
    a = np.asarray(matrix, dtype=np.float64)
    sb = np.hypot(a[..., 2, 0], a[..., 2, 1])
    theta = np.arctan2(sb, a[..., 2, 2])
    regular = sb > 16 * np.finfo(np.float64).eps
    phi = np.where(regular, np.arctan2(a[..., 2, 1], a[..., 2, 0]), np.arctan2(-a[..., 1, 0], a[..., 1, 1]))
    psi = np.where(regular, np.arctan2(a[..., 1, 2], -a[..., 0, 2]), 0.0)
    return np.rad2deg(phi), np.rad2deg(theta), np.rad2deg(psi)


def tilt_matrices(angle_deg: ArrayLike, axis_deg: ArrayLike = 0.0) -> NDArray[np.float64]:
    """Specimen-to-raw-image rotation of each tilt, ``R_z(axis) @ R_y(angle)``, shape ``(..., 3, 3)``."""
    return rotation_z(axis_deg) @ rotation_y(angle_deg)


def projection_matrices(
    phi_deg: ArrayLike, theta_deg: ArrayLike, psi_deg: ArrayLike, angle_deg: ArrayLike, axis_deg: ArrayLike = 0.0
) -> NDArray[np.float64]:
    """Orientation ``A_pt = R_z(axis) @ R_y(tilt) @ A_particle`` of each projection, shape ``(..., 3, 3)``.

    All arguments broadcast against each other (e.g. one entry per projection)."""
    return tilt_matrices(angle_deg, axis_deg) @ euler_to_matrix(phi_deg, theta_deg, psi_deg)


def project_points(xyz_px: ArrayLike, angle_deg: ArrayLike, axis_deg: ArrayLike = 0.0) -> NDArray[np.float64]:
    """Project 3D points into tilts: ``(x, y, z')`` relative to the image centre, shape ``(N, 3)``.

    ``xyz_px`` has shape ``(N, 3)`` (relative to the tomogram centre), ``angle_deg``/``axis_deg`` shape ``(N,)`` or
    scalars (one tilt per point). The third output column is the height along the beam in the tilted specimen
    (pixels, + towards the source), used for the per-projection defocus offset."""
    xyz = np.asarray(xyz_px, dtype=np.float64).reshape(-1, 3)
    rot = tilt_matrices(angle_deg, axis_deg)
    if rot.ndim == 2:
        return xyz @ rot.T
    return np.einsum("nij,nj->ni", rot, xyz)


def positions_from_shifts(
    xyz_px: ArrayLike, angle_deg: ArrayLike, axis_deg: ArrayLike, shift_xy_px: ArrayLike, shape_yx: tuple[int, int]
) -> NDArray[np.float64]:
    """Image positions ``(N, 2)`` (x, y) = centre + projection of the 3D point + shift (pyp track-data meaning)."""
    return image_center_px(shape_yx) + project_points(xyz_px, angle_deg, axis_deg)[:, :2] + np.asarray(shift_xy_px)


def shifts_from_positions(
    xyz_px: ArrayLike, angle_deg: ArrayLike, axis_deg: ArrayLike, position_xy_px: ArrayLike, shape_yx: tuple[int, int]
) -> NDArray[np.float64]:
    """Inverse of :func:`positions_from_shifts`: shifts ``(N, 2)`` that put each projection at ``position_xy_px``."""
    return np.asarray(position_xy_px) - image_center_px(shape_yx) - project_points(xyz_px, angle_deg, axis_deg)[:, :2]


def rotvec_matrices(rotvec_rad: ArrayLike) -> NDArray[np.float64]:
    """Rotations by ``|v|`` radians about the unit vectors ``v / |v|`` (Rodrigues; a zero vector gives the identity):
    rotation vectors ``(..., 3)`` -> matrices ``(..., 3, 3)``."""
    v = np.asarray(rotvec_rad, dtype=np.float64)
    angle = np.linalg.norm(v, axis=-1)[..., None, None]
    u = v / np.where(angle[..., 0] > 0, angle[..., 0], 1.0)
    zero = np.zeros(u.shape[:-1])
    cross = np.stack([np.stack([zero, -u[..., 2], u[..., 1]], -1), np.stack([u[..., 2], zero, -u[..., 0]], -1),
                      np.stack([-u[..., 1], u[..., 0], zero], -1)], -2)
    outer = u[..., :, None] * u[..., None, :]
    return np.cos(angle) * np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * outer


def _axis_rotation(axis: ArrayLike, fold: int) -> NDArray[np.float64]:
    """Rotation by ``360° / fold`` about ``axis``."""
    u = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    return rotvec_matrices(u * (2.0 * np.pi / fold))


_PHI = (1.0 + 5.0**0.5) / 2.0
#: Generators (fold, axis) of the polyhedral groups in RELION's settings, exact (``I1``, ``I3``, ``I4`` are ``I2``
#: turned about y by the angle in :data:`_ICOSAHEDRAL_TURN_DEG`).
_POLYHEDRAL_GENERATORS: dict[str, list[tuple[int, tuple[float, float, float]]]] = {
    "T": [(3, (0.0, 0.0, 1.0)), (2, (0.0, 2.0**0.5, 1.0))],
    "O": [(4, (0.0, 0.0, 1.0)), (3, (1.0, 1.0, 1.0))],
    "I2": [(2, (0.0, 0.0, 1.0)), (5, (1.0, 0.0, _PHI)), (3, (0.0, 1.0, _PHI**2))],
}
_ICOSAHEDRAL_TURN_DEG = {"I1": 90.0, "I3": -np.degrees(np.arctan(1.0 / _PHI)), "I4": np.degrees(np.arctan(1.0 / _PHI))}


def symmetry_matrices(symmetry: str) -> NDArray[np.float64]:
    """Rotation matrices ``(n, 3, 3)`` of a point group (identity first): ``C1``, ``Cn``, ``Dn``, ``T``, ``O``, ``I``
    (= ``I2``), ``I1``..``I4`` (case-insensitive; axes as in the module docstring). Others raise
    :class:`CsptInputError`."""
    text = str(symmetry).strip().upper()
    text = "I2" if text == "I" else text
    match = re.fullmatch(r"([CD])([1-9][0-9]{0,2})", text)
    if text in _ICOSAHEDRAL_TURN_DEG:
        turn = rotation_y(_ICOSAHEDRAL_TURN_DEG[text])
        return turn @ symmetry_matrices("I2") @ turn.T
    if match is None and text not in _POLYHEDRAL_GENERATORS:
        raise CsptInputError(f"is {symmetry!r}", field="particle_sym",
                             expected="C1, Cn, Dn, T, O, I or I1..I4 (RELION's settings)")
    if match is None:
        generators = [_axis_rotation(axis, fold) for fold, axis in _POLYHEDRAL_GENERATORS[text]]
    else:
        generators = [_axis_rotation((0, 0, 1), int(match.group(2)))]
        if match.group(1) == "D":
            generators.append(_axis_rotation((1, 0, 0), 2))
    group = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:  # closure under the generators
        found = []
        for m in frontier:
            for g in generators:
                candidate = g @ m
                if not any(np.allclose(candidate, known, atol=1e-9) for known in group):
                    group.append(candidate)
                    found.append(candidate)
        frontier = found
    return np.array(group)
