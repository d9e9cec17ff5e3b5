import numpy as np
import pytest

from napari_cspt2d import CsptInputError
from napari_cspt2d.io import mrc
from napari_cspt2d.model.tiltseries import TiltSeries


def test_open_is_lazy_and_reads_angles_beside_the_stack(tmp_path):
    stack = np.random.default_rng(0).normal(size=(5, 32, 48)).astype(np.float32)
    path = mrc.write_stack(tmp_path / "ts1_stack.mrc", stack, 2.5)
    (tmp_path / "ts1_stack.tlt").write_text("\n".join(str(a) for a in [-6, -3, 0, 3, 6]))
    ts = TiltSeries.open(path)
    assert isinstance(ts.data, np.memmap)
    assert ts.shape_yx == (32, 48) and ts.pixel_A == pytest.approx(2.5) and ts.name == "ts1"
    assert ts.tilts.angle_deg.tolist() == [-6, -3, 0, 3, 6]
    np.testing.assert_array_equal(ts.section(3), stack[3])
    lo, hi = ts.contrast_limits()
    assert lo < 0 < hi


def test_more_tilts_than_sections_is_refused(tmp_path):
    path = mrc.write_stack(tmp_path / "a.mrc", np.zeros((3, 8, 8)), 1.0)
    with pytest.raises(CsptInputError, match="sections"):
        TiltSeries.open(path, angles=[-3, 0, 3, 6])


def test_missing_angles_and_bad_files_are_named(tmp_path):
    path = mrc.write_stack(tmp_path / "b.mrc", np.zeros((3, 8, 8)), 1.0)
    with pytest.raises(CsptInputError, match="b.tlt"):
        TiltSeries.open(path)
    junk = tmp_path / "junk.mrc"
    junk.write_bytes(b"not an mrc file at all" * 3)
    with pytest.raises(CsptInputError, match="junk.mrc"):
        TiltSeries.open(junk, angles=[0.0])


def test_merge_images_streams_and_is_atomic(tmp_path):
    images = (np.full((16, 16), i, np.float32) for i in range(4))
    out = mrc.merge_images(tmp_path / "m_stack.mrc", images, 4, 1.5)
    data, pixel = mrc.open_stack(out)
    assert data.shape == (4, 16, 16) and data[3, 0, 0] == 3 and pixel == pytest.approx(1.5)
    with pytest.raises(CsptInputError):
        mrc.merge_images(tmp_path / "bad.mrc", (np.zeros((4, 4)) for _ in range(2)), 3, 1.0)
    assert not (tmp_path / "bad.mrc").exists()
    assert not list(tmp_path.glob("*.part"))
