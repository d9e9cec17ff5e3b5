"""CTF formula and sign, image model (dose filter, cos weighting, flip), per-projection defocus, CTF round trip."""

import numpy as np
import pytest
from numba import njit
from scipy.spatial.transform import Rotation

from napari_cspt2d.errors import CsptInputError
from napari_cspt2d.model.tracks import ParticleTable, TiltTable, TrackSet
from napari_cspt2d.recon import ctf
from napari_cspt2d.recon.backproject import Backprojector, project_volume
from napari_cspt2d.recon.fsc import fsc_curve
from napari_cspt2d.sample import blob_model, render_map


def _reference_ctf(shape, pixel, dfu, dfv, ang_deg, kv=300.0, cs=2.7, w=0.07, phase=0.0):
    """cryoDRGN's published form, written independently: gamma with atan2 astigmatism, √(1−w²) sin − w cos."""
    fy = np.fft.fftfreq(shape[0], pixel)[:, None]
    fx = np.fft.rfftfreq(shape[1], pixel)[None, :]
    volt = kv * 1e3
    lam = 12.2643247 / np.sqrt(volt * (1 + 0.978466e-6 * volt))
    s2 = fx**2 + fy**2
    df = 0.5 * (dfu + dfv + (dfu - dfv) * np.cos(2 * (np.arctan2(fy, fx) - np.radians(ang_deg))))
    gamma = 2 * np.pi * (-0.5 * df * lam * s2 + 0.25 * cs * 1e7 * lam**3 * s2**2) - np.radians(phase)
    return np.sqrt(1 - w**2) * np.sin(gamma) - w * np.cos(gamma)


@pytest.mark.parametrize("shape, pixel, dfu, dfv, ang, phase", [
    ((64, 64), 2.0, 15000.0, 15000.0, 0.0, 0.0),
    ((96, 80), 1.35, 30000.0, 27000.0, 33.0, 0.0),
    ((64, 64), 4.0, 8000.0, 9000.0, -70.0, 90.0),
])
def test_ctf_matches_reference_formula(shape, pixel, dfu, dfv, ang, phase):
    got = ctf.ctf_2d(shape, pixel, dfu, dfv, ang, phase_shift_deg=phase)
    assert got.shape == (shape[0], shape[1] // 2 + 1) and got.dtype == np.float32
    np.testing.assert_allclose(got, _reference_ctf(shape, pixel, dfu, dfv, ang, phase=phase), atol=2e-5)
    full = ctf.ctf_2d(shape, pixel, [dfu], [dfv], ang, phase_shift_deg=phase, rfft=False)[0]
    np.testing.assert_allclose(full[:, : shape[1] // 2], got[:, : shape[1] // 2], atol=1e-6)
    # the full grid is even, C(-k) = C(k), away from the Nyquist row/column (their mirror is not on the grid)
    mirror = full[(-np.arange(shape[0])) % shape[0]][:, (-np.arange(shape[1])) % shape[1]]
    inner = (slice(0, shape[0] // 2), slice(0, shape[1] // 2))
    np.testing.assert_allclose(mirror[inner], full[inner], atol=1e-6)


def test_fast_sin_accuracy():
    @njit
    def evaluate(x):
        out = np.empty_like(x)
        for i in range(x.size):
            out[i] = ctf.fast_sin(x[i])
        return out

    x = np.concatenate([np.linspace(-20, 20, 20001), np.random.default_rng(0).uniform(-1e5, 1e5, 20000)])
    assert np.abs(evaluate(x) - np.sin(x)).max() < 2e-7


def test_ctf_sign_makes_protein_dark():
    """Underfocus: the CTF is −w at zero frequency and negative at low frequency, so a protein-positive blob times
    the CTF is dark at its centre (the convention of raw tilt images)."""
    c = ctf.ctf_2d((64, 64), 2.0, 20000.0)
    assert c[0, 0] == pytest.approx(-0.07, abs=1e-6)
    assert np.all(c[0, 1:3] < 0)
    r = np.arange(64) - 32
    blob = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 6.0**2))
    image = np.fft.irfft2(np.fft.rfft2(blob) * c, s=(64, 64))
    assert image[32, 32] < -0.05 * blob.max()
    # a 90° phase plate turns the zero-frequency contrast to -√(1 - w²): still dark
    assert ctf.ctf_2d((64, 64), 2.0, 0.0, phase_shift_deg=90.0)[0, 0] == pytest.approx(-np.sqrt(1 - 0.07**2), abs=1e-6)


def test_image_model_is_ctf_times_dose_filter_times_scale():
    box, pixel = 64, 3.0
    defocus = np.array([12000.0, 25000.0, 40000.0])
    exposure = np.array([0.0, 30.0, 90.0])
    scale = np.cos(np.radians([0.0, 30.0, 60.0]))
    model = ctf.image_model(box, pixel, defocus, exposure_e_A2=exposure, scale=scale, astigmatism_A=500.0,
                            astig_angle_deg=20.0)
    grid = model.grid(box, pixel)
    assert grid.shape == (3, box, box // 2 + 1)
    fy = np.fft.fftfreq(box, pixel)[:, None]
    fx = np.fft.rfftfreq(box, pixel)[None, :]
    k = np.hypot(fx, fy)
    with np.errstate(divide="ignore"):
        ne = np.where(k > 0, 0.245 * k**-1.665 + 2.81, np.inf)  # Grant & Grigorieff 2015 critical exposure
    for i in range(3):
        expected = (_reference_ctf((box, box), pixel, defocus[i] + 250, defocus[i] - 250, 20.0)
                    * np.exp(-exposure[i] / (2 * ne)) * scale[i])
        np.testing.assert_allclose(grid[i], expected, atol=2e-3)
    flip = ctf.image_model(box, pixel, defocus, mode="flip").grid(box, pixel)
    np.testing.assert_array_equal(flip, np.sign(ctf.ctf_2d((box, box), pixel, defocus)))
    # later exposure attenuates high frequencies more
    assert grid[2, 0, 20] ** 2 < grid[1, 0, 20] ** 2 or abs(grid[2, 0, 20]) < 1e-3
    assert model.take([1]).grid(box, pixel).shape == (1, box, box // 2 + 1)
    with pytest.raises(CsptInputError):
        ctf.image_model(box, pixel, defocus, mode="wiener")
    with pytest.raises(CsptInputError):
        ctf.image_model(box, pixel, None)


def test_mid_exposure_follows_acquisition_order():
    tilts = TiltTable.from_angles([-30.0, 0.0, 30.0], dose=3.0)  # dose-symmetric: 0°, then -30°, then 30°
    mid = ctf.mid_exposure(tilts.accumulated_dose(), tilts.dose)
    np.testing.assert_allclose(mid, [4.5, 1.5, 7.5])


def test_projection_defocus_sign_with_particle_height():
    """A particle above the tomogram centre (nearer the source at zero tilt) is less underfocused; tilting moves
    the height with x (z' = -X sin t + Z cos t)."""
    tilts = TiltTable.from_angles([0.0, 40.0], defocus_um=3.0)
    particles = ParticleTable(np.array([1, 2]), np.array([[0.0, 0.0, 50.0], [100.0, 0.0, 0.0]]), np.zeros((2, 3)))
    tracks = TrackSet(np.array([1, 1, 2, 2]), np.array([0, 1, 0, 1]), np.zeros((4, 2)), np.zeros(4),
                      np.full(4, 100.0), particles, tilts, (512, 512))
    df = ctf.projection_defocus_A(tracks.tilts.defocus_um[tracks.tilt_rows()], tracks.projected_px()[:, 2], 2.0)
    s40, c40 = np.sin(np.radians(40)), np.cos(np.radians(40))
    np.testing.assert_allclose(df, [30000 - 100.0, 30000 - 100.0 * c40, 30000.0, 30000 + 200.0 * s40])


def test_ctf_round_trip_reconstructs_truth():
    """Projections multiplied by CTFs at several defoci (1-3 µm) reconstruct to the truth once the CTF is part of the
    model; without it the map is not the truth (contrast inverted and ringing)."""
    box, pixel = 48, 3.0
    truth = render_map(blob_model(radius_px=box * 0.25, seed=3), box)
    n = 1200
    mats = Rotation.random(n, random_state=5).as_matrix()
    defocus = np.random.default_rng(5).uniform(10000, 30000, n)
    proj = project_volume(truth, mats)
    c = ctf.ctf_2d((box, box), pixel, defocus)
    images = np.fft.fftshift(np.fft.irfft2(np.fft.rfft2(np.fft.ifftshift(proj, axes=(1, 2))) * c, s=(box, box)),
                             axes=(1, 2)).astype(np.float32)
    results = {}
    for name, model in (("ctf", ctf.image_model(box, pixel, defocus)), ("none", None)):
        bp = Backprojector(box, pixel)
        bp.insert(images, mats, half=np.arange(n) % 2, model=model)
        results[name] = fsc_curve(bp.reconstruct().full, truth, pixel).fsc
    # the low-frequency CTF zero at ~1 µm defocus is beyond shell 2; information is recovered on both sides of it
    assert results["ctf"][1:19].min() > 0.9, results["ctf"]
    assert results["none"][1:6].max() < 0.0
