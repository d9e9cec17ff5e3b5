"""cisTEM binary parameter files and pyp's _extended.cistem: byte layout, round trips and bad input."""

from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest

from napari_cspt2d import CsptInputError, TiltTable, TrackSet
from napari_cspt2d.errors import CsptInputWarning
from napari_cspt2d.io import cistem
from napari_cspt2d.model.tracks import ParticleTable
from napari_cspt2d import geometry

PIXEL = 2.0  # a power of two: shift_px * PIXEL is exact in float32, so round trips can be compared exactly
MICROSCOPE = dict(voltage_kV=300.0, cs_mm=2.7, amp_contrast=0.07)


def dyadic_tracks(n_particles: int, n_tilts: int, *, seed: int = 0, xyz: bool = False,
                  shape=(512, 640)) -> TrackSet:
    """Full tracks whose values are all exactly representable in float32 (multiples of 1/16)."""
    rng = np.random.default_rng(seed)
    grid = lambda size, lo, hi: rng.integers(lo * 16, hi * 16, size) / 16  # noqa: E731
    tilts = TiltTable.from_angles(np.linspace(-60, 60, n_tilts), defocus_um=grid(n_tilts, 2, 4),
                                  axis_deg=grid(n_tilts, -5, 5), dose=3.0)
    ids = np.arange(1, n_particles + 1)
    position = grid((n_particles, 3), -100, 100) if xyz else np.zeros((n_particles, 3))
    particles = ParticleTable(ids, position, grid((n_particles, 3), -90, 90))
    pid, tid = (a.ravel() for a in np.meshgrid(ids, tilts.id, indexing="ij"))
    n = pid.size
    return TrackSet(pid, tid, grid((n, 2), -50, 50), grid(n, 0, 1), grid(n, 0, 100), particles, tilts, shape)


def write_pair(tmp_path, tracks: TrackSet, name: str = "ts_r01"):
    main, particles, tilts = cistem.tables_from_tracks(tracks, pixel_A=PIXEL, **MICROSCOPE)
    path = tmp_path / f"{name}.cistem"
    cistem.write_cistem(path, main)
    cistem.write_extended(cistem.extended_path(path), particles, tilts)
    return path


def read_pair(path):
    return (cistem.read_cistem(path), *cistem.read_extended(cistem.extended_path(path)))


def raw_file(columns, rows, n_rows=None) -> bytes:
    """A .cistem file built by hand from the documented layout: columns = [(code, type)], rows = packed bytes."""
    head = struct.pack("<ii", len(columns), len(rows) if n_rows is None else n_rows)
    return head + b"".join(struct.pack("<qb", c, t) for c, t in columns) + b"".join(rows)


# ------------------------------------------------------------------------------------------------ layout
def test_column_codes_and_types_follow_cistem_and_pyp():
    assert cistem.COLUMNS["POSITION_IN_STACK"] == (1, cistem.UINT)
    assert cistem.COLUMNS["X_SHIFT"] == (8, cistem.FLOAT)
    assert cistem.COLUMNS["ORIGINAL_Y_POSITION"] == (2**34, cistem.FLOAT)
    assert cistem.COLUMNS["STACK_FILENAME"] == (2**24, cistem.VARLEN)
    assert {k: cistem.COLUMNS[k][0] for k in ("IMIND", "PIND", "TIND", "RIND", "FIND", "FSHIFT_X", "FSHIFT_Y")} == {
        "IMIND": 20, "PIND": 15, "TIND": 35, "RIND": 70, "FIND": 55, "FSHIFT_X": 11, "FSHIFT_Y": 121}
    codes = [c for c, _ in cistem.COLUMNS.values()]
    assert len(set(codes)) == len(codes)
    assert len(cistem.MAIN_LAYOUT) == 32 and cistem.MAIN_LAYOUT[26] == "PIND" and cistem.MAIN_LAYOUT[11] == "OCCUPANCY"
    assert (cistem.PARTICLES_BLOCK, cistem.TILTS_BLOCK) == (15, 35)


def test_hand_built_file_is_read_by_the_documented_layout(tmp_path):
    cols = [(15, cistem.INTEGER), (8, cistem.FLOAT), (2**34, cistem.FLOAT), (999, cistem.DOUBLE)]
    rows = [struct.pack("<iffd", p, x, y, u) for p, x, y, u in [(3, 1.5, -2.0, 7.25), (4, -0.5, 9.0, 1.0)]]
    path = tmp_path / "hand.cistem"
    path.write_bytes(raw_file(cols, rows))
    table = cistem.read_cistem(path)
    assert table.names == ("PIND", "X_SHIFT", "ORIGINAL_Y_POSITION", "code_999")
    assert table["PIND"].tolist() == [3, 4] and table["X_SHIFT"].tolist() == [1.5, -0.5]
    assert table[999].tolist() == [7.25, 1.0] and table["ORIGINAL_Y_POSITION"].dtype == np.float32


def test_writer_produces_the_documented_bytes(tmp_path):
    table = cistem.CistemTable.from_columns({"POSITION_IN_STACK": [1, 2], "X_SHIFT": [0.5, -1.0], "PIND": [7, 8]})
    path = cistem.write_cistem(tmp_path / "w.cistem", table)
    expected = raw_file([(1, 9), (8, 3), (15, 2)], [struct.pack("<Ifi", 1, 0.5, 7), struct.pack("<Ifi", 2, -1.0, 8)])
    assert path.read_bytes() == expected
    assert not list(tmp_path.glob(".*part"))


def test_extended_file_blocks(tmp_path):
    path = write_pair(tmp_path, dyadic_tracks(3, 4))
    buf = cistem.extended_path(path).read_bytes()
    code, ncols, nrows = struct.unpack_from("<qii", buf, 0)
    assert (code, ncols, nrows) == (15, 12, 3)
    first_cols = [struct.unpack_from("<qb", buf, 16 + 9 * i)[0] for i in range(ncols)]
    assert first_cols == [cistem.COLUMNS[n][0] for n in cistem.PARTICLE_LAYOUT]
    offset = 16 + 9 * ncols + nrows * 4 * ncols
    assert struct.unpack_from("<qii", buf, offset) == (35, 6, 4)
    particles, tilts = cistem.read_extended(cistem.extended_path(path))
    assert particles.names == cistem.PARTICLE_LAYOUT and tilts.names == cistem.TILT_LAYOUT


def test_varlen_columns_round_trip(tmp_path):
    cols = [(2**24, cistem.VARLEN), (1, cistem.UINT)]
    rows = [struct.pack("<i", 5) + b"a.mrc" + struct.pack("<I", 1), struct.pack("<i", 0) + struct.pack("<I", 2)]
    path = tmp_path / "v.cistem"
    path.write_bytes(raw_file(cols, rows))
    table = cistem.read_cistem(path)
    assert table["STACK_FILENAME"].tolist() == ["a.mrc", ""] and table["POSITION_IN_STACK"].tolist() == [1, 2]
    cistem.write_cistem(tmp_path / "v2.cistem", table)
    assert (tmp_path / "v2.cistem").read_bytes() == path.read_bytes()


# ------------------------------------------------------------------------------------------------ bad files
@pytest.mark.parametrize("case, field", [
    ("short", "header"), ("no_columns", "columns.n_columns"), ("negative_rows", "columns.n_rows"),
    ("absurd_rows", "columns.n_rows"), ("truncated_rows", "columns.n_rows"), ("unknown_type", "columns.PIND"),
    ("wrong_type", "columns.X_SHIFT"), ("nan", "columns.X_SHIFT"), ("duplicate", "columns.PIND"),
    ("trailing", "end of file"), ("bad_string", "columns.STACK_FILENAME"), ("truncated_header", "columns.header"),
])
def test_corrupt_files_raise_input_errors(tmp_path, case, field):
    ok = [(15, cistem.INTEGER), (8, cistem.FLOAT)]
    row = struct.pack("<if", 1, 0.5)
    data = {
        "short": b"\x01\x00",
        "no_columns": raw_file([], []),
        "negative_rows": raw_file(ok, [], n_rows=-3),
        "absurd_rows": raw_file(ok, [row], n_rows=2**31 - 1),
        "truncated_rows": raw_file(ok, [row, row])[:-3],
        "unknown_type": raw_file([(15, 4), (8, 3)], [row]),
        "wrong_type": raw_file([(15, 2), (8, 2)], [row]),
        "nan": raw_file(ok, [row, struct.pack("<if", 2, float("nan"))]),
        "duplicate": raw_file([(15, 2), (15, 2)], [row]),
        "trailing": raw_file(ok, [row]) + b"\x00",
        "bad_string": raw_file([(2**24, 8)], [struct.pack("<i", 1000) + b"abc"]),
        "truncated_header": struct.pack("<ii", 3, 1) + struct.pack("<qb", 15, 2),
    }[case]
    path = tmp_path / f"{case}.cistem"
    path.write_bytes(data)
    with pytest.raises(CsptInputError) as err:
        cistem.read_cistem(path)
    assert err.value.file == str(path) and err.value.field == field


@pytest.mark.parametrize("case", ["unknown_block", "missing_tilts", "twice", "truncated"])
def test_corrupt_extended_files(tmp_path, case):
    good = cistem.extended_path(write_pair(tmp_path, dyadic_tracks(2, 3))).read_bytes()
    particles_len = 16 + 12 * 9 + 2 * 12 * 4
    data = {
        "unknown_block": struct.pack("<q", 16) + good[8:],
        "missing_tilts": good[:particles_len],
        "twice": good[:particles_len] * 2,
        "truncated": good[:-5],
    }[case]
    path = tmp_path / "bad_extended.cistem"
    path.write_bytes(data)
    with pytest.raises(CsptInputError) as err:
        cistem.read_extended(path)
    assert err.value.file == str(path)


def test_missing_file_and_table_construction_errors(tmp_path):
    with pytest.raises(CsptInputError, match="does not exist"):
        cistem.read_cistem(tmp_path / "nope.cistem")
    with pytest.raises(CsptInputError, match="outside") as err:
        cistem.CistemTable.from_columns({"PIND": [2**40]})
    assert err.value.field == "PIND"
    with pytest.raises(CsptInputError, match="non-integer"):
        cistem.CistemTable.from_columns({"TIND": [1.5]})
    with pytest.raises(CsptInputError, match="NaN"):
        cistem.CistemTable.from_columns({"X_SHIFT": [np.nan]})
    with pytest.raises(CsptInputError, match="X_SHIFT"):
        cistem.CistemTable.from_columns({"X_SHIFTT": [1.0]})
    with pytest.raises(CsptInputError, match="suffix"):
        cistem.extended_path(tmp_path / "a.star")


# ------------------------------------------------------------------------------------------------ TrackSet mapping
def test_columns_written_for_tracks_mean_what_the_docstring_says():
    tracks = dyadic_tracks(4, 5, xyz=True)
    main, particles, tilts = cistem.tables_from_tracks(tracks, pixel_A=PIXEL, **MICROSCOPE)
    assert main.names == cistem.MAIN_LAYOUT
    trow = tracks.tilt_rows()
    corner = tracks.positions_px() + 0.5  # pyp's box positions are in IMOD's corner-origin pixels
    np.testing.assert_array_equal(main["ORIGINAL_X_POSITION"], np.floor(corner[:, 0]))
    np.testing.assert_allclose(main["X_SHIFT"], (np.floor(corner[:, 0]) - corner[:, 0]) * PIXEL, atol=1e-5)
    np.testing.assert_array_equal(tilts["TILTAXIS"], -tracks.tilts.axis_deg)
    np.testing.assert_allclose(particles["ORIGINAL_Z_POSITION_3D"], tracks.particles.xyz_px[:, 2] + 1024, atol=1e-4)
    np.testing.assert_array_equal(main["IMIND"], tracks.tilt)
    np.testing.assert_array_equal(main["TIND"], tracks.tilts.order[trow])
    np.testing.assert_array_equal(tilts["TIND"], tracks.tilts.order)
    np.testing.assert_array_equal(main["POSITION_IN_STACK"], np.arange(1, len(tracks) + 1))
    height = tracks.projected_px()[:, 2]
    np.testing.assert_allclose(main["DEFOCUS_1"], tracks.tilts.defocus_um[trow] * 1e4 - height * PIXEL, atol=5e-3)
    e = tracks.particles.euler_deg[tracks.particle_rows()]
    expected = geometry.projection_matrices(e[:, 2], e[:, 1], e[:, 0], tracks.tilts.angle_deg[trow],
                                            tracks.tilts.axis_deg[trow])
    written = geometry.euler_to_matrix(main["PHI"], main["THETA"], main["PSI"])
    np.testing.assert_allclose(written, expected, atol=1e-5)
    np.testing.assert_array_equal(particles["PPSI"], tracks.particles.euler_deg[:, 0])


def assert_same_tracks(back, tracks, atol=1e-4):
    """Equal but for the float32 rounding of the files' sub-pixel shifts and 3D positions."""
    np.testing.assert_array_equal(back.particle, tracks.particle)
    np.testing.assert_array_equal(back.tilt, tracks.tilt)
    np.testing.assert_allclose(back.positions_px(), tracks.positions_px(), atol=atol)
    np.testing.assert_allclose(back.shift_px, tracks.shift_px, atol=atol)
    np.testing.assert_allclose(back.particles.xyz_px, tracks.particles.xyz_px, atol=atol)
    np.testing.assert_array_equal(back.score, tracks.score)


def test_round_trip_with_tilt_table(tmp_path):
    tracks = dyadic_tracks(6, 9, xyz=True)
    back = cistem.tracks_from_tables(*read_pair(write_pair(tmp_path, tracks)), image_shape_yx=tracks.image_shape_yx,
                                     tilt_table=tracks.tilts)
    assert_same_tracks(back, tracks)
    assert back.tilts is tracks.tilts
    seed_form = tracks.replace(image_shape_yx=None)  # no image size: the whole shift, exactly (the seed's form)
    back = cistem.tracks_from_tables(*read_pair(write_pair(tmp_path, seed_form)), tilt_table=tracks.tilts)
    assert back.equals(seed_form)


def test_tilts_rebuilt_from_the_files(tmp_path):
    tracks = dyadic_tracks(5, 7, xyz=True)
    back = cistem.tracks_from_tables(*read_pair(write_pair(tmp_path, tracks)), dose_per_tilt=3.0,
                                     image_shape_yx=tracks.image_shape_yx)
    np.testing.assert_array_equal(back.tilts.id, tracks.tilts.id)
    np.testing.assert_array_equal(back.tilts.order, tracks.tilts.order)
    np.testing.assert_allclose(back.tilts.angle_deg, tracks.tilts.angle_deg, atol=1e-5)
    np.testing.assert_array_equal(back.tilts.axis_deg, tracks.tilts.axis_deg)
    np.testing.assert_allclose(back.tilts.defocus_um, tracks.tilts.defocus_um, atol=1e-6)
    np.testing.assert_array_equal(back.tilts.dose, tracks.tilts.dose)
    np.testing.assert_allclose(back.shift_px, tracks.shift_px, atol=1e-4)


def test_100k_projection_round_trip(tmp_path):
    tracks = dyadic_tracks(2500, 40, seed=3)
    assert len(tracks) == 100_000
    path = write_pair(tmp_path, tracks)
    assert path.stat().st_size == 8 + 32 * 9 + 100_000 * 32 * 4
    back = cistem.tracks_from_tables(*read_pair(path), image_shape_yx=tracks.image_shape_yx, tilt_table=tracks.tilts)
    assert_same_tracks(back, tracks)


def test_repeated_acquisition_order_is_refused():
    tracks = dyadic_tracks(2, 3)
    t = tracks.tilts
    doubled = tracks.replace(tilts=TiltTable(t.id, t.angle_deg, t.defocus_um, t.axis_deg, t.dose, np.zeros(3)))
    with pytest.raises(CsptInputError, match="repeated") as err:
        cistem.tables_from_tracks(doubled, pixel_A=PIXEL, **MICROSCOPE)
    assert err.value.field == "tilts.order"


def _tables(tracks):
    return cistem.tables_from_tracks(tracks, pixel_A=PIXEL, **MICROSCOPE)


def _edit(table: cistem.CistemTable, **columns) -> cistem.CistemTable:
    values = {name: table[name] for name in table.names}
    values.update(columns)
    return cistem.CistemTable.from_columns(values)


@pytest.mark.parametrize("case, field", [
    ("duplicate", "PIND/TIND"), ("unknown_pind", "PIND"), ("unknown_tind", "TIND"), ("two_sections", "TIND"),
    ("zero_pixel", "PIXEL_SIZE"), ("missing_column", "columns"),
])
def test_inconsistent_tables_are_refused(case, field):
    main, particles, tilts = _tables(dyadic_tracks(3, 4))
    pind, tind, imind = main["PIND"].copy(), main["TIND"].copy(), main["IMIND"].copy()
    if case == "duplicate":
        tind[1], imind[1] = tind[0], imind[0]
        main = _edit(main, TIND=tind, IMIND=imind)
    elif case == "unknown_pind":
        pind[0] = 99
        main = _edit(main, PIND=pind)
    elif case == "unknown_tind":
        tilts = _edit(tilts, TIND=tilts["TIND"] + 100)
    elif case == "two_sections":
        imind[0] = imind[1]
        main = _edit(main, IMIND=imind)
    elif case == "zero_pixel":
        main = _edit(main, PIXEL_SIZE=np.zeros(len(main)))
    else:
        main = cistem.CistemTable.from_columns({n: main[n] for n in main.names if n != "IMIND"})
    with pytest.raises(CsptInputError) as err:
        cistem.check_tables(main, particles, tilts, "x.cistem")
    assert err.value.field == field and err.value.file == "x.cistem"


def test_non_sequential_ids_warn_and_frames_are_refused():
    tracks = dyadic_tracks(3, 4)
    main, particles, tilts = _tables(tracks)
    shifted = _edit(particles, PIND=particles["PIND"] * 2)
    with pytest.warns(CsptInputWarning, match="not sequential"):
        cistem.check_tables(_edit(main, PIND=main["PIND"] * 2), shifted, tilts)
    framed = _edit(main, FIND=np.arange(len(main)) % 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cistem.check_tables(framed, particles, tilts)
    with pytest.raises(CsptInputError, match="frames") as err:
        cistem.tracks_from_tables(framed, particles, tilts, path="f.cistem")
    assert err.value.field == "FIND"


def test_projection_data_columns():
    tracks = dyadic_tracks(3, 4).replace(image_shape_yx=None)  # the seed's form: the track shift in pixels
    main, _, _ = _tables(tracks)
    data = cistem.projection_data(main)
    assert data.shape == (len(tracks), len(cistem.DATA_COLUMNS))
    np.testing.assert_array_equal(data[:, 0], tracks.particle)
    np.testing.assert_array_equal(data[:, 1], tracks.tilt)
    np.testing.assert_array_equal(data[:, 3:5], tracks.shift_px)
    np.testing.assert_array_equal(data[:, 6], tracks.occupancy)
    boxed = cistem.projection_data(_tables(dyadic_tracks(3, 4))[0])  # pyp's form: the sub-pixel remainder
    assert np.all((boxed[:, 3:5] > -1) & (boxed[:, 3:5] <= 0))
