"""Particle extraction from a (memory-mapped) tilt stack, streamed in batches so memory stays bounded.

For each projection the box of ``extract_box`` unbinned pixels is cut at the projection's position
(``TrackSet.positions_px()``): the integer part by cropping (box centre ``N // 2`` at the nearest pixel), the
fraction by a Fourier phase shift, so the particle's position lands exactly on the centre pixel ``n // 2`` of the
output box. Binning by ``extract_bin`` is done in the same transform by Fourier cropping (frequencies beyond the new
Nyquist are dropped; the Nyquist row/column of an even output box is zeroed because a sub-pixel shift makes it
complex). Each box is then normalised to zero mean and unit standard deviation over the pixels outside a circle of
``particle_rad_A`` around the centre. Parts of a box outside the tilt image are filled with the mean of the part
inside, and the particle is flagged ``at_edge``.

The stack is read tilt by tilt; within a tilt, particles are taken in order of y in chunks of at most ``batch_size``
and only the rows of the image those boxes cover are read. Peak memory is one such slab plus a batch of boxes.
Contrast is left as in the stack (tilt images show protein dark; the CTF model accounts for it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.fft
from numpy.typing import ArrayLike, NDArray

from ..errors import CsptInputError
from ..model.tracks import TrackSet

__all__ = ["ParticleBatch", "extract_particles", "extracted_pixel_A", "check_extraction", "write_particle_stack"]

WORKERS = 2


@dataclass(frozen=True, eq=False)
class ParticleBatch:
    """Boxes of one batch: ``rows`` (B,) into the TrackSet, ``images`` (B, n, n) float32 with the particle at pixel
    ``n // 2``, ``at_edge`` (B,) True where the box reached beyond the tilt image."""

    rows: NDArray[np.int64]
    images: NDArray[np.float32]
    at_edge: NDArray[np.bool_]

    def __len__(self) -> int:
        return int(self.rows.size)


def extracted_pixel_A(pixel_A: float, extract_bin: int) -> float:
    """Pixel size (Å) of extracted particles: the stack's pixel size times ``extract_bin``."""
    return float(pixel_A) * int(extract_bin)


def check_extraction(extract_box: int, extract_bin: int, particle_rad_A: float, pixel_A: float) -> int:
    """Validate the extraction parameters; returns the output box size ``extract_box // extract_bin``."""
    if not (isinstance(extract_box, (int, np.integer)) and extract_box >= 8):
        raise CsptInputError(f"is {extract_box!r}", field="extract_box", expected="an integer >= 8 (unbinned px)")
    if not (isinstance(extract_bin, (int, np.integer)) and extract_bin >= 1):
        raise CsptInputError(f"is {extract_bin!r}", field="extract_bin", expected="an integer >= 1")
    if extract_box % extract_bin:
        raise CsptInputError(f"{extract_box} is not a multiple of extract_bin {extract_bin}", field="extract_box",
                             expected="extract_box divisible by extract_bin")
    if not (np.isfinite(pixel_A) and pixel_A > 0):
        raise CsptInputError(f"is {pixel_A}", field="pixel_A", expected="> 0 Å")
    n = extract_box // extract_bin
    rad_px = particle_rad_A / (pixel_A * extract_bin)
    if not (np.isfinite(particle_rad_A) and particle_rad_A > 0) or rad_px > 0.45 * n:
        raise CsptInputError(
            f"is {particle_rad_A} Å = {rad_px:.1f} px of a {n} px box", field="particle_rad",
            expected=f"> 0 and at most {0.45 * n * pixel_A * extract_bin:.0f} Å so that background remains",
        )
    return n


def _background_mask(n: int, radius_px: float) -> NDArray[np.bool_]:
    r = np.arange(n) - n // 2
    return (r[:, None] ** 2 + r[None, :] ** 2) > radius_px**2


def _centre_phase(n_in: int, n_out: int, frac_xy: NDArray[np.float64]) -> NDArray[np.complex64]:
    """Phase on the cropped ``rfft2`` grid (B, n_out, n_out//2+1) that moves box pixel ``n_in // 2 + frac`` of the
    input to pixel ``n_out // 2`` of the output; Nyquist row/column of an even ``n_out`` set to zero."""
    kx = np.arange(n_out // 2 + 1)
    ky = np.fft.ifftshift(np.arange(n_out) - n_out // 2)
    src = (n_in // 2 + frac_xy) / n_in  # (B, 2) as a fraction of the input period
    dst = (n_out // 2) / n_out
    px = np.exp(2j * np.pi * kx[None, :] * (src[:, :1] - dst))
    py = np.exp(2j * np.pi * ky[None, :] * (src[:, 1:] - dst))
    if n_out % 2 == 0:
        px[:, -1] = 0.0
        py[:, n_out // 2] = 0.0
    return (py[:, :, None] * px[:, None, :]).astype(np.complex64)


def _crop_spectrum(f: NDArray, n_out: int) -> NDArray:
    """Keep the frequencies of an ``n_out`` box from an ``rfft2`` (B, n, n//2+1)."""
    n = f.shape[1]
    if n_out == n:
        return f
    ky = np.fft.ifftshift(np.arange(n_out) - n_out // 2) % n
    return f[:, ky, : n_out // 2 + 1]


def _cut_boxes(slab: NDArray, y0_slab: int, corner_xy: NDArray[np.int64], n: int, nx: int, ny: int
               ) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Boxes (B, n, n) with top-left pixel ``corner_xy`` (x, y) from a slab holding image rows ``y0_slab...``;
    parts outside the image filled with the mean of the inside."""
    boxes = np.empty((corner_xy.shape[0], n, n), np.float32)
    edge = np.zeros(corner_xy.shape[0], bool)
    for i, (cx, cy) in enumerate(corner_xy):
        x0, y0 = max(cx, 0), max(cy, 0)
        x1, y1 = min(cx + n, nx), min(cy + n, ny)
        if x1 <= x0 or y1 <= y0:
            raise CsptInputError(f"a box at x={cx + n // 2}, y={cy + n // 2} lies outside the {nx}×{ny} image",
                                 field="projections.position", expected="positions inside the tilt image")
        inside = slab[y0 - y0_slab:y1 - y0_slab, x0:x1]
        if x0 == cx and y0 == cy and x1 == cx + n and y1 == cy + n:
            boxes[i] = inside
            continue
        edge[i] = True
        boxes[i] = inside.mean(dtype=np.float64)
        boxes[i, y0 - cy:y1 - cy, x0 - cx:x1 - cx] = inside
    return boxes, edge


def _shift_bin_normalise(boxes: NDArray[np.float32], frac: NDArray[np.float64], n_out: int,
                         background: NDArray[np.bool_]) -> NDArray[np.float32]:
    n_in = boxes.shape[1]
    f = scipy.fft.rfft2(boxes, workers=WORKERS)
    f = _crop_spectrum(f, n_out) * _centre_phase(n_in, n_out, frac)
    out = scipy.fft.irfft2(f, s=(n_out, n_out), workers=WORKERS).astype(np.float32)
    bg = out[:, background]
    mean = bg.mean(axis=1, dtype=np.float64)
    std = bg.std(axis=1, dtype=np.float64)
    std[std <= 0] = 1.0
    out -= mean[:, None, None].astype(np.float32)
    out /= std[:, None, None].astype(np.float32)
    return out


def extract_particles(
    stack: ArrayLike,
    tracks: TrackSet,
    *,
    extract_box: int,
    extract_bin: int = 1,
    particle_rad_A: float,
    pixel_A: float,
    rows: ArrayLike | None = None,
    batch_size: int = 256,
) -> Iterator[ParticleBatch]:
    """Yield :class:`ParticleBatch` es of at most ``batch_size`` particles boxed from ``stack`` (n_sections, ny, nx).

    ``tracks`` gives positions (its ``tilt`` ids are stack sections); ``rows`` selects projections (default all);
    ``extract_box`` is in unbinned pixels of ``pixel_A`` Å, ``particle_rad_A`` in Å. Batches follow the stack's
    sections; every selected row is yielded exactly once."""
    data = stack
    if getattr(data, "ndim", 0) != 3:
        raise CsptInputError(f"has shape {getattr(data, 'shape', None)}", field="stack", expected="(n_tilts, ny, nx)")
    n_out = check_extraction(extract_box, extract_bin, particle_rad_A, pixel_A)
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise CsptInputError(f"is {batch_size!r}", field="batch_size", expected="an integer >= 1")
    n_sections, ny, nx = data.shape
    if tracks.image_shape_yx is not None and tuple(tracks.image_shape_yx) != (ny, nx):
        raise CsptInputError(f"is {tracks.image_shape_yx} but the stack's images are {(ny, nx)}",
                             field="image_shape_yx", expected="the tilt stack's (ny, nx)")
    sel = np.arange(len(tracks)) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
    if sel.size and (sel.min() < 0 or sel.max() >= len(tracks)):
        raise CsptInputError("has indices out of range", field="rows", expected=f"0..{len(tracks) - 1}")
    if sel.size == 0:
        return
    tilt = tracks.tilt[sel]
    if tilt.min() < 0 or tilt.max() >= n_sections:
        raise CsptInputError(f"refers to section {int(tilt.max())} of a {n_sections}-section stack",
                             field="projections.tind", expected=f"0..{n_sections - 1}")
    shaped = tracks if tracks.image_shape_yx is not None else tracks.replace(image_shape_yx=(ny, nx))
    pos = shaped.positions_px()[sel]
    centre = np.rint(pos).astype(np.int64)
    frac = pos - centre
    corner = centre - extract_box // 2
    background = _background_mask(n_out, particle_rad_A / extracted_pixel_A(pixel_A, extract_bin))

    pending: list[ParticleBatch] = []
    n_pending = 0
    order = np.lexsort((pos[:, 1], tilt))
    for t in np.unique(tilt):
        in_tilt = order[tilt[order] == t]
        for start in range(0, in_tilt.size, batch_size):
            chunk = in_tilt[start:start + batch_size]
            ys = corner[chunk, 1]
            y0, y1 = max(int(ys.min()), 0), min(int(ys.max()) + extract_box, ny)
            slab = np.asarray(data[t, y0:max(y1, y0 + 1)], dtype=np.float32)
            boxes, edge = _cut_boxes(slab, y0, corner[chunk], extract_box, nx, ny)
            images = _shift_bin_normalise(boxes, frac[chunk], n_out, background)
            pending.append(ParticleBatch(sel[chunk], images, edge))
            n_pending += chunk.size
            while n_pending >= batch_size:
                batch, pending, n_pending = _take(pending, batch_size)
                yield batch
    while n_pending:
        batch, pending, n_pending = _take(pending, batch_size)
        yield batch


def _take(pending: list[ParticleBatch], size: int) -> tuple[ParticleBatch, list[ParticleBatch], int]:
    """The first ``size`` particles of the pending pieces as one batch, and what remains."""
    rows = np.concatenate([p.rows for p in pending])
    images = np.concatenate([p.images for p in pending]) if len(pending) > 1 else pending[0].images
    edge = np.concatenate([p.at_edge for p in pending])
    head = ParticleBatch(rows[:size], images[:size], edge[:size])
    rest = [ParticleBatch(rows[size:], images[size:], edge[size:])] if rows.size > size else []
    return head, rest, max(rows.size - size, 0)


def write_particle_stack(
    path: str | os.PathLike[str],
    stack: ArrayLike,
    tracks: TrackSet,
    *,
    extract_box: int,
    extract_bin: int = 1,
    particle_rad_A: float,
    pixel_A: float,
    invert: bool = False,
) -> NDArray[np.int64]:
    """Stream every projection's box into an MRC stack at ``path`` (atomically, memory bounded by one batch) and
    return the TrackSet row of each section ``(N,)`` (boxes come in stack order). ``invert`` writes protein white,
    as RELION extracts particles."""
    from ..io.mrc import merge_images

    order: list[int] = []

    def boxes() -> Iterator[NDArray[np.float32]]:
        for batch in extract_particles(stack, tracks, extract_box=extract_box, extract_bin=extract_bin,
                                       particle_rad_A=particle_rad_A, pixel_A=pixel_A):
            order.extend(batch.rows.tolist())
            yield from (-batch.images if invert else batch.images)

    merge_images(path, boxes(), len(tracks), extracted_pixel_A(pixel_A, extract_bin))
    return np.asarray(order, dtype=np.int64)
