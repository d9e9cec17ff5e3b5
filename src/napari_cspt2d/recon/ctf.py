"""Contrast transfer function.

Sign convention (cryoDRGN's; RELION's ``CTF::getCTF`` uses the opposite overall sign because RELION particles are
contrast-inverted at extraction): with underfocus ``defocus > 0`` the CTF is *negative* at low frequency, so a
protein-positive projection multiplied by it appears dark, as protein does in raw tilt images. Correcting with this
CTF (phase flip by its sign, or multiplying by it and dividing by CTF²) gives protein-positive maps.

    gamma(s) = 2π(−½ Δf λ s² + ¼ Cs λ³ s⁴) − φ
    CTF(s)   = √(1 − w²) sin(gamma) − w cos(gamma)

``Δf`` is the defocus along the frequency direction (astigmatism: ``Δf = ½(dfU + dfV) + ½(dfU − dfV) cos 2(α − α_ast)``),
λ the relativistic electron wavelength, w the amplitude contrast, φ an additional phase shift.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["electron_wavelength_A", "frequency_grid", "ctf_2d"]


def electron_wavelength_A(voltage_kV: float) -> float:
    """Relativistic electron wavelength (Å) at an acceleration voltage (kV)."""
    volts = voltage_kV * 1e3
    return 12.2643247 / np.sqrt(volts * (1.0 + 0.978466e-6 * volts))


def frequency_grid(shape_yx: tuple[int, int], pixel_A: float, rfft: bool = True) -> tuple[NDArray, NDArray]:
    """Spatial frequencies ``(fy, fx)`` in 1/Å of an ``fft2`` (or ``rfft2``) of an image of ``shape_yx``, unshifted."""
    ny, nx = shape_yx
    fy = np.fft.fftfreq(ny, d=pixel_A)
    fx = np.fft.rfftfreq(nx, d=pixel_A) if rfft else np.fft.fftfreq(nx, d=pixel_A)
    return np.meshgrid(fy, fx, indexing="ij")


def ctf_2d(
    shape_yx: tuple[int, int],
    pixel_A: float,
    defocus_u_A: ArrayLike,
    defocus_v_A: ArrayLike | None = None,
    astig_angle_deg: ArrayLike = 0.0,
    *,
    voltage_kV: float = 300.0,
    cs_mm: float = 2.7,
    amp_contrast: float = 0.07,
    phase_shift_deg: float = 0.0,
    rfft: bool = True,
) -> NDArray[np.float32]:
    """CTF on the (r)fft grid of images of ``shape_yx``; one CTF per defocus value.

    ``defocus_u_A``/``defocus_v_A`` (Å, underfocus positive) and ``astig_angle_deg`` broadcast to shape ``(B,)``;
    returns float32 of shape ``(B, ny, nx // 2 + 1)`` (rfft) or ``(B, ny, nx)``; a scalar defocus drops the B axis."""
    scalar = np.ndim(defocus_u_A) == 0
    dfu = np.atleast_1d(np.asarray(defocus_u_A, dtype=np.float64))
    dfv = dfu if defocus_v_A is None else np.atleast_1d(np.asarray(defocus_v_A, dtype=np.float64))
    ang = np.atleast_1d(np.deg2rad(np.asarray(astig_angle_deg, dtype=np.float64)))
    dfu, dfv, ang = np.broadcast_arrays(dfu, dfv, ang)
    fy, fx = frequency_grid(shape_yx, pixel_A, rfft)
    s2 = fx * fx + fy * fy
    theta = np.arctan2(fy, fx)
    lam = electron_wavelength_A(voltage_kV)
    cs_A = cs_mm * 1e7
    df = 0.5 * (dfu + dfv)[:, None, None] + 0.5 * (dfu - dfv)[:, None, None] * np.cos(
        2.0 * (theta[None] - ang[:, None, None])
    )
    gamma = 2.0 * np.pi * (-0.5 * df * lam * s2 + 0.25 * cs_A * lam**3 * s2 * s2) - np.deg2rad(phase_shift_deg)
    w = amp_contrast
    out = (np.sqrt(1.0 - w * w) * np.sin(gamma) - w * np.cos(gamma)).astype(np.float32)
    return out[0] if scalar else out
