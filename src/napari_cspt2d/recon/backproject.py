"""Direct Fourier insertion (backprojection) into padded 3D grids, Wiener reconstruction, and the matching projector.

Conventions (see :mod:`napari_cspt2d.geometry`): a volume is ``vol[z, y, x]`` with its origin at voxel
``N // 2``; an image ``img[y, x]`` has its origin at pixel ``N // 2``. The orientation matrix ``A`` (B, 3, 3) maps map
coordinates to view coordinates, so the 2D transform of a projection is the central slice ``F(Aᵀ (kx, ky, 0))``. A shift
``s`` (x, y) in box pixels means the particle's centre sits at ``N // 2 + s`` in the image; insertion moves the image
by ``−s`` and projection puts the projected origin at ``+s``.

Fourier grid
    The 3D grid is ``P = pad · n`` voxels on a side (``pad``× oversampled: it holds the transform of the map
    embedded in a ``P``³ box). By default images are zero-padded to ``P`` before their ``rfft2``, so every slice is
    sampled at the grid spacing. This costs ``pad²`` more points than inserting unpadded transforms at coordinates
    scaled by ``pad`` (RELION's scheme, ``pad_images=False``), whose sparse samples make trilinear insertion close
    to nearest-neighbour: on noise-free data the FSC vs truth at 0.8 Nyquist is ~0.83 instead of ~0.98. Errors of
    either kind grow with the object's extent in the box and shrink with the number of views. Only the half
    ``kx ≥ 0`` of the grid is stored (``rfftn`` layout ``[kz, ky, kx]``, ``kz``/``ky`` in FFT order): a point that
    lands at ``kx < 0`` is inserted as its Friedel mate (negated coordinates, complex conjugate). The image column
    ``kx = 0`` holds each point and its mate, so it gets half weight; when maps are computed the ``kx = 0`` plane is
    made Hermitian by adding its conjugate mirror (``_hermitian_planes``). Frequencies at or beyond the images'
    Nyquist are left out. Interpolation is trilinear; the normalised trilinear spread multiplies the real-space map
    by ``sinc²(x / P) sinc²(y / P) sinc²(z / P)``, which the gridding correction divides out (and the projector
    divides in before transforming).

Weights and reconstruction
    With per-frequency image models ``m`` (CTF × dose filter × scale, :class:`ctf.ImageModel`, evaluated inside the
    kernel) the grid accumulates ``D = Σ m · F_img`` and ``W = Σ m²``. The map is ``D / (W + 1/τ²)`` with ``1/τ²``
    per shell from the gold-standard FSC as in RELION: a first pass with a tiny regulariser gives half maps and
    their FSC, ``SNR = FSC / (1 − FSC)`` (smoothed over 3 shells, floored at the FSC's statistical error, see
    ``_half_map_snr``), and ``σ²/τ² = Σ(W/(W+ε))² / (SNR · Σ W/(W+ε)²)`` over the shell (RELION's ``mean(1/W)/SNR``
    made robust to barely-sampled voxels). The regulariser also attenuates each shell as a whole, by the mean of
    ``q = W/(W+1/τ²)`` over its sampled voxels: a low-pass filter that follows the half maps' SNR (×0.02 where their
    FSC is near 0). ``reconstruct(shell_damping=d)`` keeps only the fraction ``d`` of that attenuation (in log
    amplitude: each shell times ``mean(q)^(d−1)``; the per-voxel weights ``q`` within a shell stay). Measured on an
    independent simulation (``benchmarks/fidelity.py``, README "Fidelity"): the full Wiener low-pass (``d = 1``,
    the default, :data:`reconstruct.MAP_SHELL_DAMPING`) is behind cryoDRGN's plain back-projection in FSC against
    the truth inside a tight mask around the particle (that truth is sharper than the data, whose picks are 2 px
    off, and the mask's transform mixes the strong low-frequency shells into the damped ones); ``d = 0.5``
    (``reconstruct_shell_damping``) gains most of that back and keeps most of the real-space correlation.
    The FSC between the half maps (per shell) hardly depends on the shell gains (they apply to shells of the padded
    grid). ``reconstruct_tracks`` estimates τ² inside a soft sphere of the particle radius by default (``fsc_mask``).
    The maps are divided twice, from the grids as inserted and from the grids averaged over each voxel's
    neighbourhood (:mod:`.apodise`: a ratio of averages, which sparse tilt-series sampling at pad 2 needs where
    noise dominates), and blended shell by shell by the half maps' SNR.
    Half maps are split by particle: each image is inserted into the grid of
    its half, so the two halves are independent; the two grids fill in parallel (one thread each, numba ``nogil``).

Insertion runs in three passes (``_records``, ``_sort_records``, ``_splat_records``): the points are computed
(coordinates, value × model, weight) into a record buffer that spans calls, sorted by 16³-voxel block of the grid
when the buffer is full or the grids are read, then spread; a grid larger than the caches is then visited block by
block instead of at random, which is 2-4× faster for boxes ≥ 64 than inserting image by image.

Memory is ``O(P³)`` (per half: a complex64 and a float32 grid, plus an insertion buffer of ``P³/8`` points,
14-115 MB) and does not depend on the number of images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.fft
from numba import njit
from numpy.typing import ArrayLike, NDArray

from ..errors import CsptCancelled, CsptInputError
from . import fsc as fsc_mod
from .apodise import apodise_grids, blend_by_shell, unwindow
from .ctf import ImageModel, model_row

__all__ = ["Backprojector", "HalfMapReconstruction", "Projector", "project_volume", "fourier_images", "apply_bfactor",
           "check_shell_damping"]

WORKERS = 2
MIN_RECORDS, MAX_RECORDS = 1 << 19, 1 << 22  # insertion buffer per half: 14-115 MB of scratch (x2)


# ----------------------------------------------------------------------------------------------------- numba kernels
BLOCK_SHIFT = 4  # records are sorted into blocks of 16³ grid voxels before they are spread into the grid
RECORD_FIELDS = 6  # x, y + P, z + P, Re v, Im v, w


@njit(cache=True, nogil=True, fastmath=True)
def _records(fimg, axes, phase_x, phase_y, ctf, env, env_step_inv, flip, f_step, grid, rec, key, counts, start):
    """Pass 1 of the insertion: one record per inserted point (grid coordinates after the Friedel flip, value × model,
    weight = model²), its block key, and the per-block counts, from row ``start`` of ``rec`` on. Returns the number
    of records then held.

    ``fimg`` (B, m, m//2+1): ``m = P`` for images zero-padded to the grid, ``m = box`` for unpadded ones; only
    frequencies below the images' Nyquist (radius m/2) are taken. ``axes[b]`` (2, 3): grid coordinates (x, y, z) of
    the image's unit kx and unit ky (``P/m · A[:2, :]``); ``phase_x`` (B, m//2+1) and ``phase_y`` (B, m) the separable
    phases that move each image's origin (and shift) to pixel 0; ``ctf``/``env``/``env_step_inv``/``flip`` the image
    model (``ctf.model_row``; empty arrays for none) at frequencies ``k · f_step`` (1/Å). The image column kx = 0
    holds each point and its Friedel mate, so it gets half weight."""
    g = float(grid)
    nbx = ((grid // 2) >> BLOCK_SHIFT) + 1
    nby = ((grid - 1) >> BLOCK_SHIFT) + 1
    m = fimg.shape[1]
    nh = fimg.shape[2]
    rmax2 = (m // 2) ** 2
    has_ctf = ctf.shape[0] > 0
    has_env = env.shape[0] > 0
    buf = np.ones(nh)
    n = start
    for b in range(fimg.shape[0]):
        crow = ctf[b] if has_ctf else ctf[0:0].reshape(-1)
        erow = env[b] if has_env else env[0:0].reshape(-1)
        ax0, ax1, ax2 = axes[b, 0, 0], axes[b, 0, 1], axes[b, 0, 2]
        ay0, ay1, ay2 = axes[b, 1, 0], axes[b, 1, 1], axes[b, 1, 2]
        for iy in range(m):
            ky = iy if iy < (m + 1) // 2 else iy - m
            if ky * ky >= rmax2:
                continue
            ix_end = min(nh, int(math.sqrt(rmax2 - ky * ky)) + 1)
            while ix_end > 0 and (ix_end - 1) ** 2 + ky * ky >= rmax2:
                ix_end -= 1
            if has_ctf or has_env:
                model_row(crow, erow, has_ctf, has_env, flip, ky * f_step, f_step, ix_end, env_step_inv, buf)
            py = phase_y[b, iy]
            for ix in range(ix_end):
                mv = np.float32(buf[ix])
                v = fimg[b, iy, ix] * (phase_x[b, ix] * py) * mv
                w = mv * mv
                if ix == 0:
                    v = v * np.float32(0.5)
                    w = w * np.float32(0.5)
                x = ix * ax0 + ky * ay0
                y = ix * ax1 + ky * ay1
                z = ix * ax2 + ky * ay2
                if x < 0.0:
                    x, y, z = -x, -y, -z
                    v = v.conjugate()
                # |y|, |z| < P/2: shifted by P, int() is a floor and wrapping one subtraction
                y += g
                z += g
                yi = int(y)
                zi = int(z)
                yi = yi - grid if yi >= grid else yi
                zi = zi - grid if zi >= grid else zi
                rec[n, 0] = x
                rec[n, 1] = y
                rec[n, 2] = z
                rec[n, 3] = v.real
                rec[n, 4] = v.imag
                rec[n, 5] = w
                k = ((zi >> BLOCK_SHIFT) * nby + (yi >> BLOCK_SHIFT)) * nbx + (int(x) >> BLOCK_SHIFT)
                key[n] = k
                counts[k] += 1
                n += 1
    return n


@njit(cache=True, nogil=True)
def _sort_records(rec, key, n, counts, out):  # pragma: no cover - compiled
    """Pass 2: counting sort of the first ``n`` records by block into ``out``; resets ``counts``."""
    start = np.empty_like(counts)
    total = 0
    for k in range(counts.shape[0]):
        start[k] = total
        total += counts[k]
        counts[k] = 0
    for i in range(n):
        j = start[key[i]]
        start[key[i]] = j + 1
        for c in range(RECORD_FIELDS):
            out[j, c] = rec[i, c]


@njit(cache=True, nogil=True, fastmath=True)
def _splat_records(data, weight, rec, n):  # pragma: no cover - compiled
    """Pass 3: trilinear spread of the (block-sorted) records into ``data``/``weight``; neighbouring records touch
    neighbouring voxels, so the grid is read and written block by block through the cache."""
    grid = data.shape[0]
    for i in range(n):
        x = rec[i, 0]
        y = rec[i, 1]
        z = rec[i, 2]
        v = np.complex64(rec[i, 3] + 1j * rec[i, 4])
        w = rec[i, 5]
        x0 = int(x)
        yi = int(y)
        zi = int(z)
        fx = x - np.float32(x0)
        fy = y - np.float32(yi)
        fz = z - np.float32(zi)
        ya = yi - grid if yi >= grid else yi
        yb = ya + 1 if ya + 1 < grid else 0
        za = zi - grid if zi >= grid else zi
        zb = za + 1 if za + 1 < grid else 0
        gx0 = np.float32(1.0) - fx
        gy0 = np.float32(1.0) - fy
        gz0 = np.float32(1.0) - fz
        _splat_pair(data, weight, za, ya, x0, gz0 * gy0, gx0, fx, v, w)
        _splat_pair(data, weight, za, yb, x0, gz0 * fy, gx0, fx, v, w)
        _splat_pair(data, weight, zb, ya, x0, fz * gy0, gx0, fx, v, w)
        _splat_pair(data, weight, zb, yb, x0, fz * fy, gx0, fx, v, w)


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def _splat_pair(data, weight, zi, yi, x0, wzy, gx0, fx, v, w):  # pragma: no cover - compiled
    """Add ``v``/``w`` with weights ``wzy·(1−fx)`` and ``wzy·fx`` to voxels ``x0`` and ``x0 + 1`` of row (zi, yi)."""
    k0 = wzy * gx0
    k1 = wzy * fx
    data[zi, yi, x0] += k0 * v
    data[zi, yi, x0 + 1] += k1 * v
    weight[zi, yi, x0] += k0 * w
    weight[zi, yi, x0 + 1] += k1 * w


class _Inserter:
    """Insertion into one half's grids through the three passes above. Records (28 bytes each) accumulate over calls
    and are spread when the buffer is full or the grids are read (:meth:`flush`): the buffer holds about ``P³/8``
    points (0.5-4 M), so each 16³ block receives a few points per voxel per spread and stays in cache while it is
    written (2× faster at box 128 than spreading every 0.5 M points)."""

    def __init__(self, data: NDArray, weight: NDArray) -> None:
        self.data, self.weight = data, weight
        grid = data.shape[0]
        nb = ((grid - 1) >> BLOCK_SHIFT) + 1
        self.counts = np.zeros(nb * nb * (((grid // 2) >> BLOCK_SHIFT) + 1), np.int64)
        one_image = grid * (grid // 2 + 1)  # most points one (padded) image can give
        capacity = max(one_image, min(MAX_RECORDS, max(MIN_RECORDS, grid**3 // 8)))
        self.rec = np.empty((capacity, RECORD_FIELDS), np.float32)
        self.sorted = np.empty_like(self.rec)
        self.key = np.empty(capacity, np.int32)
        self.pending = 0

    def __call__(self, fimg, axes, px, py, ctf, env, env_step_inv, flip, f_step) -> None:
        per_image = fimg.shape[1] * (fimg.shape[1] // 2 + 1)
        start = 0
        while start < fimg.shape[0]:
            room = (self.rec.shape[0] - self.pending) // per_image
            if room == 0:
                self.flush()
                continue
            sl = slice(start, start + room)
            self.pending = _records(fimg[sl], axes[sl], px[sl], py[sl], ctf[sl] if ctf.shape[0] else ctf,
                                    env[sl] if env.shape[0] else env, env_step_inv, flip, f_step, self.data.shape[0],
                                    self.rec, self.key, self.counts, self.pending)
            start += room

    def flush(self) -> None:
        """Spread the pending records into the grids."""
        if self.pending:
            _sort_records(self.rec, self.key, self.pending, self.counts, self.sorted)
            _splat_records(self.data, self.weight, self.sorted, self.pending)
            self.pending = 0


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def sample_half_grid(ft, x, y, z):  # pragma: no cover - compiled
    """Trilinear value of the half-grid transform ``ft`` (P, P, P//2+1) at Fourier voxel ``(x, y, z)`` (x the rfft
    axis; negative x through Friedel symmetry). The point must lie inside the grid's sphere."""
    grid = ft.shape[0]
    flip = x < 0.0
    if flip:
        x, y, z = -x, -y, -z
    x0 = int(x)
    y0 = int(math.floor(y))
    z0 = int(math.floor(z))
    fx = np.float32(x - x0)
    fy = np.float32(y - y0)
    fz = np.float32(z - z0)
    ya = y0 + grid if y0 < 0 else y0
    yb = y0 + 1 + grid if y0 + 1 < 0 else y0 + 1
    za = z0 + grid if z0 < 0 else z0
    zb = z0 + 1 + grid if z0 + 1 < 0 else z0 + 1
    gx0 = np.float32(1.0) - fx
    gy0 = np.float32(1.0) - fy
    gz0 = np.float32(1.0) - fz
    acc = gz0 * gy0 * (gx0 * ft[za, ya, x0] + fx * ft[za, ya, x0 + 1])
    acc += gz0 * fy * (gx0 * ft[za, yb, x0] + fx * ft[za, yb, x0 + 1])
    acc += fz * gy0 * (gx0 * ft[zb, ya, x0] + fx * ft[zb, ya, x0 + 1])
    acc += fz * fy * (gx0 * ft[zb, yb, x0] + fx * ft[zb, yb, x0 + 1])
    return acc.conjugate() if flip else acc


@njit(cache=True, nogil=True, fastmath=True)
def _extract_slices(ft, axes, out, rmax2):  # pragma: no cover - compiled
    """Trilinear central slices of the half-grid transform ``ft`` (P, P, P//2+1) into ``out`` (B, n, n//2+1)."""
    n = out.shape[1]
    nh = out.shape[2]
    for b in range(out.shape[0]):
        ax0, ax1, ax2 = axes[b, 0, 0], axes[b, 0, 1], axes[b, 0, 2]
        ay0, ay1, ay2 = axes[b, 1, 0], axes[b, 1, 1], axes[b, 1, 2]
        for iy in range(n):
            ky = iy if iy < (n + 1) // 2 else iy - n
            for ix in range(nh):
                if ix * ix + ky * ky >= rmax2:
                    out[b, iy, ix] = 0
                    continue
                out[b, iy, ix] = sample_half_grid(ft, ix * ax0 + ky * ay0, ix * ax1 + ky * ay1, ix * ax2 + ky * ay2)


@njit(cache=True, nogil=True)
def _shell_sums(weight, eps, pad, n_shells):  # pragma: no cover - compiled
    """Per shell (in units of the unpadded box): Σ(W/(W+ε))² and Σ W/(W+ε)² over the half grid (counted twice for
    0 < kx < P/2 so the sums cover the full sphere)."""
    grid = weight.shape[0]
    s_signal = np.zeros(n_shells)
    s_noise = np.zeros(n_shells)
    for iz in range(grid):
        kz = iz if iz < (grid + 1) // 2 else iz - grid
        for iy in range(grid):
            ky = iy if iy < (grid + 1) // 2 else iy - grid
            for ix in range(weight.shape[2]):
                shell = int(math.sqrt(ix * ix + ky * ky + kz * kz) / pad + 0.5)
                if shell >= n_shells:
                    continue
                w = weight[iz, iy, ix]
                if w <= 0.0:
                    continue
                mult = 1.0 if (ix == 0 or 2 * ix == grid) else 2.0
                q = w / (w + eps)
                s_signal[shell] += mult * q * q
                s_noise[shell] += mult * q / (w + eps)
    return s_signal, s_noise


@njit(cache=True, nogil=True)
def _divide(datas, weights, reg_per_shell, gain_per_shell, pad, out, x_offset=0):  # pragma: no cover - compiled
    """``out = gain[shell] · Σ datas / (Σ weights + reg[shell])`` over a tuple of grids (one half, or both for the
    full map, without forming the sums); zero beyond the last shell (Nyquist of the unpadded box). Column ``ix`` of
    the arrays is frequency ``ix + x_offset``."""
    grid = out.shape[0]
    n_shells = reg_per_shell.shape[0]
    for iz in range(grid):
        kz = iz if iz < (grid + 1) // 2 else iz - grid
        for iy in range(grid):
            ky = iy if iy < (grid + 1) // 2 else iy - grid
            for ix in range(out.shape[2]):
                kx = ix + x_offset
                shell = int(math.sqrt(kx * kx + ky * ky + kz * kz) / pad + 0.5)
                if shell >= n_shells:
                    out[iz, iy, ix] = 0
                    continue
                num = np.complex64(0)
                den = reg_per_shell[shell]
                for h in range(len(datas)):
                    num += datas[h][iz, iy, ix]
                    den += weights[h][iz, iy, ix]
                out[iz, iy, ix] = gain_per_shell[shell] * num / den if den > 0 else 0


@njit(cache=True, nogil=True)
def _shell_gain(weights, reg_per_shell, pad):  # pragma: no cover - compiled
    """Per shell, ``1 / mean(W / (W + reg))`` over the sampled voxels (``W = Σ weights > 0``) of the half grid
    (counted twice for 0 < kx < P/2): the factor that gives the regularised map unit signal gain in the shell."""
    grid = weights[0].shape[0]
    n_shells = reg_per_shell.shape[0]
    s_q = np.zeros(n_shells)
    s_n = np.zeros(n_shells)
    for iz in range(grid):
        kz = iz if iz < (grid + 1) // 2 else iz - grid
        for iy in range(grid):
            ky = iy if iy < (grid + 1) // 2 else iy - grid
            for ix in range(weights[0].shape[2]):
                shell = int(math.sqrt(ix * ix + ky * ky + kz * kz) / pad + 0.5)
                if shell >= n_shells:
                    continue
                w = 0.0
                for h in range(len(weights)):
                    w += weights[h][iz, iy, ix]
                if w <= 0.0:
                    continue
                mult = 1.0 if (ix == 0 or 2 * ix == grid) else 2.0
                s_q[shell] += mult * w / (w + reg_per_shell[shell])
                s_n[shell] += mult
    gain = np.ones(n_shells)
    for i in range(n_shells):
        if s_q[i] > 0.0:
            gain[i] = s_n[i] / s_q[i]
    return gain


# ----------------------------------------------------------------------------------------------------- helpers
def check_shell_damping(shell_damping: float) -> None:
    """Raise :class:`CsptInputError` unless ``0 <= shell_damping <= 1`` (:meth:`Backprojector.reconstruct`)."""
    if not 0.0 <= shell_damping <= 1.0:
        raise CsptInputError(f"is {shell_damping}", field="shell_damping", expected="0 <= shell_damping <= 1")


def _matrices(matrices: ArrayLike, count: int | None = None) -> NDArray[np.float64]:
    mats = np.asarray(matrices, dtype=np.float64)
    if mats.ndim != 3 or mats.shape[1:] != (3, 3) or (count is not None and mats.shape[0] != count):
        raise CsptInputError(f"has shape {mats.shape}", field="matrices", expected=f"({count or 'B'}, 3, 3)")
    if not np.all(np.isfinite(mats)):
        raise CsptInputError("has non-finite values", field="matrices", expected="rotation matrices")
    return mats


def _shift_phases(shifts_px: ArrayLike | None, count: int, period: int, sign: float,
                  origin_px: float = 0.0) -> tuple[NDArray, NDArray]:
    """Separable phase factors ``exp(sign · 2πi k (origin + s) / period)`` for frequencies ``k`` of a ``period``-point
    transform: (B, period//2+1) for x and (B, period) for y."""
    s = np.zeros((count, 2))
    if shifts_px is not None:
        s = np.asarray(shifts_px, dtype=np.float64)
        if s.shape != (count, 2) or not np.all(np.isfinite(s)):
            raise CsptInputError(f"has shape {s.shape}", field="shifts_px", expected=f"finite ({count}, 2) x, y px")
    s = s + origin_px
    kx = np.arange(period // 2 + 1)
    ky = np.fft.ifftshift(np.arange(period) - period // 2)
    px = np.exp(sign * 2j * np.pi * s[:, :1] * kx[None] / period).astype(np.complex64)
    py = np.exp(sign * 2j * np.pi * s[:, 1:] * ky[None] / period).astype(np.complex64)
    return px, py


def fourier_images(images: ArrayLike, pad: int = 2) -> NDArray[np.complex64]:
    """``rfft2`` of real images ``(B, n, n)`` zero-padded at the end to ``pad · n``: ``(B, P, P//2+1)`` complex64.

    The images' origin stays at pixel ``n // 2``; :meth:`Backprojector.insert_fourier` moves it to 0 by a phase."""
    imgs = np.asarray(images, dtype=np.float32)
    if imgs.ndim != 3 or imgs.shape[1] != imgs.shape[2]:
        raise CsptInputError(f"has shape {imgs.shape}", field="images", expected="(B, n, n) square images")
    size = imgs.shape[1] * pad
    rows = scipy.fft.rfft(imgs, n=size, axis=2, workers=WORKERS)
    return scipy.fft.fft(rows, n=size, axis=1, workers=WORKERS, overwrite_x=True)


def _sinc2(n: int, grid: int) -> NDArray[np.float32]:
    """1D trilinear gridding profile ``sinc²((i − n//2) / grid)`` for a box of ``n``."""
    return (np.sinc((np.arange(n) - n // 2) / grid) ** 2).astype(np.float32)


def _gridding_correct(vol: NDArray, grid: int) -> NDArray:
    """Divide a cube by the separable trilinear profile of a ``grid``-point transform, in place."""
    p = 1.0 / _sinc2(vol.shape[0], grid)
    vol *= p[:, None, None]
    vol *= p[None, :, None]
    vol *= p[None, None, :]
    return vol


def _half_grid_to_map(ft: NDArray[np.complex64], box: int) -> NDArray[np.float32]:
    """Real-space ``box``³ map (origin at ``box // 2``) from a half-grid transform of a ``P``³ box, gridding
    corrected."""
    grid = ft.shape[0]
    full = scipy.fft.irfftn(ft, s=(grid, grid, grid), workers=WORKERS)
    start = grid // 2 - box // 2
    # the grid's origin is voxel 0; roll it to P//2 only for the cropped window
    idx = (np.arange(start, start + box) - grid // 2) % grid
    vol = full[np.ix_(idx, idx, idx)].astype(np.float32)
    return _gridding_correct(vol, grid)


def _hermitian_planes(datas: tuple[NDArray, ...], weights: tuple[NDArray, ...]) -> list[tuple[int, NDArray, NDArray]]:
    """The ``kx = 0`` (and, for even P, ``kx = P/2``) planes of the summed grids made Hermitian by adding their
    conjugate mirror: ``[(x, data_plane, weight_plane), ...]`` (new arrays; the grids are not changed)."""
    grid, half = datas[0].shape[0], datas[0].shape[2]
    mirror = (-np.arange(grid)) % grid
    out = []
    for x in [0] + ([grid // 2] if grid % 2 == 0 and half == grid // 2 + 1 else []):
        d = sum(a[:, :, x] for a in datas)
        w = sum(a[:, :, x] for a in weights)
        out.append((x, d + np.conj(d[np.ix_(mirror, mirror)]), w + w[np.ix_(mirror, mirror)]))
    return out


def _half_map_snr(curve: fsc_mod.FscCurve) -> NDArray[np.float64]:
    """Per-shell SNR of a half map, ``FSC / (1 − FSC)``, from a noisy FSC: smoothed over neighbouring shells and
    kept between the FSC's own statistical error ``1/√(voxels in the shell)`` and 0.999, so shells whose FSC cannot
    be told from zero are damped, not erased (erasing them loses the weak signal near the resolution limit)."""
    smooth = np.convolve(np.pad(curve.fsc, 1, mode="edge"), np.ones(3) / 3.0, mode="valid")
    floor = 1.0 / np.sqrt(np.maximum(curve.n_voxels, 1))
    clipped = np.clip(smooth, floor, 0.999)
    return clipped / (1.0 - clipped)


# ----------------------------------------------------------------------------------------------------- backprojector
@dataclass(frozen=True, eq=False)
class HalfMapReconstruction:
    """Result of :meth:`Backprojector.reconstruct`: maps (box³ float32, protein positive when the inputs follow the
    conventions), the FSC between the half maps and the regulariser used (``reg_per_shell``, one per shell)."""

    full: NDArray[np.float32]
    half1: NDArray[np.float32]
    half2: NDArray[np.float32]
    fsc: fsc_mod.FscCurve
    reg_per_shell: NDArray[np.float64]


class Backprojector:
    """Accumulates images into two half-map Fourier grids (or one, ``n_halves=1``) of a ``box``³ map.

    ``pad`` is the oversampling of the 3D grid (2 = RELION's default); ``pad_images`` zero-pads the images to the grid
    before their transform (accurate to Nyquist; False inserts unpadded transforms at scaled coordinates, RELION's
    way, about 3× faster at pad 2 but less accurate at high resolution). Insert batches with :meth:`insert` (real
    images) or :meth:`insert_fourier` (``rfft2`` from :func:`fourier_images`), then call :meth:`reconstruct`."""

    def __init__(self, box: int, pixel_A: float, *, pad: int = 2, pad_images: bool = True, n_halves: int = 2) -> None:
        if not (isinstance(box, (int, np.integer)) and box >= 4):
            raise CsptInputError(f"is {box}", field="box", expected="an integer >= 4")
        if not (np.isfinite(pixel_A) and pixel_A > 0):
            raise CsptInputError(f"is {pixel_A}", field="pixel_A", expected="> 0 Å")
        if pad not in (1, 2, 3, 4):
            raise CsptInputError(f"is {pad}", field="pad", expected="1, 2, 3 or 4")
        if n_halves not in (1, 2):
            raise CsptInputError(f"is {n_halves}", field="n_halves", expected="1 or 2")
        self.box = int(box)
        self.pixel_A = float(pixel_A)
        self.pad = int(pad)
        self.pad_images = bool(pad_images)
        self.grid = self.box * self.pad
        shape = (self.grid, self.grid, self.grid // 2 + 1)
        self._data = [np.zeros(shape, np.complex64) for _ in range(n_halves)]
        self._weight = [np.zeros(shape, np.float32) for _ in range(n_halves)]
        self.count = np.zeros(n_halves, np.int64)
        self._inserters = [_Inserter(d, w) for d, w in zip(self._data, self._weight)]
        # the halves fill in parallel unless this process is limited to one thread (WORKERS = 1, e.g. a dask worker)
        self._pool = ThreadPoolExecutor(max_workers=n_halves) if n_halves > 1 and WORKERS > 1 else None

    @property
    def n_halves(self) -> int:
        return len(self._data)

    @property
    def data(self) -> list[NDArray[np.complex64]]:
        """Per half, ``Σ model · F_img`` on the half grid (P, P, P//2+1) complex64 (pending insertions spread)."""
        self.flush()
        return self._data

    @property
    def weight(self) -> list[NDArray[np.float32]]:
        """Per half, ``Σ model²`` on the half grid (P, P, P//2+1) float32 (pending insertions spread)."""
        self.flush()
        return self._weight

    def _each(self, function: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``[function(item) for item in items]``, on the worker threads when there are any."""
        if self._pool is None:
            return [function(item) for item in items]
        return list(self._pool.map(function, items))

    def flush(self) -> None:
        """Spread all pending insertions into the grids (reading :attr:`data` or :attr:`weight` does it too)."""
        self._each(_Inserter.flush, self._inserters)

    def insert(
        self,
        images: ArrayLike,
        matrices: ArrayLike,
        *,
        half: ArrayLike | None = None,
        shifts_px: ArrayLike | None = None,
        model: ImageModel | None = None,
    ) -> None:
        """Insert real images ``(B, box, box)`` (origin at ``box // 2``) seen through ``matrices`` (B, 3, 3).

        ``half`` (B,) in {0, 1} picks each image's half map (default 0); ``shifts_px`` (B, 2) the particle centre's
        offset from the box centre (x, y, box pixels; the image is moved by minus this); ``model`` the images' CTF
        and weights (:func:`ctf.image_model` for ``box`` px of ``pixel_A``), default 1."""
        self.insert_fourier(self.transform(images), matrices, half=half, shifts_px=shifts_px, model=model)

    def transform(self, images: ArrayLike) -> NDArray[np.complex64]:
        """:func:`fourier_images` of real images ``(B, box, box)`` as :meth:`insert_fourier` takes them (zero-padded
        to the grid when ``pad_images``), to insert the same images through several orientations."""
        return fourier_images(images, self.pad if self.pad_images else 1)

    def insert_fourier(
        self,
        fimages: NDArray[np.complex64],
        matrices: ArrayLike,
        *,
        half: ArrayLike | None = None,
        shifts_px: ArrayLike | None = None,
        model: ImageModel | None = None,
    ) -> None:
        """Like :meth:`insert` with ``fimages`` = :func:`fourier_images` of the images, zero-padded to the grid
        (``pad``, the accurate default) or not (``1``: RELION's scheme, ``pad²`` times fewer points to insert but
        sparse samples in the oversampled grid, which costs accuracy at high resolution)."""
        fimg = np.asarray(fimages)
        b, m = fimg.shape[0], fimg.shape[1]
        if m not in (self.grid, self.box) or fimg.shape != (b, m, m // 2 + 1) or fimg.dtype != np.complex64:
            raise CsptInputError(f"has shape {fimg.shape} ({fimg.dtype})", field="images",
                                 expected=f"(B, {self.box}, {self.box}) images or complex64 (B, m, m//2+1) "
                                          f"transforms with m = {self.grid} or {self.box}")
        axes = np.ascontiguousarray(_matrices(matrices, b)[:, :2, :] * (self.grid / m))
        halves = np.zeros(b, np.int64) if half is None else np.asarray(half, dtype=np.int64).reshape(-1)
        if halves.shape != (b,) or np.any((halves < 0) | (halves >= self.n_halves)):
            raise CsptInputError("has wrong length or values", field="half",
                                 expected=f"{b} values in 0..{self.n_halves - 1}")
        if model is not None and len(model) != b:
            raise CsptInputError(f"describes {len(model)} images", field="model", expected=f"{b} like the images")
        px, py = _shift_phases(shifts_px, b, m, +1.0, origin_px=self.box // 2)
        f_step = 1.0 / (m * self.pixel_A)

        def run(h: int) -> None:
            sel = np.flatnonzero(halves == h)
            if sel.size == 0:
                return
            whole = sel.size == b
            take = (lambda a: a) if whole else (lambda a: np.ascontiguousarray(a[sel]))
            part = model if (model is None or whole) else model.take(sel)
            ctf, env, env_step_inv, flip = (np.zeros((0, 6)), np.zeros((0, 1), np.float32), 1.0, False) if (
                part is None) else part.kernel_args()
            self._inserters[h](take(fimg), take(axes), take(px), take(py), ctf, env, env_step_inv, flip, f_step)
            self.count[h] += sel.size

        self._each(run, range(self.n_halves))

    def add_grids(self, data: Sequence[NDArray[np.complex64]], weight: Sequence[NDArray[np.float32]],
                  count: ArrayLike) -> None:
        """Add the grids of another accumulation of the same map (e.g. the images another process inserted):
        ``data``/``weight`` one array per half shaped like :attr:`data`/:attr:`weight`, ``count`` images per half."""
        own_data, own_weight = self.data, self.weight  # pending insertions spread once
        shape = own_data[0].shape
        if len(data) != self.n_halves or len(weight) != self.n_halves or any(
                np.shape(a) != shape for a in (*data, *weight)):
            raise CsptInputError(f"have {len(data)} data and {len(weight)} weight grids", field="grids",
                                 expected=f"{self.n_halves} of each, shaped {shape}")
        for h in range(self.n_halves):
            own_data[h] += data[h]
            own_weight[h] += weight[h]
        self.count += np.asarray(count, dtype=np.int64).reshape(self.n_halves)

    def close(self) -> None:
        """Spread pending insertions and release the worker threads (the grids stay usable)."""
        self.flush()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    # ------------------------------------------------------------------------------------------------ reconstruction
    def _apodised(self) -> list[tuple[NDArray[np.complex64], NDArray[np.float32]]]:
        """Per half, the grids ``(data, weight)`` averaged over each voxel's neighbourhood
        (:func:`apodise.apodise_grids`). Spreads pending insertions first."""
        self.flush()

        def one(h: int) -> tuple[NDArray[np.complex64], NDArray[np.float32]]:
            planes = _hermitian_planes((self._data[h],), (self._weight[h],))
            return apodise_grids(self._data[h], self._weight[h], self.box, planes)

        return self._each(one, range(self.n_halves))

    def _raw(self) -> list[tuple[NDArray[np.complex64], NDArray[np.float32]]]:
        """Per half, the grids ``(data, weight)`` as inserted (pending insertions spread)."""
        self.flush()
        return list(zip(self._data, self._weight))

    def _map(self, grids: Sequence[tuple[NDArray[np.complex64], NDArray[np.float32]]], reg: NDArray[np.float64],
             shell_damping: float = 1.0, check: Callable[[], None] | None = None, *, apodised: bool = False
             ) -> NDArray[np.float32]:
        """``Σ data / (Σ weight + reg[shell])`` over ``grids`` (``(data, weight)`` of the halves to add, from
        :meth:`_raw` or, with ``apodised``, :meth:`_apodised`) with Hermitian ``kx = 0`` planes, to a
        gridding-corrected map; each shell keeps the fraction ``shell_damping`` (in log amplitude) of its mean
        Wiener attenuation (:func:`_shell_gain`, module docstring). ``check()`` is called between the division and
        the transform (it raises to stop)."""
        datas = tuple(g[0] for g in grids)
        weights = tuple(g[1] for g in grids)
        pad = float(self.pad)
        gain = _shell_gain(weights, reg, pad) ** (1.0 - shell_damping) if shell_damping < 1.0 else np.ones_like(reg)
        out = np.empty_like(datas[0])
        _divide(datas, weights, reg, gain, pad, out)
        plane = np.empty((self.grid, self.grid, 1), np.complex64)
        for x, d, w in _hermitian_planes(datas, weights):
            _divide((np.ascontiguousarray(d[:, :, None]),), (np.ascontiguousarray(w[:, :, None]),), reg, gain,
                    pad, plane, x)
            out[:, :, x] = plane[:, :, 0]
        if check is not None:
            check()
        vol = _half_grid_to_map(out, self.box)
        return unwindow(vol, self.grid) if apodised else vol

    def reconstruct(
        self,
        *,
        fsc_mask: ArrayLike | None = None,
        tau2_fudge: float = 1.0,
        shell_damping: float = 1.0,
        progress: Callable[[str, int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> HalfMapReconstruction:
        """Wiener-regularised half maps and full map (see the module docstring) with the FSC between the half maps.

        ``fsc_mask`` (box³, 0..1) is applied to both half maps for the FSC
        (and so for τ²); ``tau2_fudge`` scales τ² (RELION's T: > 1 trusts the data more); ``shell_damping`` (0..1)
        is the fraction of the Wiener filter's per-shell attenuation the maps keep (1: the Wiener map; 0: unit
        signal gain in every shell, see the module docstring). ``cancel()`` returning True raises
        :class:`CsptCancelled` at the next step of a map or before the FSC (at box 128 a step takes about 0.2 s,
        the whole finishing seconds)."""
        check_shell_damping(shell_damping)
        if self.n_halves != 2:
            raise CsptInputError("needs two half maps", field="n_halves", expected="2")
        if np.any(self.count == 0):
            raise CsptInputError(f"half maps hold {self.count.tolist()} images", field="images",
                                 expected="at least one image in each half")

        def stop_if_cancelled() -> None:
            if cancel is not None and cancel():
                raise CsptCancelled("reconstruction cancelled while the map was finished")

        def step(i: int) -> None:
            stop_if_cancelled()
            if progress is not None:
                progress("reconstruct", i, 4)

        def map_of(grids: Sequence[tuple[NDArray[np.complex64], NDArray[np.float32]]], reg: NDArray[np.float64],
                   damping: float = 1.0, apodised: bool = False) -> NDArray[np.float32]:
            stop_if_cancelled()
            return self._map(grids, reg, damping, stop_if_cancelled, apodised=apodised)

        n_shells = self.box // 2 + 1
        step(0)
        # first pass: a tiny regulariser, only to measure the FSC
        grids = self._raw()
        mean_w = float(np.mean([w[w > 0].mean() for _, w in grids]))
        eps = 1e-3 * mean_w
        tiny = np.full(n_shells, eps)
        first = self._each(lambda g: map_of((g,), tiny), grids)
        step(1)
        curve0 = fsc_mod.fsc_curve(first[0], first[1], self.pixel_A, mask=fsc_mask)
        del first
        stop_if_cancelled()
        half_snr = _half_map_snr(curve0)
        snr = tau2_fudge * half_snr
        sums = self._each(lambda g: _shell_sums(g[1], eps, float(self.pad), n_shells), grids)
        sig, noi = sum(s[0] for s in sums), sum(s[1] for s in sums)
        with np.errstate(divide="ignore", invalid="ignore"):
            reg = np.where(noi > 0, sig / (snr * noi), eps)
        reg = np.maximum(np.nan_to_num(reg, nan=eps, posinf=1e30), 1e-6 * mean_w)
        step(2)
        smooth = self._apodised()

        def blended(halves: tuple[int, ...]) -> NDArray[np.float32]:
            sharp = map_of([grids[h] for h in halves], reg, shell_damping)
            averaged = map_of([smooth[h] for h in halves], reg, shell_damping, apodised=True)
            return blend_by_shell(sharp, averaged, 1.0 / (1.0 + len(halves) * half_snr))

        half1, half2, full = self._each(blended, [(0,), (1,), (0, 1)])
        step(3)
        curve = fsc_mod.fsc_curve(half1, half2, self.pixel_A, mask=fsc_mask)
        step(4)
        return HalfMapReconstruction(full, half1, half2, curve, reg)

    def reconstruct_single(self, reg_fraction: float = 1e-3) -> NDArray[np.float32]:
        """Map from all halves with a constant regulariser ``reg_fraction × mean(W)`` (no FSC needed)."""
        if not self.count.sum():
            raise CsptInputError("no image was inserted", field="images", expected="at least one image")
        grids = [g for g, c in zip(self._raw(), self.count) if c]
        mean_w = float(sum(w[w > 0].mean() for _, w in grids))
        return self._map(grids, np.full(self.box // 2 + 1, reg_fraction * mean_w))


# ----------------------------------------------------------------------------------------------------- projector
class Projector:
    """Fourier-slice projector of a ``box``³ volume (origin at voxel ``box // 2``), ``pad``× oversampled.

    The volume is divided by the trilinear gridding profile before its transform, so slices interpolated
    trilinearly match real-space projections. That correction assumes samples between grid points; the zero
    frequency always falls on a grid point, so it is set to the volume's sum instead."""

    def __init__(self, volume: ArrayLike, *, pad: int = 2) -> None:
        vol = np.asarray(volume, dtype=np.float32)
        if vol.ndim != 3 or len(set(vol.shape)) != 1:
            raise CsptInputError(f"has shape {vol.shape}", field="volume", expected="a cube (n, n, n)")
        if pad not in (1, 2, 3, 4):
            raise CsptInputError(f"is {pad}", field="pad", expected="1, 2, 3 or 4")
        self.box = vol.shape[0]
        self.pad = pad
        grid = self.box * pad
        padded = np.zeros((grid, grid, grid), np.float32)
        start = grid // 2 - self.box // 2
        padded[start:start + self.box, start:start + self.box, start:start + self.box] = _gridding_correct(
            vol.copy(), grid
        )
        self.ft = scipy.fft.rfftn(np.fft.ifftshift(padded), workers=WORKERS).astype(np.complex64)
        self.dc = np.complex64(vol.sum(dtype=np.float64))

    def project_fourier(self, matrices: ArrayLike, shifts_px: ArrayLike | None = None) -> NDArray[np.complex64]:
        """Central slices ``(B, box, box//2+1)`` (``rfft2`` layout of images with origin at ``box // 2``)."""
        mats = _matrices(matrices)
        b, n = mats.shape[0], self.box
        axes = np.ascontiguousarray(mats[:, :2, :] * self.pad)
        out = np.empty((b, n, n // 2 + 1), np.complex64)
        rmax2 = float((n // 2) ** 2)
        chunks = [slice(i, min(b, i + max(1, -(-b // WORKERS)))) for i in range(0, b, max(1, -(-b // WORKERS)))]
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            list(pool.map(lambda s: _extract_slices(self.ft, axes[s], out[s], rmax2), chunks))
        out[:, 0, 0] = self.dc
        if shifts_px is not None:
            px, py = _shift_phases(shifts_px, b, n, -1.0)
            out *= py[:, :, None]
            out *= px[:, None, :]
        return out

    def project(self, matrices: ArrayLike, shifts_px: ArrayLike | None = None) -> NDArray[np.float32]:
        """Projection images ``(B, box, box)`` float32 (origin at ``box // 2``; particle centre at ``+shifts_px``)."""
        slices = self.project_fourier(matrices, shifts_px)
        n = self.box
        imgs = scipy.fft.irfft2(slices, s=(n, n), workers=WORKERS)
        return np.fft.fftshift(imgs, axes=(1, 2)).astype(np.float32)


def project_volume(
    volume: ArrayLike, matrices: ArrayLike, shifts_px: ArrayLike | None = None, *, pad: int = 2
) -> NDArray[np.float32]:
    """Reference projections ``(B, n, n)`` of ``volume`` (n³, origin at ``n // 2``) through ``matrices`` (B, 3, 3),
    with the particle centre at ``n // 2 + shifts_px`` (B, 2; x, y pixels). See :class:`Projector` for reuse."""
    return Projector(volume, pad=pad).project(matrices, shifts_px)


def apply_bfactor(volume: ArrayLike, voxel_A: float, bfactor_A2: float) -> NDArray[np.float32]:
    """Multiply a map's transform by ``exp(−B s² / 4)`` (``s`` in 1/Å): negative ``bfactor_A2`` sharpens."""
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3 or not np.isfinite(bfactor_A2):
        raise CsptInputError(f"volume {vol.shape}, B {bfactor_A2}", field="bfactor_A2", expected="a finite B, 3D map")
    n = vol.shape
    k2 = (np.fft.fftfreq(n[0])[:, None, None] ** 2 + np.fft.fftfreq(n[1])[None, :, None] ** 2
          + np.fft.rfftfreq(n[2])[None, None, :] ** 2) / voxel_A**2
    ft = scipy.fft.rfftn(vol, workers=WORKERS) * np.exp(-bfactor_A2 * k2 / 4.0)
    return scipy.fft.irfftn(ft, s=n, workers=WORKERS).astype(np.float32)
