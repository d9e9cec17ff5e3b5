"""``TiltSeries``: a lazily read (memory-mapped) tilt stack with its tilt table and pixel size.

Opening a stack reads only the MRC header; sections are paged in by the OS when they are looked at, so a 4 GB stack
opens in well under a second. Tilt angles come, in this order of preference, from what the caller passes (an array, a
:class:`TiltTable`, or a path to a ``.tlt``/``.rawtlt``/``.mdoc``/``{name}.pkl``), or from a file beside the stack with
the same stem (``.tlt``, ``.rawtlt``, ``.mdoc``, ``{name}.pkl`` where ``name`` is the stem without ``_stack``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import CsptInputError
from ..io import mrc
from .tracks import TiltTable

__all__ = ["TiltSeries", "read_angles", "find_angle_file"]

ANGLE_SUFFIXES = (".tlt", ".rawtlt", ".mdoc", ".pkl")


@dataclass(frozen=True, eq=False)
class TiltSeries:
    """A tilt stack ``data`` of shape ``(n_tilts, ny, nx)`` (memory map or array), ``pixel_A`` (Å per unbinned pixel)
    and ``tilts`` (one row per section, ids = section index)."""

    data: NDArray
    pixel_A: float
    tilts: TiltTable
    name: str = "tiltseries"
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise CsptInputError(f"has shape {self.data.shape}", file=self.path, field="stack",
                                 expected="(n_tilts, ny, nx)")
        if not (np.isfinite(self.pixel_A) and self.pixel_A > 0):
            raise CsptInputError(f"is {self.pixel_A}", file=self.path, field="pixel_A", expected="> 0 Å")
        if len(self.tilts) and int(self.tilts.id.max()) >= self.data.shape[0]:
            raise CsptInputError(
                f"has {self.data.shape[0]} sections but the tilt table refers to section {int(self.tilts.id.max())}",
                file=self.path, field="stack", expected="at least one section per tilt",
            )

    @classmethod
    def open(
        cls,
        stack_path: str | os.PathLike[str],
        angles: ArrayLike | TiltTable | str | os.PathLike[str] | None = None,
        *,
        pixel_A: float | None = None,
    ) -> TiltSeries:
        """Memory-map ``stack_path`` and attach tilt angles (see the module docstring for where they come from).

        ``pixel_A`` overrides the header's voxel size (needed when the header leaves it unset)."""
        path = Path(stack_path)
        data, header_pixel = mrc.open_stack(path)
        if angles is None:
            found = find_angle_file(path)
            if found is None:
                raise CsptInputError(
                    "has no tilt angles beside it", file=path, field="angles",
                    expected=f"one of {', '.join(path.stem + s for s in ANGLE_SUFFIXES)} or angles passed explicitly",
                )
            angles = found
        tilts = angles if isinstance(angles, TiltTable) else read_angles(angles, n_sections=data.shape[0])
        if len(tilts) > data.shape[0]:
            raise CsptInputError(f"has {data.shape[0]} sections for {len(tilts)} tilts", file=path, field="stack",
                                 expected="at least as many sections as tilts")
        pixel = float(pixel_A if pixel_A is not None else header_pixel)
        name = path.stem[: -len("_stack")] if path.stem.endswith("_stack") else path.stem
        return cls(data, pixel if pixel > 0 else 1.0, tilts, name, path)

    @property
    def shape_yx(self) -> tuple[int, int]:
        return int(self.data.shape[1]), int(self.data.shape[2])

    @property
    def n_tilts(self) -> int:
        return len(self.tilts)

    def section(self, tilt_id: int) -> NDArray[np.float32]:
        """One tilt image (ny, nx) as float32 (a copy)."""
        return np.asarray(self.data[int(tilt_id)], dtype=np.float32)

    def contrast_limits(self, sample: int = 256, percentiles: tuple[float, float] = (0.5, 99.5)) -> tuple[float, float]:
        """Robust display range from a strided subsample of a few sections (reads ≈ 3 × sample² values)."""
        n = self.data.shape[0]
        picks = sorted({0, n // 2, n - 1})
        ny, nx = self.shape_yx
        step_y, step_x = max(1, ny // sample), max(1, nx // sample)
        values = np.concatenate([np.asarray(self.data[i, ::step_y, ::step_x], np.float32).ravel() for i in picks])
        lo, hi = np.percentile(values[np.isfinite(values)], percentiles)
        return (float(lo), float(hi)) if hi > lo else (float(lo), float(lo) + 1.0)


def find_angle_file(stack_path: str | os.PathLike[str]) -> Path | None:
    """The first angle file beside a stack: ``{stem}.tlt``, ``{stem}.rawtlt``, ``{file}.mdoc``, ``{stem}.mdoc``,
    ``{name}.pkl`` (``name`` = stem without ``_stack``)."""
    path = Path(stack_path)
    stem = path.stem
    name = stem[: -len("_stack")] if stem.endswith("_stack") else stem
    candidates = [path.with_suffix(".tlt"), path.with_suffix(".rawtlt"), path.with_name(path.name + ".mdoc"),
                  path.with_suffix(".mdoc"), path.with_name(name + ".tlt"), path.with_name(name + ".pkl")]
    return next((c for c in candidates if c.is_file()), None)


def read_angles(source: ArrayLike | str | os.PathLike[str], *, n_sections: int | None = None) -> TiltTable:
    """A :class:`TiltTable` from an array of angles (degrees, one per section) or an angle file."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        suffix = path.suffix.lower()
        if suffix in (".tlt", ".rawtlt"):
            from ..io.imod import read_tlt

            tilts = TiltTable.from_angles(read_tlt(path))
        elif suffix == ".mdoc":
            from ..io.mdoc import read_mdoc

            tilts = read_mdoc(path)
        elif suffix == ".pkl":
            from ..io.metadata import read_metadata_tilts

            tilts = read_metadata_tilts(path)
        else:
            raise CsptInputError("is not a known angle file", file=path, expected=", ".join(ANGLE_SUFFIXES))
    else:
        angles = np.asarray(source, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(angles)):
            raise CsptInputError("contains NaN or infinite angles", field="angles", expected="finite degrees")
        tilts = TiltTable.from_angles(angles)
    file = source if isinstance(source, (str, os.PathLike)) else None
    if n_sections is not None and len(tilts) > n_sections:
        raise CsptInputError(f"lists {len(tilts)} tilts for a stack of {n_sections} sections", field="angles",
                             file=file, expected=f"at most {n_sections} tilts")
    if np.any(np.abs(tilts.angle_deg) > 90):
        raise CsptInputError("has angles beyond ±90°", field="angles", file=file, expected="tilt angles in degrees")
    return tilts
