"""pyp's ``pyp.inout.image.mrc.merge_fast``, streamed by :func:`napari_cspt2d.io.mrc.merge_images` (napari-cspt2d,
not nextPYP; see :mod:`napari_cspt2d.pyp_names`)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from napari_cspt2d.errors import CsptInputError
from napari_cspt2d.io.mrc import merge_images, open_stack

__all__ = ["merge_fast"]


def merge_fast(inputfiles: Sequence[str | os.PathLike[str]], outputfile: str | os.PathLike[str],
               remove: bool = False) -> Path:
    """Append the sections of ``inputfiles`` (MRC images or stacks of one image size), in order, into the stack
    ``outputfile`` (pixel size of the first file), written atomically; ``remove`` deletes the inputs afterwards."""
    stacks = [open_stack(path) for path in inputfiles]
    if not stacks:
        raise CsptInputError("is empty", field="inputfiles", expected="at least one MRC file")

    def sections() -> Iterator[np.ndarray]:
        for data, _ in stacks:
            yield from data

    out = merge_images(outputfile, sections(), sum(data.shape[0] for data, _ in stacks), stacks[0][1] or 1.0)
    if remove:
        for path in inputfiles:
            if Path(path).resolve() != out.resolve():
                os.unlink(path)
    return out
