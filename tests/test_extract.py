"""Particle extraction: sub-pixel centring, Fourier binning, normalisation, edges, streaming reads."""

import numpy as np
import pytest

from napari_cspt2d.errors import CsptInputError
from napari_cspt2d.io.mrc import open_stack, write_stack
from napari_cspt2d.model.tracks import TiltTable, TrackSet
from napari_cspt2d.recon.extract import extract_particles

NY, NX = 180, 260


def _spot_stack(positions, tilt, n_tilts=3, sigma=2.0):
    yy, xx = np.mgrid[:NY, :NX]
    stack = np.zeros((n_tilts, NY, NX), np.float32)
    for (x, y), t in zip(positions, tilt):
        stack[t] += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return stack


def _grid_positions(rng, margin=20.0, step=40.0):
    """Spots on a coarse grid (well separated) with random sub-pixel offsets."""
    gx, gy = np.meshgrid(np.arange(margin, NX - margin, step), np.arange(margin, NY - margin, step))
    return np.column_stack([gx.ravel(), gy.ravel()]) + rng.uniform(-0.5, 0.5, (gx.size, 2))


def _tracks(positions, tilt, n_tilts=3):
    return TrackSet.from_positions(np.arange(len(positions)), tilt, positions,
                                   TiltTable.from_angles(np.linspace(-30, 30, n_tilts)), (NY, NX))


def _centroid(img, half=8):
    c = img.shape[0] // 2
    half = min(half, c - 1)
    w = img[c - half:c + half + 1, c - half:c + half + 1]
    w = np.clip(w - np.median(img), 0, None)
    d = np.arange(-half, half + 1)
    return (w.sum(0) @ d) / w.sum(), (w.sum(1) @ d) / w.sum()


@pytest.mark.parametrize("box, binning", [(32, 1), (32, 2), (33, 1), (36, 3)])
def test_particles_land_on_box_centre(box, binning):
    rng = np.random.default_rng(box + binning)
    pos = _grid_positions(rng)
    tilt = rng.integers(0, 3, len(pos))
    stack = _spot_stack(pos, tilt, sigma=2.0 * binning)
    tracks = _tracks(pos, tilt)
    seen = []
    for batch in extract_particles(stack, tracks, extract_box=box, extract_bin=binning, particle_rad_A=0.3 * box,
                                   pixel_A=1.0, batch_size=5):
        assert len(batch) <= 5 and batch.images.shape[1:] == (box // binning,) * 2
        assert batch.images.dtype == np.float32
        seen.append(batch.rows)
        for img, edge in zip(batch.images, batch.at_edge):
            assert not edge
            cx, cy = _centroid(img)
            assert abs(cx) < 0.03 and abs(cy) < 0.03, (cx, cy)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(len(pos)))


def test_shift_direction_and_normalisation():
    """A spot half a pixel right of the requested position shows up half a pixel right of the box centre; the
    background outside the particle radius has zero mean and unit standard deviation."""
    rng = np.random.default_rng(0)
    pos = np.array([[100.3, 90.0]])
    stack = _spot_stack(pos + [0.5, 0.0], [0]) + rng.normal(0, 0.01, (3, NY, NX)).astype(np.float32)
    batch = next(extract_particles(stack, _tracks(pos, [0]), extract_box=40, particle_rad_A=24.0, pixel_A=2.0))
    img = batch.images[0]
    cx, cy = _centroid(img)
    assert cx == pytest.approx(0.5, abs=0.05) and cy == pytest.approx(0.0, abs=0.05)
    r = np.hypot(*np.mgrid[-20:20, -20:20])
    bg = img[r > 12]
    assert bg.mean() == pytest.approx(0.0, abs=1e-4) and bg.std() == pytest.approx(1.0, abs=1e-4)


def test_edge_particles_are_padded_and_flagged():
    pos = np.array([[3.2, 90.0], [130.0, 176.6], [130.0, 90.0]])
    tilt = np.array([0, 0, 0])
    stack = _spot_stack(pos, tilt) + 5.0
    batch = next(extract_particles(stack, _tracks(pos, tilt), extract_box=32, particle_rad_A=8.0, pixel_A=1.0))
    by_row = dict(zip(batch.rows.tolist(), batch.at_edge.tolist()))
    assert by_row == {0: True, 1: True, 2: False}
    assert np.all(np.isfinite(batch.images))
    for img in batch.images:  # the (cut) spot still peaks on the centre pixel
        assert np.unravel_index(np.argmax(img), img.shape) == (16, 16)


class _RecordingStack:
    """An array-like stack that records which (section, rows) were read."""

    def __init__(self, data):
        self.data, self.reads = data, []

    ndim = 3

    @property
    def shape(self):
        return self.data.shape

    def __getitem__(self, key):
        t, rows = key
        self.reads.append((t, rows.stop - rows.start))
        return self.data[key]


def test_reads_are_bounded_slabs_of_one_section(tmp_path):
    rng = np.random.default_rng(5)
    pos = _grid_positions(rng)
    tilt = rng.integers(0, 3, len(pos))
    stack = _spot_stack(pos, tilt)
    write_stack(tmp_path / "s.mrc", stack, 1.0)
    mapped, _ = open_stack(tmp_path / "s.mrc")
    rec = _RecordingStack(mapped)
    kw = dict(extract_box=24, particle_rad_A=6.0, pixel_A=1.0, batch_size=4)
    batches = list(extract_particles(rec, _tracks(pos, tilt), **kw))
    # each read is one section; a chunk of 4 particles sorted by y spans at most the image height
    assert all(isinstance(t, (int, np.integer)) for t, _ in rec.reads)
    assert len(rec.reads) == sum(-(-int((tilt == t).sum()) // 4) for t in range(3))
    assert max(h for _, h in rec.reads) < NY
    in_memory = list(extract_particles(stack, _tracks(pos, tilt), **kw))
    for a, b in zip(batches, in_memory):
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_allclose(a.images, b.images, atol=1e-5)


def test_row_selection_and_errors():
    pos = np.array([[60.0, 60.0], [120.0, 90.0], [200.0, 100.0]])
    tilt = np.array([0, 1, 2])
    stack = _spot_stack(pos, tilt)
    tracks = _tracks(pos, tilt)
    kw = dict(extract_box=32, particle_rad_A=8.0, pixel_A=1.0)
    rows = np.concatenate([b.rows for b in extract_particles(stack, tracks, rows=[2, 0], **kw)])
    assert sorted(rows.tolist()) == [0, 2]
    with pytest.raises(CsptInputError, match="extract_bin"):
        next(extract_particles(stack, tracks, extract_box=32, extract_bin=3, particle_rad_A=8.0, pixel_A=1.0))
    with pytest.raises(CsptInputError, match="particle_rad"):
        next(extract_particles(stack, tracks, extract_box=32, particle_rad_A=15.0, pixel_A=1.0))
    with pytest.raises(CsptInputError, match="image_shape_yx"):
        next(extract_particles(stack[:, :100], tracks, **kw))
    far = _tracks(np.array([[60.0, 60.0], [500.0, 90.0]]), [0, 1])
    with pytest.raises(CsptInputError, match="outside"):
        list(extract_particles(stack, far, **kw))
    with pytest.raises(CsptInputError, match="tind"):
        next(extract_particles(stack[:1], tracks, **kw))
