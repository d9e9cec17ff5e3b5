"""pyp's rules for the ``.cistem`` pair, each encoded here from pyp's public source (nextpyp/pyp), independently of
the writer and reader under test:

* ``src/pyp/inout/metadata/core.py`` ``tomo_extract_coordinates``: a projection's position in the raw image is
  ``tilt_X_true = T (x', y') + (dx, dy) + rec/2 - (rec - image)/2`` with ``x' = (X - rec_x/2) cos t + (Z - rec_z/2)
  sin t``, ``y' = Y - rec_y/2`` (IMOD's corner-origin pixels, ``T`` the inverse alignment transform, ``rec`` =
  ``tomo`` x ``tomo_rec_binning``); ``ORIGINAL_X_POSITION = floor(tilt_X_true)``; ``X_SHIFT = (floor - true) x
  scope_pixel x data_bin x extract_bin`` while ``PIXEL_SIZE = scope_pixel x data_bin``; the extended file keeps the
  absolute 3D position (``x_position_3d``) and ``TILTAXIS = -axis``, ``axis`` being the rotation of ``T``;
  ``csp_extract_coordinates`` reads iteration ``it``'s input from ``frealign/maps/{data_set}_r01_{it-1:02d}/``.
* ``src/pyp/extract/core.py`` ``extract_particles_non_mpi``: the box is cut at ``floor(ORIGINAL / binning -
  floor(box / 2))``, rows from ``ORIGINAL_Y``, columns from ``ORIGINAL_X``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from test_cistem import MICROSCOPE, dyadic_tracks

from napari_cspt2d.cli import _latest_iteration
from napari_cspt2d.errors import CsptInputError, CsptInputWarning
from napari_cspt2d.io import cistem
from napari_cspt2d.pyp import Parameters, create_project, load_project

PIXEL = 1.35


def pyp_box(image: np.ndarray, original_x: float, original_y: float, box: int, binning: int = 1) -> np.ndarray:
    """The box pyp's ``extract_particles_non_mpi`` cuts (inside the image: no padding needed here)."""
    col = math.floor(original_x / binning - math.floor(box / 2.0))
    row = math.floor(original_y / binning - math.floor(box / 2.0))
    return image[row:row + box, col:col + box]


def test_pyps_extraction_boxes_the_particle_where_its_track_says():
    tracks = dyadic_tracks(6, 5, shape=(160, 200))
    tracks = tracks.replace(shift_px=tracks.shift_px * 0.5 + 0.37)  # non-integer positions well inside the image
    main, _, _ = cistem.tables_from_tracks(tracks, pixel_A=PIXEL, **MICROSCOPE, extract_bin=2)
    yy, xx = np.mgrid[:160, :200]
    box = 32
    for row, (x, y) in enumerate(tracks.positions_px()):
        spot = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 2.0)  # a particle exactly at its track position
        cut = pyp_box(spot, main["ORIGINAL_X_POSITION"][row], main["ORIGINAL_Y_POSITION"][row], box)
        by, bx = np.mgrid[:box, :box]
        offset = np.array([(cut * bx).sum(), (cut * by).sum()]) / cut.sum() - box // 2  # from the box centre
        assert np.all(np.abs(offset) <= 0.5 + 1e-6)  # pyp centres the box on the particle's pixel
        remainder = np.array([main["X_SHIFT"][row], main["Y_SHIFT"][row]]) / (PIXEL * 2)  # pyp's Å scaling
        np.testing.assert_allclose(offset, -remainder - 0.5, atol=1e-4)  # the rest is the stored remainder


def test_shift_angstroms_are_scaled_by_the_extracted_pixel():
    tracks = dyadic_tracks(4, 5, xyz=True)
    tracks = tracks.replace(shift_px=tracks.shift_px + 0.3)
    main, particles, tilts = cistem.tables_from_tracks(tracks, pixel_A=PIXEL, **MICROSCOPE, extract_bin=2)
    corner = tracks.positions_px() + 0.5
    np.testing.assert_allclose(main["X_SHIFT"], (np.floor(corner[:, 0]) - corner[:, 0]) * PIXEL * 2, atol=1e-5)
    np.testing.assert_array_equal(main["PIXEL_SIZE"], np.float32(PIXEL))  # scope_pixel x data_bin only
    back = cistem.tracks_from_tables(main, particles, tilts, image_shape_yx=tracks.image_shape_yx, extract_bin=2,
                                     tilt_table=tracks.tilts)
    np.testing.assert_allclose(back.positions_px(), tracks.positions_px(), atol=1e-4)
    wrong = cistem.tracks_from_tables(main, particles, tilts, image_shape_yx=tracks.image_shape_yx, extract_bin=1,
                                      tilt_table=tracks.tilts)
    assert np.abs(wrong.positions_px() - tracks.positions_px()).max() > 0.1  # the binning matters


def pyp_written_tables(rng):
    """Tables as pyp's ``tomo_extract_coordinates`` makes them, for 3 particles in 4 tilts of 3838 x 3710 images,
    a 4096 x 4096 x 2048 reconstruction (tomo 512 x 512 x 256 at binning 8), IMOD inverse transforms of rotation
    85.3° and translations (dx, dy), extract_bin 2. Returns the tables and the truth."""
    nx, ny, rec = 3838, 3710, np.array([4096.0, 4096.0, 2048.0])
    angles, rot = np.array([-6.0, -3.0, 0.0, 3.0]), 85.3
    order = np.array([3, 1, 0, 2])
    dxy = rng.uniform(-20, 20, (4, 2))
    xyz_abs = rec / 2 + rng.uniform(-600, 600, (3, 3))
    c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
    rows, true = [], []
    for p, (X, Y, Z) in enumerate(xyz_abs):
        for t, a in enumerate(angles):
            ca, sa = math.cos(math.radians(a)), math.sin(math.radians(a))
            tx = (X - rec[0] / 2) * ca + (Z - rec[2] / 2) * sa
            ty = Y - rec[1] / 2
            x_true = c * tx - s * ty + dxy[t, 0] + rec[0] / 2 - (rec[0] - nx) / 2
            y_true = s * tx + c * ty + dxy[t, 1] + rec[1] / 2 - (rec[1] - ny) / 2
            ox, oy = math.floor(x_true), math.floor(y_true)
            rows.append((p, t, ox, oy, (ox - x_true) * PIXEL * 2, (oy - y_true) * PIXEL * 2))
            true.append((x_true, y_true))
    r = np.array(rows)
    n = len(r)
    main = cistem.CistemTable.from_columns({name: np.zeros(n) for name in cistem.MAIN_LAYOUT} | {
        "POSITION_IN_STACK": np.arange(1, n + 1), "PIND": r[:, 0], "IMIND": r[:, 1], "TIND": order[r[:, 1].astype(int)],
        "ORIGINAL_X_POSITION": r[:, 2], "ORIGINAL_Y_POSITION": r[:, 3], "X_SHIFT": r[:, 4], "Y_SHIFT": r[:, 5],
        "PIXEL_SIZE": np.full(n, PIXEL), "OCCUPANCY": np.full(n, 100.0)})
    particles = cistem.CistemTable.from_columns({name: np.zeros(3) for name in cistem.PARTICLE_LAYOUT} | {
        "PIND": np.arange(3), "ORIGINAL_X_POSITION_3D": xyz_abs[:, 0], "ORIGINAL_Y_POSITION_3D": xyz_abs[:, 1],
        "ORIGINAL_Z_POSITION_3D": xyz_abs[:, 2]})
    tilts = cistem.CistemTable.from_columns({name: np.zeros(4) for name in cistem.TILT_LAYOUT} | {
        "TIND": order, "TILTANG": angles, "TILTAXIS": np.full(4, -rot)})
    truth = {"shape": (ny, nx), "rec": rec, "corner": np.array(true), "xyz": xyz_abs - rec / 2, "axis": rot,
             "shift": dxy, "order": order}
    return main, particles, tilts, truth


def test_a_pyp_written_pair_lands_where_pyp_puts_it(tmp_path):
    main, particles, tilts, truth = pyp_written_tables(np.random.default_rng(4))
    path = tmp_path / "TS_01_r01.cistem"
    cistem.write_cistem(path, main)
    cistem.write_extended(cistem.extended_path(path), particles, tilts)  # pyp's: no trailer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracks = cistem.tracks_from_tables(*cistem.read_pair(path), image_shape_yx=truth["shape"], extract_bin=2,
                                           tomogram_px=truth["rec"])
    order = np.lexsort((tracks.tilt, tracks.particle))
    np.testing.assert_allclose(tracks.positions_px()[order] + 0.5, truth["corner"], atol=2e-3)  # IMOD corner origin
    np.testing.assert_allclose(tracks.particles.xyz_px, truth["xyz"], atol=1e-3)  # absolute, not centre-relative
    np.testing.assert_allclose(tracks.tilts.axis_deg, truth["axis"], atol=1e-4)  # TILTAXIS is minus the axis
    np.testing.assert_array_equal(tracks.tilts.order, truth["order"])
    shift = tracks.shift_px.reshape(3, 4, 2)
    np.testing.assert_allclose(shift, np.broadcast_to(truth["shift"], (3, 4, 2)), atol=2e-3)  # the alignment's dx, dy
    with pytest.raises(CsptInputError, match="image size is unknown"):
        cistem.tracks_from_tables(*cistem.read_pair(path), extract_bin=2)


def _small_project(tmp_path):
    tracks = dyadic_tracks(3, 4, xyz=True, shape=(64, 80))
    params = {"csp_no_3d_points": True, "data_mode": "tomo", "csp_frame_refinement": True, "scope_pixel": PIXEL,
              "extract_bin": 2, "extract_box": 16, "particle_rad": 10.0, "tomo_rec_binning": 4.0}
    stack = np.zeros((4, 64, 80), np.float32)
    create_project(tmp_path, "ts", stack, tracks, params)
    return tracks, params


def test_a_project_round_trip_with_binning(tmp_path):
    """create_project writes pyp's form with extract_bin 2 and a binned reconstruction; load_project gives the
    tracks back (through the tomogram size in ts.pkl)."""
    tracks, _ = _small_project(tmp_path)
    _, back, metadata = load_project(tmp_path, "ts")
    assert cistem.has_box_positions(cistem.read_cistem(tmp_path / "frealign" / "maps" / "ts_r01.cistem"))
    assert [metadata["tomo"].at[0, a] for a in "xyz"] == [20, 16, 512]
    np.testing.assert_allclose(back.positions_px(), tracks.positions_px(), atol=1e-4)
    np.testing.assert_allclose(back.particles.xyz_px, tracks.particles.xyz_px, atol=1e-4)


def test_pyps_iteration_folders_are_read(tmp_path):
    tracks, params = _small_project(tmp_path)
    moved = tracks.replace(shift_px=tracks.shift_px + 1.25)
    folder = tmp_path / "frealign" / "maps" / "ts_r01_02"  # pyp: {data_set}_r01_NN/{name}_r01.cistem
    Parameters.from_trackset(moved, params).write(folder / "ts_r01.cistem")
    assert _latest_iteration(tmp_path, "ts") == 2
    _, back, _ = load_project(tmp_path, "ts", 2)
    np.testing.assert_allclose(back.positions_px(), moved.positions_px(), atol=1e-4)


def test_a_main_file_rewritten_by_another_program_is_read_with_a_warning(tmp_path):
    tracks = dyadic_tracks(3, 4)
    main, particles, tilts = cistem.tables_from_tracks(tracks, pixel_A=PIXEL, **MICROSCOPE)
    path, ext = cistem.write_pair(tmp_path / "ts_r01.cistem", main, particles, tilts)
    values = {name: main[name] for name in main.names} | {"SCORE": main["SCORE"] + 1}
    cistem.write_cistem(path, cistem.CistemTable.from_columns(values))  # pyp rewrites the main file only
    with pytest.warns(CsptInputWarning, match="changed after"):
        read, _, _ = cistem.read_pair(path)
    np.testing.assert_array_equal(read["SCORE"], main["SCORE"] + 1)
    path.with_name(f".{path.name}{cistem.PAIR_WRITING}").touch()  # our own write, killed between the two files
    with pytest.raises(CsptInputError, match="interrupted"):
        cistem.read_pair(path)
