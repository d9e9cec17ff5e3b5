"""FSC curve, resolution at thresholds, table and plot output."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from napari_cspt2d.errors import CsptInputError
from napari_cspt2d.recon.fsc import FscCurve, fsc_curve, plot_fsc, soft_sphere_mask, write_fsc_table


def _signal(n=48, seed=0):
    return gaussian_filter(np.random.default_rng(seed).normal(size=(n, n, n)), 1.0).astype(np.float32)


def test_identical_and_independent_maps():
    a = _signal()
    same = fsc_curve(a, a, 2.0)
    np.testing.assert_allclose(same.fsc, 1.0, atol=1e-6)
    assert same.frequency_A_inv[-1] == pytest.approx(0.25)  # Nyquist of 2 Å voxels
    other = fsc_curve(a, _signal(seed=1), 2.0)
    # independent maps: |FSC| within ~4 standard errors (1/sqrt(voxels per shell)) beyond the first shells
    assert np.all(np.abs(other.fsc[3:]) < 4 / np.sqrt(other.n_voxels[3:]))
    # the shells cover every Fourier voxel inside the Nyquist sphere once
    k = np.fft.fftfreq(48) * 48
    r = np.rint(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2))
    assert same.n_voxels.sum() == int((r <= 24).sum())


def test_fsc_matches_snr_theory():
    """Two maps = signal + independent noise of equal power per shell: FSC = SNR / (1 + SNR)."""
    n = 64
    s = np.random.default_rng(2).normal(size=(n, n, n))
    snr = 0.5
    maps = [s + np.random.default_rng(10 + i).normal(scale=np.sqrt(1 / snr), size=s.shape) for i in range(2)]
    curve = fsc_curve(*maps, 1.0)
    np.testing.assert_allclose(curve.fsc[5:].mean(), snr / (1 + snr), atol=0.01)


def test_mask_is_applied():
    a = _signal(seed=3)
    b = a.copy()
    b[:8] = np.random.default_rng(4).normal(size=b[:8].shape)  # disagree only in a slab
    mask = np.ones_like(a)
    mask[:12] = 0.0
    assert fsc_curve(a, b, 1.0).fsc[10:].mean() < 0.95
    np.testing.assert_allclose(fsc_curve(a, b, 1.0, mask=mask).fsc, 1.0, atol=1e-5)


def test_resolution_interpolates_crossing():
    freq = np.arange(11) / (20 * 2.0)  # box 20, 2 Å
    fsc = np.clip(1.0 - freq / freq[6], 0, 1)  # linear: hits 0.5 at shell 3, 0.143 at shell 6 * 0.857
    curve = FscCurve(freq, fsc, np.ones(11, np.int64), 2.0, 20)
    assert curve.resolution_A(0.5) == pytest.approx(1 / (0.5 * freq[6]))
    assert curve.resolution_A(0.143) == pytest.approx(1 / (0.857 * freq[6]))
    never = FscCurve(freq, np.ones(11), np.ones(11, np.int64), 2.0, 20)
    assert never.resolution_A() == pytest.approx(4.0)  # Nyquist


def test_table_and_plot_written_atomically(tmp_path):
    curve = fsc_curve(_signal(32), _signal(32) + 0.3 * _signal(32, seed=5), 3.0)
    write_fsc_table(tmp_path / "fsc.csv", curve)
    plot_fsc(tmp_path / "fsc.png", curve)
    lines = (tmp_path / "fsc.csv").read_text().splitlines()
    assert lines[0].startswith("# FSC 0.143:") and lines[1] == "shell,frequency_1_per_A,resolution_A,fsc,n_voxels"
    rows = np.loadtxt(tmp_path / "fsc.csv", delimiter=",", skiprows=3, usecols=(0, 1, 3))
    np.testing.assert_allclose(rows[:, 2], curve.fsc[1:], atol=1e-6)
    assert (tmp_path / "fsc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fsc.csv", "fsc.png"]  # no temporary files left


def test_input_validation():
    a = _signal(16)
    with pytest.raises(CsptInputError):
        fsc_curve(a, a[:8], 1.0)
    with pytest.raises(CsptInputError):
        fsc_curve(a, a, 0.0)
    with pytest.raises(CsptInputError):
        fsc_curve(a, a, 1.0, mask=np.ones((4, 4, 4)))
    with pytest.raises(CsptInputError):
        fsc_curve(a[0], a[0], 1.0)


def test_soft_sphere_mask():
    m = soft_sphere_mask(32, 8.0, 4.0)
    assert m.shape == (32, 32, 32) and m.dtype == np.float32
    assert m[16, 16, 16] == 1.0 and m[16, 16, 16 + 8] == 1.0 and m[16, 16, 16 + 12] == 0.0
    assert m[16, 16, 16 + 10] == pytest.approx(0.5)
    np.testing.assert_array_equal(m, m.transpose(2, 1, 0))
    with pytest.raises(CsptInputError, match="radius"):
        soft_sphere_mask(32, 0.0)
