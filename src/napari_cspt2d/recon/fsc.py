"""Fourier shell correlation between two maps, resolution at a threshold, and the FSC table/plot written atomically.

Shells are one Fourier voxel wide: shell ``i`` holds the frequencies with ``round(|k|) = i`` (``|k|`` in voxels of the
box's transform), ``i = 0 .. n//2`` (Nyquist); its frequency is ``i / (n · voxel_A)`` 1/Å. The resolution at a
threshold is where the curve first falls below it (shells 1 onwards), linearly interpolated between the two shells
around the crossing; when it never falls below, it is the Nyquist resolution ``2 · voxel_A``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import scipy.fft
from numpy.typing import ArrayLike, NDArray

from ..errors import CsptInputError
from ..io.atomic import atomic_open, atomic_path

__all__ = ["FscCurve", "fsc_curve", "plot_fsc", "soft_sphere_mask", "write_fsc_table"]


@dataclass(frozen=True, eq=False)
class FscCurve:
    """FSC per shell: ``frequency_A_inv`` (S,), ``fsc`` (S,), ``n_voxels`` (S,) Fourier voxels per shell (full
    sphere), ``voxel_A`` and ``box``."""

    frequency_A_inv: NDArray[np.float64]
    fsc: NDArray[np.float64]
    n_voxels: NDArray[np.int64]
    voxel_A: float
    box: int

    def resolution_A(self, threshold: float = 0.143) -> float:
        """Resolution (Å) where the FSC first drops below ``threshold``."""
        f, c = self.frequency_A_inv, self.fsc
        below = np.flatnonzero(c[1:] < threshold) + 1
        if below.size == 0:
            return 1.0 / f[-1]
        i = int(below[0])
        if i == 1 or c[i - 1] == c[i]:
            return 1.0 / f[i]
        t = (c[i - 1] - threshold) / (c[i - 1] - c[i])
        return 1.0 / (f[i - 1] + t * (f[i] - f[i - 1]))


def _check_pair(map1: ArrayLike, map2: ArrayLike, mask: ArrayLike | None) -> tuple[NDArray, NDArray]:
    a = np.asarray(map1, dtype=np.float32)
    b = np.asarray(map2, dtype=np.float32)
    if a.ndim != 3 or len(set(a.shape)) != 1:
        raise CsptInputError(f"has shape {a.shape}", field="map1", expected="a cube (n, n, n)")
    if b.shape != a.shape:
        raise CsptInputError(f"has shape {b.shape}", field="map2", expected=f"{a.shape} like map1")
    if mask is not None:
        m = np.asarray(mask, dtype=np.float32)
        if m.shape != a.shape:
            raise CsptInputError(f"has shape {m.shape}", field="mask", expected=f"{a.shape} like the maps")
        a, b = a * m, b * m
    return a, b


def fsc_curve(map1: ArrayLike, map2: ArrayLike, voxel_A: float, *, mask: ArrayLike | None = None) -> FscCurve:
    """FSC between two cubes ``(n, n, n)`` of voxel size ``voxel_A`` Å, optionally after multiplying both by
    ``mask`` (n³, 0..1)."""
    if not (np.isfinite(voxel_A) and voxel_A > 0):
        raise CsptInputError(f"is {voxel_A}", field="voxel_A", expected="> 0 Å")
    a, b = _check_pair(map1, map2, mask)
    n = a.shape[0]
    fa = scipy.fft.rfftn(a, workers=2)
    fb = scipy.fft.rfftn(b, workers=2)
    k = np.fft.fftfreq(n) * n
    kx = np.fft.rfftfreq(n) * n
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    shell = np.rint(r).astype(np.int64)
    # rfft half space: planes kx = 0 and (even n) kx = n/2 are complete, the others stand for two voxels each
    mult = np.full(kx.size, 2.0)
    mult[0] = 1.0
    if n % 2 == 0:
        mult[-1] = 1.0
    mult = np.broadcast_to(mult[None, None, :], shell.shape)
    n_shells = n // 2 + 1
    keep = shell < n_shells
    s, w = shell[keep], mult[keep]
    cross = np.bincount(s, weights=w * (fa * np.conj(fb)).real[keep], minlength=n_shells)
    pa = np.bincount(s, weights=w * np.abs(fa[keep]) ** 2, minlength=n_shells)
    pb = np.bincount(s, weights=w * np.abs(fb[keep]) ** 2, minlength=n_shells)
    count = np.bincount(s, weights=w, minlength=n_shells).astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        fsc = np.where(pa * pb > 0, cross / np.sqrt(pa * pb), 0.0)
    freq = np.arange(n_shells) / (n * voxel_A)
    return FscCurve(freq, fsc, count, float(voxel_A), n)


def soft_sphere_mask(box: int, radius_px: float, edge_px: float = 4.0) -> NDArray[np.float32]:
    """Soft spherical mask ``(box, box, box)`` centred on voxel ``box // 2``: 1 within ``radius_px``, a raised-cosine
    edge to 0 at ``radius_px + edge_px`` (voxels); where that reaches the box edge it is cut there."""
    if not (isinstance(box, (int, np.integer)) and box >= 2):
        raise CsptInputError(f"is {box!r}", field="box", expected="an integer >= 2")
    if not (np.isfinite(radius_px) and radius_px > 0 and np.isfinite(edge_px) and edge_px > 0):
        raise CsptInputError(f"radius {radius_px}, edge {edge_px}", field="radius_px/edge_px", expected="> 0 voxels")
    r = np.arange(box) - box // 2
    dist = np.sqrt(r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2)
    t = np.clip((dist - radius_px) / edge_px, 0.0, 1.0)
    return (0.5 + 0.5 * np.cos(np.pi * t)).astype(np.float32)


def write_fsc_table(path: str | os.PathLike[str], curve: FscCurve) -> None:
    """Write ``shell,frequency_1_per_A,resolution_A,fsc,n_voxels`` as CSV (``#`` header lines give the resolutions at
    0.143 and 0.5), atomically."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(f"# FSC 0.143: {curve.resolution_A(0.143):.3f} A; FSC 0.5: {curve.resolution_A(0.5):.3f} A; "
                 f"voxel {curve.voxel_A:.4f} A; box {curve.box}\n")
        fh.write("shell,frequency_1_per_A,resolution_A,fsc,n_voxels\n")
        for i, (f, c, nv) in enumerate(zip(curve.frequency_A_inv, curve.fsc, curve.n_voxels)):
            res = "inf" if f == 0 else f"{1.0 / f:.4f}"
            fh.write(f"{i},{f:.6f},{res},{c:.6f},{nv}\n")


def plot_fsc(path: str | os.PathLike[str], curve: FscCurve, *, title: str = "Gold-standard FSC") -> None:
    """Plot the FSC with the 0.143 and 0.5 thresholds to a PNG, atomically (matplotlib, Agg backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(curve.frequency_A_inv, curve.fsc, color="C0", lw=1.5, label="FSC")
    for thr, style in ((0.143, "--"), (0.5, ":")):
        res = curve.resolution_A(thr)
        ax.axhline(thr, color="grey", ls=style, lw=1)
        ax.axvline(1.0 / res, color="C3" if thr < 0.2 else "C2", ls=style, lw=1, label=f"{thr}: {res:.1f} Å")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlim(0, curve.frequency_A_inv[-1])
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.13, top=0.91)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
