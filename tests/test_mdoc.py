"""io/mdoc.py: SerialEM mdoc → TiltTable, on the real EMPIAR-10164 TS_01 mdoc and on hand-made quirky files."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import starfile

from napari_cspt2d.errors import CsptInputError, CsptInputWarning
from napari_cspt2d.io import mdoc

HEADER = "PixelSpacing = 2.7\nImageFile = x.mrc\nImageSize = 100 80\nDataMode = 1\n\n"
TITLE = "[T = SerialEM: test]\n\n[T =     Tilt axis angle = -94.7, binning = 2  spot = 8  camera = 2]\n\n"


def section(z, angle, extra=""):
    return f"[ZValue = {z}]\nTiltAngle = {angle}\nPixelSpacing = 2.7\n{extra}\n"


def test_real_mdoc_matches_relion_pre_exposure(shared_data):
    path = shared_data / "mdoc" / "TS_01.mrc.mdoc"
    with pytest.warns(CsptInputWarning, match="ExposureDose"):
        info = mdoc.read_mdoc_info(path)
    t = info.tilts
    assert len(t) == 41 and list(t.id) == list(range(41))
    assert t.angle_deg.min() == pytest.approx(-59.9986) and t.angle_deg.max() == pytest.approx(60.0006)
    assert np.all(t.axis_deg == 85.3) and np.all(t.dose == 0) and np.all(t.defocus_um == 4.0)
    assert info.pixel_A == 5.4 and info.image_size_xy == (924, 958) and info.binning == 4
    assert info.frame_names[0] == "TS_01_000_0.0.mrc"
    # dose-symmetric order from DateTime; with 3 e/Å² per tilt it reproduces RELION's pre-exposure of TS_01
    dosed = mdoc.read_mdoc(path, dose_per_tilt=3.0)
    relion = starfile.read(shared_data / "relion5" / "Tomograms" / "job006" / "tilt_series" / "TS_01.star")
    movie = [m.split("/")[-1] for m in relion.rlnMicrographMovieName]
    rows = [info.frame_names.index(m) for m in movie]
    accumulated = dosed.accumulated_dose()[rows]
    np.testing.assert_allclose(accumulated, relion.rlnMicrographPreExposure)
    np.testing.assert_allclose(dosed.angle_deg[rows], relion.rlnTomoNominalStageTiltAngle, atol=1e-4)


def test_quirks(tmp_path):
    path = tmp_path / "quirky.mdoc"
    frames = "FrameDosesAndNumber = 0.5 4"
    path.write_text(
        HEADER + TITLE
        + section(0, 0.0, f"ExposureDose = 0\nSubFramePath = D:\\data\\frames\\a_000.tif\n{frames}\n"
                          "DateTime = 02-Jan-24  10:00:05\nTargetDefocus = -3.5")
        + section(1, 3.0, f"ExposureDose = 0\nSubFramePath = /linux/path/a_001.tif\n{frames}\n"
                          "DateTime = 02-Jan-24  10:02:00")
        + section(2, -3.0, f"ExposureDose = 0\n{frames}\nDateTime = 02-Jan-24  10:01:00")
    )
    info = mdoc.read_mdoc_info(path)
    t = info.tilts
    assert list(t.order) == [0, 2, 1]  # acquisition order from DateTime, not from ZValue
    assert np.all(t.dose == 2.0) and np.all(t.axis_deg == -94.7)
    np.testing.assert_allclose(t.defocus_um, [3.5, 0.0, 0.0])
    assert info.frame_names == ["a_000.tif", "a_001.tif", ""]


def test_missing_fields_fall_back(tmp_path):
    path = tmp_path / "bare.mdoc"
    path.write_text(HEADER + section(1, 10.0) + section(0, -5.0, "ExposureDose = 1.5"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = mdoc.read_mdoc_info(path)
    assert any("Tilt axis angle" in str(w.message) for w in caught)
    t = info.tilts
    assert list(t.id) == [0, 1] and list(t.angle_deg) == [-5.0, 10.0]  # sorted by ZValue
    assert list(t.order) == [0, 1] and list(t.dose) == [1.5, 0.0] and np.all(t.axis_deg == 0)
    assert info.frame_names == ["", ""] and info.voltage_kV is None


@pytest.mark.parametrize("body, field", [
    (section(0, 10.0) + section(0, 12.0), "ZValue"),
    (section(0, 100.0), "TiltAngle"),
    ("[ZValue = 0]\nPixelSpacing = 2.7\n", "TiltAngle"),
    (section(0, 10.0, "ExposureDose = -1"), "ExposureDose"),
])
def test_bad_mdoc(tmp_path, body, field):
    path = tmp_path / "bad.mdoc"
    path.write_text(HEADER + TITLE + body)
    with pytest.raises(CsptInputError) as info:
        mdoc.read_mdoc(path, dose_per_tilt=1.0)
    assert info.value.field == field and info.value.file == str(path)


def test_unreadable_and_missing(tmp_path):
    with pytest.raises(CsptInputError, match="does not exist"):
        mdoc.read_mdoc(tmp_path / "none.mdoc")
    path = tmp_path / "garbage.mdoc"
    path.write_text(HEADER + "[ZValue = 0]\nTiltAngle = steep\n")
    with pytest.raises(CsptInputError) as info:
        mdoc.read_mdoc(path)
    assert info.value.file == str(path)
    with pytest.raises(CsptInputError, match="dose_per_tilt"):
        mdoc.read_mdoc(path, dose_per_tilt=-2.0)
