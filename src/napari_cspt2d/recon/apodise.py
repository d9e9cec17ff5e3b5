"""Neighbourhood averaging of the padded Fourier grids before the division ``D / W`` (:mod:`.backproject`).

At ``pad`` 2 a box-``n`` map is inserted into a ``P = 2n`` grid whose voxels are half a box-frequency apart. Slices
of a tilt series cover that grid unevenly: each particle's tilts share one axis, so at high frequency its planes
are several grid voxels apart (box 128, 3° steps: ~6 voxels near Nyquist), and near the CTF's zeros the weights
``W = Σ model²`` are tiny. Dividing voxel by voxel and then cropping the map to the box (which, in Fourier space,
averages neighbouring voxels) is an average of ratios: the voxels with little weight, whose ``D / W`` is mostly
noise, count as much as the well-measured ones. Averaging ``D`` and ``W`` over a voxel's neighbourhood first (a
ratio of averages) weights every sample by its measurement, as a box-sized grid does (cryoDRGN's
``backproject_voxel``, RELION's ``pad 1``). Measured on ``benchmarks/fidelity.py`` (box 128, SNR 0.01, the same
grids, mean FSC vs truth inside the tight mask, no regulariser): voxel-wise 0.267, neighbourhood-averaged 0.274,
cryoDRGN's grid 0.274; box 64: 0.268, 0.273, cryoDRGN (regularised) 0.271 (README "Fidelity").

The average is a convolution of both grids with the 3-tap kernel ``[¼, ½, ¼]`` per axis of a pad-2 grid (its width
is half a box-frequency at any pad), done as what it is in real space: a multiplication of the back-projected grids
by the window ``cos²(π x / 2n)`` (``x`` in voxels from the origin, zero for ``|x| ≥ n``), which also drops what the
back-projection put outside the box. The map is divided by the same window after the division (:func:`unwindow`;
``≥ ½`` per axis inside the box). That correction is exact only for evenly sampled grids: a ratio of averages
blurs the map's transform where the weights vary, which costs accuracy where the signal is strong (noise-free, 1500
random views, box 48: FSC vs truth up to 0.8 Nyquist ≥ 0.947 voxel by voxel, 0.337 averaged). So the maps are
blended shell by shell (:func:`blend_by_shell`): the averaged map takes the fraction ``1 / (1 + SNR)`` of each
shell (the map's SNR from the half maps' FSC), the voxel-wise map the rest — noise-dominated shells come from the
averaged grids, well-measured ones from the exact division.
"""

from __future__ import annotations

import numpy as np
import scipy.fft
from numpy.typing import NDArray

__all__ = ["box_window", "apodise_grids", "unwindow", "blend_by_shell"]


def box_window(box: int, grid: int) -> NDArray[np.float32]:
    """The window ``cos²(π x / 2·box)`` (0 for ``|x| ≥ box``) at the ``grid`` points ``x`` of a periodic axis in FFT
    order (origin at index 0, ``x = −grid/2 .. grid/2 − 1``), shape ``(grid,)``."""
    x = np.fft.fftfreq(grid) * grid
    return np.where(np.abs(x) < box, np.cos(np.pi * x / (2 * box)) ** 2, 0.0).astype(np.float32)


def _window_3d(a: NDArray, window: NDArray[np.float32]) -> NDArray:
    """``a`` (P, P, P) times the separable ``window`` (P,) per axis, in place."""
    a *= window[:, None, None]
    a *= window[None, :, None]
    a *= window[None, None, :]
    return a


def apodise_grids(data: NDArray[np.complex64], weight: NDArray[np.float32], box: int, planes: list, workers: int = 1
                  ) -> tuple[NDArray[np.complex64], NDArray[np.float32]]:
    """``data`` (P, P, P//2+1, the half grid of ``Σ model · F``) and ``weight`` (same shape, ``Σ model²``) averaged
    over each voxel's neighbourhood (module docstring), in the same storage as the inputs (new arrays).

    ``planes`` is ``_hermitian_planes`` of the two grids: ``[(x, data_plane, weight_plane), ...]``, the true
    (Hermitian) values of the columns ``kx = 0`` (and ``P/2``) whose storage holds half of each point; the outputs
    hold half of them again, so the callers' ``D / W`` treats them as before."""
    grid = data.shape[0]
    window = box_window(box, grid)
    shape = (grid, grid, grid)
    out = []
    for grid_ft, index in ((data, 1), (weight, 2)):
        full = grid_ft.astype(np.complex64)
        for plane in planes:
            full[:, :, plane[0]] = plane[index]
        real = _window_3d(scipy.fft.irfftn(full, s=shape, workers=workers, overwrite_x=True), window)
        out.append(scipy.fft.rfftn(real, workers=workers, overwrite_x=True))
    smooth_data = out[0].astype(np.complex64, copy=False)
    smooth_weight = np.maximum(out[1].real, 0.0).astype(np.float32)
    for plane in planes:
        smooth_data[:, :, plane[0]] *= 0.5
        smooth_weight[:, :, plane[0]] *= 0.5
    return smooth_data, smooth_weight


def unwindow(vol: NDArray[np.float32], grid: int) -> NDArray[np.float32]:
    """Divide a ``box``³ map (origin at voxel ``box // 2``) cut from a ``grid``-point transform by the window of
    :func:`apodise_grids`, in place."""
    box = vol.shape[0]
    window = box_window(box, grid)[(np.arange(box) - box // 2) % grid]
    return _window_3d(vol, 1.0 / window)


def blend_by_shell(sharp: NDArray[np.float32], smooth: NDArray[np.float32], smooth_fraction: NDArray[np.float64]
                   ) -> NDArray[np.float32]:
    """``(1 − f) · sharp + f · smooth`` shell by shell of the ``box``³ maps' transforms, ``f = smooth_fraction``
    (``box // 2 + 1`` values, shell = rounded radius in voxels of the box's transform, as :func:`fsc.fsc_curve`;
    the corners beyond the last shell as the last shell)."""
    n = sharp.shape[0]
    k = np.fft.fftfreq(n) * n
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + np.arange(n // 2 + 1)[None, None, :] ** 2)
    fraction = np.asarray(smooth_fraction, dtype=np.float64)
    f = fraction[np.minimum(np.rint(radius).astype(np.int64), fraction.size - 1)]  # corners: as the last shell
    mixed = (1.0 - f) * scipy.fft.rfftn(sharp) + f * scipy.fft.rfftn(smooth)
    return scipy.fft.irfftn(mixed, s=sharp.shape).astype(np.float32)
