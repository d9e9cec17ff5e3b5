"""Contrast transfer function, per-projection defocus, exposure (dose) filter and the combined image model.

Sign convention (cryoDRGN's ``compute_ctf``; RELION's ``CTF::getCTF`` has the opposite overall sign because RELION
particles are contrast-inverted at extraction): with underfocus ``defocus > 0`` the CTF is *negative* at low
frequency, so a protein-positive projection multiplied by it appears dark, as protein does in raw tilt images.
Correcting with this CTF (phase flip by its sign, or multiplying by it and dividing by CTF²) gives protein-positive
maps, which is how maps are written (RELION/cisTEM convention).

    gamma(s) = 2π(−½ Δf λ s² + ¼ Cs λ³ s⁴) − φ
    CTF(s)   = √(1 − w²) sin(gamma) − w cos(gamma) = sin(gamma − asin w)

``Δf`` is the defocus along the frequency direction (astigmatism:
``Δf = ½(dfU + dfV) + ½(dfU − dfV) cos 2(α − α_ast)``), λ the relativistic electron wavelength, w the amplitude
contrast, φ an additional phase shift.

Defocus of a projection (:func:`projection_defocus_A`): the tilt's defocus minus the particle's height along the beam
in the tilted specimen (``geometry.project_points`` third column × pixel size). In underfocus the plane imaged in
focus lies on the source side of the specimen, so a particle nearer the source (``z' > 0``) is *less* underfocused.

Exposure filter (:func:`radial_envelope`): Grant & Grigorieff (2015) critical exposure ``Ne(k) = 0.245 k^−1.665 + 2.81``
e/Å² (k in 1/Å, 300 kV; × 0.8 at 200 kV and below), amplitude attenuation ``exp(−N / (2 Ne(k)))``. For a tilt image
``N`` is the exposure at the middle of its own exposure: the dose received before it (acquisition order) plus half
its own dose (:func:`mid_exposure`).

Image model (:class:`ImageModel`): ``m(k) = scale · dose filter(|k|) · CTF(k)`` (or ``sign(CTF)`` for phase
flipping), the factor by which an image's transform differs from the projection's. The backprojector evaluates it
inside its numba kernel (:func:`model_row`) on the padded frequency grid, so no per-image 2D arrays are made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numba import njit
from numpy.typing import ArrayLike, NDArray

from ..errors import CsptInputError

__all__ = [
    "electron_wavelength_A",
    "ctf_2d",
    "critical_exposure_e_A2",
    "mid_exposure",
    "projection_defocus_A",
    "ctf_params",
    "fast_sin",
    "model_row",
    "radial_envelope",
    "ImageModel",
    "image_model",
]


def electron_wavelength_A(voltage_kV: float) -> float:
    """Relativistic electron wavelength (Å) at an acceleration voltage (kV)."""
    volts = voltage_kV * 1e3
    return 12.2643247 / np.sqrt(volts * (1.0 + 0.978466e-6 * volts))


def _check_optics(voltage_kV: float, cs_mm: float, amp_contrast: float, pixel_A: float) -> None:
    if not (np.isfinite(voltage_kV) and voltage_kV > 0):
        raise CsptInputError(f"is {voltage_kV}", field="voltage_kV", expected="> 0 kV")
    if not np.isfinite(cs_mm):
        raise CsptInputError(f"is {cs_mm}", field="cs_mm", expected="a finite number (mm)")
    if not 0.0 <= amp_contrast < 1.0:
        raise CsptInputError(f"is {amp_contrast}", field="amp_contrast", expected="0 <= w < 1")
    if not (np.isfinite(pixel_A) and pixel_A > 0):
        raise CsptInputError(f"is {pixel_A}", field="pixel_A", expected="> 0 Å")


def ctf_params(
    defocus_u_A: ArrayLike,
    defocus_v_A: ArrayLike | None = None,
    astig_angle_deg: ArrayLike = 0.0,
    *,
    voltage_kV: float = 300.0,
    cs_mm: float = 2.7,
    amp_contrast: float = 0.07,
    phase_shift_deg: float = 0.0,
) -> NDArray[np.float64]:
    """Per-image CTF coefficients ``(B, 6)`` for :func:`model_row`: ``CTF = sin(c0 s² + c1 (c2 (fx² − fy²) + c3 · 2 fx
    fy) + c4 s⁴ − c5)`` with ``(c2, c3) = (cos 2α, sin 2α)`` of the astigmatism angle and ``c5 = φ + asin w``
    (see the module docstring); inputs broadcast to ``(B,)``."""
    _check_optics(voltage_kV, cs_mm, amp_contrast, 1.0)
    dfu = np.atleast_1d(np.asarray(defocus_u_A, dtype=np.float64))
    dfv = dfu if defocus_v_A is None else np.atleast_1d(np.asarray(defocus_v_A, dtype=np.float64))
    ang = np.atleast_1d(np.deg2rad(np.asarray(astig_angle_deg, dtype=np.float64)))
    dfu, dfv, ang = np.broadcast_arrays(dfu, dfv, ang)
    if not (np.all(np.isfinite(dfu)) and np.all(np.isfinite(dfv)) and np.all(np.isfinite(ang))):
        raise CsptInputError("has non-finite values", field="defocus", expected="finite defocus (Å) and angles")
    lam = float(electron_wavelength_A(voltage_kV))
    out = np.empty(dfu.shape + (6,))
    out[:, 0] = -np.pi * lam * 0.5 * (dfu + dfv)
    out[:, 1] = -np.pi * lam * 0.5 * (dfu - dfv)
    out[:, 2] = np.cos(2.0 * ang)
    out[:, 3] = np.sin(2.0 * ang)
    out[:, 4] = 0.5 * np.pi * cs_mm * 1e7 * lam**3
    out[:, 5] = np.deg2rad(phase_shift_deg) + np.arcsin(amp_contrast)
    return out


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def fast_sin(x):  # pragma: no cover - compiled
    """sin(x) to ~1e-7 absolute for |x| up to ~1e6, branch-free so that numba vectorises loops over it: reduction
    by the nearest multiple of π, then the odd Taylor series to x¹¹ on [−π/2, π/2] (remainder < 6e-8)."""
    k = math.floor(x * 0.3183098861837907 + 0.5)
    r = x - k * 3.141592653589793
    r2 = r * r
    p = r * (1.0 + r2 * (-1.0 / 6.0 + r2 * (1.0 / 120.0 + r2 * (-1.0 / 5040.0 + r2 * (1.0 / 362880.0
                                                                                      - r2 / 39916800.0)))))
    return p * (1.0 - 2.0 * (k - 2.0 * math.floor(0.5 * k)))


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def model_row(ctf_row, env_row, has_ctf, has_env, flip, fy, fx_step, n, env_step_inv, out):  # pragma: no cover
    """The image model along one row of an rfft grid: ``out[ix]`` for ``fx = ix · fx_step``, ``ix < n`` (1/Å).

    ``ctf_row`` (6,) from :func:`ctf_params` (ignored unless ``has_ctf``), ``env_row`` (R,) radial envelope sampled
    every ``1 / env_step_inv`` 1/Å (ignored unless ``has_env``). Branches are hoisted so each loop vectorises."""
    if has_ctf:
        p0, p1, p2, p3, p4, p5 = ctf_row[0], ctf_row[1], ctf_row[2], ctf_row[3], ctf_row[4], ctf_row[5]
        for ix in range(n):
            fx = ix * fx_step
            s2 = fx * fx + fy * fy
            out[ix] = fast_sin(p0 * s2 + p1 * (p2 * (fx * fx - fy * fy) + p3 * 2.0 * fx * fy) + p4 * s2 * s2 - p5)
        if flip:
            for ix in range(n):
                out[ix] = math.copysign(1.0, out[ix])
    else:
        for ix in range(n):
            out[ix] = 1.0
    if has_env:
        top = env_row.shape[0] - 1.000001
        for ix in range(n):
            fx = ix * fx_step
            t = min(math.sqrt(fx * fx + fy * fy) * env_step_inv, top)
            i = int(t)
            f = t - i
            out[ix] *= (1.0 - f) * env_row[i] + f * env_row[i + 1]


@njit(cache=True, nogil=True)
def _model_grid(ctf, env, env_step_inv, flip, ny, nx, pixel_A, out):  # pragma: no cover - compiled
    """Fill ``out`` (B, ny, nx//2+1) with the image model on the rfft grid of ``ny × nx`` images."""
    has_ctf = ctf.shape[0] > 0
    has_env = env.shape[0] > 0
    fy_step = 1.0 / (ny * pixel_A)
    fx_step = 1.0 / (nx * pixel_A)
    buf = np.empty(out.shape[2])
    for b in range(out.shape[0]):
        crow = ctf[b] if has_ctf else ctf[0:0].reshape(-1)
        erow = env[b] if has_env else env[0:0].reshape(-1)
        for iy in range(ny):
            fy = (iy if iy < (ny + 1) // 2 else iy - ny) * fy_step
            model_row(crow, erow, has_ctf, has_env, flip, fy, fx_step, out.shape[2], env_step_inv, buf)
            out[b, iy, :] = buf


_NO_CTF = np.zeros((0, 6))
_NO_ENV = np.zeros((0, 1), np.float32)


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
    _check_optics(voltage_kV, cs_mm, amp_contrast, pixel_A)
    scalar = np.ndim(defocus_u_A) == 0
    params = ctf_params(defocus_u_A, defocus_v_A, astig_angle_deg, voltage_kV=voltage_kV, cs_mm=cs_mm,
                        amp_contrast=amp_contrast, phase_shift_deg=phase_shift_deg)
    ny, nx = (int(v) for v in shape_yx)
    out = np.empty((params.shape[0], ny, nx // 2 + 1), np.float32)
    _model_grid(params, _NO_ENV, 1.0, False, ny, nx, float(pixel_A), out)
    if not rfft:  # the CTF is even: C(-k) = C(k)
        neg = (-np.arange(ny)) % ny
        kx = np.fft.fftfreq(nx) * nx
        cols = np.rint(np.abs(kx)).astype(np.int64)
        out = np.where((kx >= 0)[None, None, :], out[:, :, cols], out[:, neg][:, :, cols])
    return out[0] if scalar else out


def critical_exposure_e_A2(freq_A_inv: ArrayLike, voltage_kV: float = 300.0) -> NDArray[np.float64]:
    """Grant & Grigorieff (2015) critical exposure (e/Å²) at spatial frequency ``freq_A_inv`` (1/Å); inf at 0."""
    k = np.asarray(freq_A_inv, dtype=np.float64)
    with np.errstate(divide="ignore"):
        ne = 0.245 * np.where(k > 0, k, np.inf) ** -1.665 + 2.81
    ne = np.where(k > 0, ne, np.inf)
    return ne * (0.8 if voltage_kV <= 200.0 else 1.0)


def mid_exposure(accumulated_before_e_A2: ArrayLike, dose_e_A2: ArrayLike) -> NDArray[np.float64]:
    """Exposure (e/Å²) at the middle of a tilt image's own exposure: dose before it + half its own dose."""
    return np.asarray(accumulated_before_e_A2, dtype=np.float64) + 0.5 * np.asarray(dose_e_A2, dtype=np.float64)


def projection_defocus_A(tilt_defocus_um: ArrayLike, height_px: ArrayLike, pixel_A: float) -> NDArray[np.float64]:
    """Defocus (Å, underfocus positive) of each projection: tilt defocus (µm) minus the particle's height along the
    beam (``z'`` in unbinned px, + towards the source, from ``geometry.project_points``) times ``pixel_A``."""
    return np.asarray(tilt_defocus_um, dtype=np.float64) * 1e4 - np.asarray(height_px, dtype=np.float64) * pixel_A


def radial_envelope(
    box: int, pixel_A: float, *, exposure_e_A2: ArrayLike | None = None, scale: ArrayLike | None = None,
    n_images: int = 1, voltage_kV: float = 300.0,
) -> NDArray[np.float32]:
    """Radial part of the image model, ``scale × dose filter``, sampled every ``1 / (box · pixel_A)`` 1/Å from 0 to
    beyond the corner of the 2D transform (√2 × Nyquist): shape ``(B, R)`` float32."""
    s = np.arange(int(np.ceil(box * np.sqrt(0.5))) + 2) / (box * pixel_A)
    env = np.ones((n_images, s.size), np.float32)
    if exposure_e_A2 is not None:
        dose = np.broadcast_to(np.asarray(exposure_e_A2, dtype=np.float64), (n_images,))
        if np.any(~np.isfinite(dose)) or np.any(dose < 0):
            raise CsptInputError("has negative or non-finite values", field="exposure_e_A2", expected=">= 0 e/Å²")
        env *= np.exp(-dose[:, None] * (0.5 / critical_exposure_e_A2(s, voltage_kV))[None, :])
    if scale is not None:
        sc = np.broadcast_to(np.asarray(scale, dtype=np.float64), (n_images,))
        if np.any(~np.isfinite(sc)):
            raise CsptInputError("has non-finite values", field="scale", expected="finite weights")
        env *= sc[:, None]
    return env


@dataclass(frozen=True, eq=False)
class ImageModel:
    """What each image shows of the projection, per frequency: ``m(k) = envelope(|k|) · CTF(k)``, or ``sign(CTF)`` for
    phase flipping (``flip``). ``ctf`` is ``(B, 6)`` from :func:`ctf_params` or None (no CTF); ``envelope`` ``(B, R)``
    from :func:`radial_envelope` (sampled every ``envelope_step_A_inv`` 1/Å) or None."""

    ctf: NDArray[np.float64] | None
    envelope: NDArray[np.float32] | None = None
    envelope_step_A_inv: float = 1.0
    flip: bool = False

    def __len__(self) -> int:
        return int((self.ctf if self.ctf is not None else self.envelope).shape[0])

    def kernel_args(self) -> tuple[NDArray, NDArray, float, bool]:
        """``(ctf, envelope, 1/step, flip)`` with empty arrays for missing parts, for :func:`model_row` loops."""
        ctf = _NO_CTF if self.ctf is None else np.ascontiguousarray(self.ctf, dtype=np.float64)
        env = _NO_ENV if self.envelope is None else np.ascontiguousarray(self.envelope, dtype=np.float32)
        return ctf, env, 1.0 / self.envelope_step_A_inv, bool(self.flip)

    def take(self, rows: ArrayLike) -> ImageModel:
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return ImageModel(pick(self.ctf), pick(self.envelope), self.envelope_step_A_inv, self.flip)

    def grid(self, box: int, pixel_A: float) -> NDArray[np.float32]:
        """The model on the rfft grid of ``box``² images: ``(B, box, box // 2 + 1)`` float32."""
        out = np.empty((len(self), box, box // 2 + 1), np.float32)
        _model_grid(*self.kernel_args(), box, box, float(pixel_A), out)
        return out


def image_model(
    box: int,
    pixel_A: float,
    defocus_A: ArrayLike | None,
    *,
    voltage_kV: float = 300.0,
    cs_mm: float = 2.7,
    amp_contrast: float = 0.07,
    phase_shift_deg: float = 0.0,
    astigmatism_A: ArrayLike = 0.0,
    astig_angle_deg: ArrayLike = 0.0,
    exposure_e_A2: ArrayLike | None = None,
    scale: ArrayLike | None = None,
    mode: Literal["multiply", "flip"] = "multiply",
) -> ImageModel:
    """Image models for ``B`` images of ``box`` px at ``pixel_A`` Å: ``defocus_A`` (B,) mean defocus (None: no CTF),
    ``astigmatism_A`` = dfU − dfV, ``exposure_e_A2`` (B,) for the dose filter (None: none), ``scale`` (B,) e.g.
    cos(tilt); ``mode`` "multiply" (CTF) or "flip" (sign of the CTF)."""
    if mode not in ("multiply", "flip"):
        raise CsptInputError(f"is {mode!r}", field="ctf_mode", expected="'multiply' or 'flip'")
    _check_optics(voltage_kV, cs_mm, amp_contrast, pixel_A)
    ctf = None
    if defocus_A is not None:
        df = np.atleast_1d(np.asarray(defocus_A, dtype=np.float64))
        astig = np.broadcast_to(np.asarray(astigmatism_A, dtype=np.float64), df.shape)
        ctf = ctf_params(df + 0.5 * astig, df - 0.5 * astig, astig_angle_deg, voltage_kV=voltage_kV, cs_mm=cs_mm,
                         amp_contrast=amp_contrast, phase_shift_deg=phase_shift_deg)
    n = None
    for a in (defocus_A, exposure_e_A2, scale):
        if a is not None and np.ndim(a):
            n = np.shape(a)[0]
    n = 1 if n is None else n
    envelope = None
    if exposure_e_A2 is not None or scale is not None:
        envelope = radial_envelope(box, pixel_A, exposure_e_A2=exposure_e_A2, scale=scale, n_images=n,
                                   voltage_kV=voltage_kV)
    if ctf is None and envelope is None:
        raise CsptInputError("neither a CTF nor weights given", field="image_model",
                             expected="defocus_A, exposure_e_A2 or scale")
    return ImageModel(ctf, envelope, 1.0 / (box * pixel_A), mode == "flip")
