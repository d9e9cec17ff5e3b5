"""MRC files: memory-mapped tilt stacks, maps written atomically with the voxel size set, streamed stack merging."""

from __future__ import annotations

import mmap
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
from mrcfile.mrcinterpreter import MrcInterpreter
from numpy.typing import ArrayLike, NDArray

from ..errors import CsptInputError
from .atomic import atomic_path

__all__ = ["open_stack", "read_voxel_size_A", "write_map", "write_stack", "merge_images", "release_pages"]


def _check_header(path: Path) -> None:
    """Refuse a header whose extended-header size (``nsymbt``) runs past the end of the file.

    mrcfile allocates and zero-fills ``nsymbt`` bytes (up to 2 GB) before it notices the file is too short, so this
    reads the 1024-byte header first, the way mrcfile interprets it (byte order from the machine stamp)."""
    interpreter = MrcInterpreter(permissive=True)  # no stream given: reads nothing yet
    try:
        with warnings.catch_warnings(), open(path, "rb") as fh:
            warnings.simplefilter("ignore")
            interpreter._iostream = fh
            interpreter._read_header()
    except (ValueError, OSError) as exc:
        raise CsptInputError(f"cannot be read as MRC ({exc})", file=path, field="header") from exc
    extended = int(interpreter.header.nsymbt)
    if not 0 <= extended <= path.stat().st_size - 1024:
        raise CsptInputError(f"declares a {extended}-byte extended header in a {path.stat().st_size}-byte file",
                             file=path, field="nsymbt", expected="a size that fits in the file")


def open_stack(path: str | os.PathLike[str]) -> tuple[np.memmap, float]:
    """Memory-map an MRC stack read-only: ``(data (n_sections, ny, nx), pixel_A)``. Nothing is read but the header.

    A single image comes back with shape ``(1, ny, nx)``. ``pixel_A`` is 0 when the header does not set it (1.0 Å is
    the value many programs write for "unset"; it is reported as 1.0)."""
    path = Path(path)
    if not path.is_file():
        raise CsptInputError("does not exist", file=path, expected="an MRC stack")
    _check_header(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mrc = mrcfile.mmap(path, mode="r", permissive=True)
    except (ValueError, OSError, EOFError) as exc:
        raise CsptInputError(f"cannot be read as MRC ({exc})", file=path, field="header") from exc
    data = mrc.data
    if data is None:
        raise CsptInputError("holds no data or is truncated", file=path, field="data", expected="nx*ny*nz values")
    if data.ndim == 2:
        data = data[np.newaxis]
    if data.ndim != 3:
        raise CsptInputError(f"has {data.ndim} dimensions", file=path, field="data", expected="a 2D image or 3D stack")
    if 0 in data.shape:
        raise CsptInputError(f"has shape {data.shape}", file=path, field="data", expected="nx, ny, nz >= 1")
    if data.dtype.kind not in "iuf":
        raise CsptInputError(f"has mode {mrc.header.mode}", file=path, field="mode", expected="real-valued data")
    pixel_A = float(mrc.voxel_size.x)
    return data, pixel_A if np.isfinite(pixel_A) and pixel_A > 0 else 0.0


def read_voxel_size_A(path: str | os.PathLike[str]) -> float:
    """The x voxel size (Å) from an MRC header (0 when unset or invalid)."""
    return open_stack(path)[1]


def write_map(path: str | os.PathLike[str], volume: ArrayLike, voxel_A: float) -> Path:
    """Write a 3D map (z, y, x) as float32 MRC with the voxel size set, atomically."""
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim not in (2, 3) or not np.all(np.isfinite(vol)):
        raise CsptInputError("is not a finite 2D/3D array", file=path, field="volume")
    if not voxel_A > 0:
        raise CsptInputError(f"is {voxel_A}", file=path, field="voxel_A", expected="> 0")
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(vol)
            mrc.voxel_size = voxel_A
            if vol.ndim == 3 and vol.shape[0] > 1 and vol.shape[0] != vol.shape[1]:
                mrc.set_image_stack()
    return Path(path)


def write_stack(path: str | os.PathLike[str], stack: ArrayLike, pixel_A: float) -> Path:
    """Write an image stack (n, ny, nx) as float32 MRC (ispg 0, an image stack), atomically."""
    data = np.asarray(stack, dtype=np.float32)
    if data.ndim != 3:
        raise CsptInputError(f"has shape {data.shape}", file=path, field="stack", expected="(n, ny, nx)")
    return merge_images(path, iter(data), data.shape[0], pixel_A)


def merge_images(
    path: str | os.PathLike[str], images: Iterable[ArrayLike], n_images: int, pixel_A: float
) -> Path:
    """Stream ``n_images`` 2D images of one shape into an MRC stack ``path`` (pyp's ``{name}_stack.mrc``).

    Memory stays bounded by one image: the file is created at full size and filled section by section through a
    memory map. Written to a temporary name and renamed."""
    images = iter(images)
    try:
        first = np.asarray(next(images), dtype=np.float32)
    except StopIteration:
        raise CsptInputError("no images given", file=path, field="images", expected=f"{n_images} images") from None
    if first.ndim != 2:
        raise CsptInputError(f"has shape {first.shape}", file=path, field="images[0]", expected="a 2D image")
    with atomic_path(path) as tmp:
        with mrcfile.new_mmap(tmp, shape=(n_images,) + first.shape, mrc_mode=2, overwrite=True) as mrc:
            mrc.set_image_stack()
            mrc.voxel_size = pixel_A
            mrc.data[0] = first
            count = 1
            for image in images:
                if count >= n_images:
                    raise CsptInputError("more images than announced", file=path, field="images",
                                         expected=f"{n_images} images")
                img = np.asarray(image, dtype=np.float32)
                if img.shape != first.shape:
                    raise CsptInputError(f"image {count} has shape {img.shape}", file=path, field="images",
                                         expected=f"{first.shape} like the first")
                mrc.data[count] = img
                count += 1
            if count != n_images:
                raise CsptInputError(f"only {count} images", file=path, field="images", expected=f"{n_images}")
            mrc.update_header_stats()
    return Path(path)


def read_image(path: str | os.PathLike[str]) -> NDArray[np.float32]:
    """Read a whole (small) MRC file into memory as float32."""
    data, _ = open_stack(path)
    return np.array(data, dtype=np.float32)


def release_pages(array: Any) -> bool:
    """Drop the resident pages of the memory map behind ``array`` (they are re-read from the file if needed).

    Reading a section through a memory map leaves its pages mapped into the process (they count in its RSS) until
    the map is closed; releasing them keeps memory flat while the user scrolls through a large stack. Returns False
    when ``array`` is not backed by a memory map."""
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if base is None or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    base.madvise(mmap.MADV_DONTNEED)
    return True
