"""io/imod.py: .tlt, tiltalign text outputs, and binary fiducial models (round trips through the TrackSet)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from napari_cspt2d.errors import CsptInputError, CsptInputWarning
from napari_cspt2d.io import imod
from napari_cspt2d.model.tracks import TiltTable, TrackSet
from napari_cspt2d import geometry


def test_tlt_round_trip_is_exact(shared_data, tmp_path):
    src = shared_data / "imod_bba" / "BBa.tlt"
    angles = imod.read_tlt(src)
    assert len(angles) == 61 and angles[0] == 65.06 and angles[-1] == pytest.approx(-55.12)
    out = tmp_path / "copy.tlt"
    imod.write_tlt(out, angles)
    np.testing.assert_array_equal(imod.read_tlt(out), angles)
    assert [float(x) for x in out.read_text().split()] == [float(x) for x in src.read_text().split()]
    odd = np.array([1 / 3, -60.000001, 0.0])
    imod.write_tlt(out, odd)
    np.testing.assert_array_equal(imod.read_tlt(out), odd)


def test_resid_and_xyz_readers(shared_data):
    bb = imod.read_resid(shared_data / "imod_bba" / "BBa.resid")
    assert bb.position_px.shape == (1403, 2) and bb.contour.max() == 22
    assert np.all(np.bincount(bb.contour) == 61)
    raw = np.loadtxt(shared_data / "imod_bba" / "BBa.resid", skiprows=1)
    np.testing.assert_array_equal(bb.position_px, raw[:, :2] - 0.5)  # IMOD pixel-corner origin
    mz = imod.read_resid(shared_data / "imod_midzone2" / "midzone2a.resid")
    counts = np.bincount(mz.contour)
    assert len(counts) == 47 and len(mz.view) == 3793 and counts.min() == 77
    xyz = imod.read_fid_xyz(shared_data / "imod_bba" / "BBafid.xyz")
    assert xyz.size_xy == (512, 512) and xyz.pixel_A == pytest.approx(20.2)
    assert list(xyz.contour) == [1, 2, 3] + list(range(5, 24)) + [25]
    np.testing.assert_allclose(xyz.xyz_px()[0], [244.50 - 256, 242.64 - 256, 46.24])


def test_tltxf_maps_observations_onto_imod_projection(shared_data):
    """The PROVENANCE check, through apply_xf and geometry.project_points: rms about 0.26 px."""
    folder = shared_data / "imod_bba"
    res = imod.read_resid(folder / "BBa.resid")
    xf = imod.read_xf(folder / "BBa.tltxf")
    angles = imod.read_tlt(folder / "BBa.tlt")
    xyz = imod.read_fid_xyz(folder / "BBafid.xyz").xyz_px()
    aligned = imod.apply_xf(xf[res.view], res.position_px, (512, 512))
    projected = geometry.project_points(xyz[res.contour], angles[res.view])[:, :2]
    predicted = geometry.image_center_px((512, 512)) + projected
    rms = np.sqrt(((aligned - predicted) ** 2).mean(axis=0))
    assert np.all(rms < 0.3)
    flipped = geometry.project_points(xyz[res.contour], -angles[res.view])[:, :2]
    assert np.sqrt(((aligned - geometry.image_center_px((512, 512)) - flipped) ** 2).mean()) > 10


def test_tracks_from_resid(shared_data):
    folder = shared_data / "imod_midzone2"
    res = imod.read_resid(folder / "midzone2a.resid")
    tracks = imod.tracks_from_resid(res, folder / "midzone2a.tlt", (1024, 1950))
    assert tracks.n_particles == 47 and tracks.n_tilts == 81 and len(tracks) == 3793
    order = np.lexsort((res.view, res.contour))
    np.testing.assert_allclose(tracks.positions_px(), res.position_px[order], atol=1e-9)
    np.testing.assert_array_equal(tracks.tilt, res.view[order])


@pytest.mark.parametrize("folder, stem, shape", [("imod_bba", "BBa", (512, 512)),
                                                 ("imod_midzone2", "midzone2a", (1024, 1950))])
def test_fiducial_model_round_trip(shared_data, tmp_path, folder, stem, shape):
    base = shared_data / folder / stem
    tracks = imod.tracks_from_resid(base.with_suffix(".resid"), base.with_suffix(".tlt"), shape)
    path = tmp_path / f"{stem}.fid"
    imod.write_fiducial_model(path, tracks)
    back = imod.read_fiducial_model(path, base.with_suffix(".tlt"))
    assert back.image_shape_yx == shape
    np.testing.assert_array_equal(back.particle, tracks.particle)
    np.testing.assert_array_equal(back.tilt, tracks.tilt)
    np.testing.assert_allclose(back.positions_px(), tracks.positions_px(), atol=1e-4)  # float32 in the file
    np.testing.assert_array_equal(back.tilts.angle_deg, tracks.tilts.angle_deg)
    again = tmp_path / "again.fid"
    imod.write_fiducial_model(again, back)
    assert again.read_bytes() == path.read_bytes()


def test_fiducial_model_binary_layout(tmp_path):
    """Independent of imodmodel's reader: big-endian IMOD header, one OBJT, CONT chunks with (x+0.5, y+0.5, z)."""
    tilts = TiltTable.from_angles([-3.0, 0.0, 3.0])
    tracks = TrackSet.from_positions([0, 0, 1], [0, 2, 1], [[10.0, 20.0], [11.0, 21.0], [5.25, 6.5]], tilts, (64, 80))
    path = tmp_path / "m.mod"
    imod.write_fiducial_model(path, tracks)
    data = path.read_bytes()
    assert data[:8] == b"IMODV1.2"
    xmax, ymax, zmax, objsize = struct.unpack(">4i", data[136:152])
    assert (xmax, ymax, zmax, objsize) == (80, 64, 3, 1)
    assert data.count(b"OBJT") == 1 and data.count(b"CONT") == 2 and data.endswith(b"IEOF")
    first = data.index(b"CONT") + 4
    psize = struct.unpack(">i", data[first:first + 4])[0]
    points = struct.unpack(f">{3 * psize}f", data[first + 16:first + 16 + 12 * psize])
    assert psize == 2 and points == (10.5, 20.5, 0.0, 11.5, 21.5, 2.0)


def test_fiducial_model_without_angles_warns(tmp_path):
    tilts = TiltTable.from_angles([-3.0, 0.0, 3.0])
    tracks = TrackSet.from_positions([0, 0], [0, 1], [[10.0, 20.0], [11.0, 21.0]], tilts, (64, 80))
    path = tmp_path / "m.fid"
    imod.write_fiducial_model(path, tracks)
    with pytest.warns(CsptInputWarning, match="tilts"):
        back = imod.read_fiducial_model(path)
    assert back.n_tilts == 3 and np.all(back.tilts.angle_deg == 0)
    with pytest.raises(CsptInputError, match="section 2"):
        imod.read_fiducial_model(_model_file(tmp_path / "z.mod", [[1.0, 2.0, 2.0]]), [0.0, 1.0])


def _model_file(path, points):
    """A one-contour IMOD model written by imodmodel directly."""
    from imodmodel.models import Contour, ImodModel, ModelHeader, Object

    model = ImodModel(header=ModelHeader(xmax=80, ymax=64, zmax=3),
                      objects=[Object(contours=[Contour(points=np.array(points, dtype=float))])])
    model.objects[0].update_sizes()
    model.update_sizes()
    model.to_file(path)
    return path


def test_bad_files_raise_input_errors(tmp_path):
    bad = tmp_path / "bad.resid"
    bad.write_text("  3 residuals\n 1 2 0 0.1 0.1\n 1 2 1 0.1 0.1\n")
    with pytest.raises(CsptInputError, match="announces 3"):
        imod.read_resid(bad)
    bad.write_text("  1 residuals\n 1 2 zero 0.1 0.1\n")
    with pytest.raises(CsptInputError) as info:
        imod.read_resid(bad)
    assert info.value.file == str(bad) and "line 2" in str(info.value)
    tlt = tmp_path / "bad.tlt"
    tlt.write_text("10\n100\n")
    with pytest.raises(CsptInputError, match="±90"):
        imod.read_tlt(tlt)
    with pytest.raises(CsptInputError, match="does not exist"):
        imod.read_xf(tmp_path / "missing.xf")
    garbage = tmp_path / "garbage.fid"
    garbage.write_bytes(b"IMODV1.2" + b"\x00" * 20)
    with pytest.raises(CsptInputError, match="IMOD model"):
        imod.read_fiducial_model(garbage, [0.0])
    dup = _model_file(tmp_path / "dup.mod", [[1.0, 2.0, 0.0], [1.5, 2.0, 0.0]])
    with pytest.raises(CsptInputError) as info:
        imod.read_fiducial_model(dup, [0.0, 1.0, 2.0])
    assert info.value.field == "object 1 contour 1" and info.value.file == str(dup)
