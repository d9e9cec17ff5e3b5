"""pyp's ``Parameters``: a ``.cistem`` parameter file with its ``_extended.cistem``, as pyp's scripts use it.

The binary layout and column meanings are :mod:`napari_cspt2d.io.cistem`'s; this class is the seed-facing view of
a pair (``data`` columns as the seed's checks read them) and its conversion to and from a :class:`TrackSet`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import CsptInputError
from ..model.settings import Settings
from ..model.tracks import TiltTable, TrackSet
from . import cistem
from .metadata import PYP_THICKNESS_PX, pyp_tomogram_px

__all__ = ["Parameters", "ExtendedParameters", "cistem_geometry"]


@dataclass(frozen=True, eq=False)
class ExtendedParameters:
    """The ``_extended.cistem`` tables: ``particles`` (PIND, 3D shifts Å, PPSI/PTHETA/PPHI °, 3D position px,
    PSCORE, POCC) and ``tilts`` (TIND, RIND, TSHIFT_X/Y, TILTANG °, TILTAXIS °)."""

    particles: cistem.CistemTable
    tilts: cistem.CistemTable


def cistem_geometry(parameters: Settings | Mapping[str, Any], image_shape_yx: tuple[int, int] | None
                    ) -> dict[str, Any]:
    """How pyp's box positions are written and read for ``parameters`` (:class:`Settings`, or pyp keys parsed by
    :meth:`Settings.parse`): ``extract_bin`` (it scales the sub-pixel shifts' Å) and ``tomogram_px``, the unbinned
    reconstruction pyp's 3D positions are absolute in (the image, the thickness ``tomo_rec_thickness`` (pyp's
    default 2048) and ``tomo_rec_binning``, as ``{name}.pkl`` records it)."""
    settings = Settings.parse(parameters)
    geometry: dict[str, Any] = {"extract_bin": settings.extraction.extract_bin}
    if image_shape_yx is not None:
        thickness_px = int(settings.pyp_value("tomo_rec_thickness", PYP_THICKNESS_PX))
        geometry["tomogram_px"] = pyp_tomogram_px(image_shape_yx, thickness_px, settings.data.tomo_rec_binning)
    return geometry


class Parameters:
    """A pyp ``.cistem`` parameter file with its ``_extended.cistem`` (pyp's ``Parameters`` look-alike).

    ``data`` is an ``(N, 7)`` float64 array, one row per projection, columns :data:`cistem.DATA_COLUMNS`:

    ====  ==========  =====================================================================================
    col   name        meaning
    ====  ==========  =====================================================================================
    0     pind        particle id (``PIND``)
    1     tind        tilt id = 0-based section of ``{name}_stack.mrc`` (``IMIND``; the seed's ``tind``)
    2     frame       frame index (``FIND``, 0 for tilt images)
    3, 4  shift x, y  track shift in tilt-stack pixels = ``X/Y_SHIFT`` (Å, as cisTEM stores them) / ``PIXEL_SIZE``
    5     score       ``SCORE``
    6     occupancy   ``OCCUPANCY``
    ====  ==========  =====================================================================================

    so the seed's checks (``par.data[:, 0]`` particles, ``[:, 1]`` tilts, ``[:, 3]``/``[:, 4]`` shifts in pixels)
    hold. It is read-only; every file column is available unconverted through :meth:`column` (e.g.
    ``column("TIND")`` is pyp's acquisition-order tilt index, ``column("X_SHIFT")`` is in Å)."""

    def __init__(self, main: cistem.CistemTable, extended: ExtendedParameters | None = None, *,
                 path: str | os.PathLike[str] | None = None, geometry: Mapping[str, Any] | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.geometry = dict(geometry or {})  # extract_bin, tomogram_px it was written with (when known)
        cistem.check_tables(main, None if extended is None else extended.particles,
                            None if extended is None else extended.tilts, self.path)
        self.main = main
        self.extended = extended
        data = cistem.projection_data(main)
        data.flags.writeable = False
        self._data = data

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_file(cls, path: str | os.PathLike[str], extended_path: str | os.PathLike[str] | None = None
                  ) -> Parameters:
        """Read ``path`` (``.cistem``) and, if present, its ``_extended.cistem`` (``extended_path``, default: beside
        it); a pair torn by an interrupted write is refused (:func:`napari_cspt2d.io.cistem.read_pair`)."""
        path = Path(path)
        ext = cistem.extended_path(path) if extended_path is None else Path(extended_path)
        if not ext.is_file():
            if extended_path is not None:
                raise CsptInputError("does not exist", file=ext, expected="the _extended.cistem file")
            return cls(cistem.read_cistem(path), None, path=path)
        main, particles, tilts = cistem.read_pair(path, ext)
        return cls(main, ExtendedParameters(particles, tilts), path=path)

    @classmethod
    def from_trackset(cls, tracks: TrackSet, parameters: Settings | Mapping[str, Any], *,
                      tilt_shift_px: ArrayLike | None = None) -> Parameters:
        """Parameter tables for ``tracks`` (pixel size, voltage, Cs, amplitude contrast, ``extract_bin`` and the
        reconstruction's size from ``parameters``: :class:`Settings`, or pyp keys parsed by :meth:`Settings.parse`;
        :func:`cistem_geometry`; ``tilt_shift_px`` (T, 2) the refined per-tilt shifts; column meanings in
        :mod:`napari_cspt2d.io.cistem`)."""
        settings = Settings.parse(parameters)
        optics = settings.data
        geometry = cistem_geometry(settings, tracks.image_shape_yx)
        main, particles, tilts = cistem.tables_from_tracks(
            tracks, pixel_A=settings.stack_pixel_A, voltage_kV=optics.scope_voltage, cs_mm=optics.scope_cs,
            amp_contrast=optics.scope_wgh, tilt_shift_px=tilt_shift_px, **geometry)
        return cls(main, ExtendedParameters(particles, tilts), geometry=geometry)

    # ---------------------------------------------------------------- access
    @property
    def data(self) -> NDArray[np.float64]:
        return self._data

    def __len__(self) -> int:
        return len(self.main)

    def column(self, name: str | int) -> NDArray[np.float64]:
        """A column of the ``.cistem`` file by name (``"X_SHIFT"``) or code, as float64, in file units."""
        return self.main[name].astype(np.float64)

    def get_num_tilts(self) -> int:
        """Number of tilts (distinct ``TIND`` of the tilts block, or of the projections without extended file)."""
        tind = self.extended.tilts["TIND"] if self.extended is not None else self.main["TIND"]
        return int(np.unique(tind).size)

    def get_num_frames(self) -> int:
        """Number of frames per projection: ``max(FIND) + 1`` (0 for an empty file)."""
        return int(self.main["FIND"].max()) + 1 if len(self) and "FIND" in self.main else (1 if len(self) else 0)

    def to_trackset(self, image_shape_yx: tuple[int, int] | None = None, *, tilts: TiltTable | None = None,
                    dose_per_tilt: float = 0.0, parameters: Settings | Mapping[str, Any] | None = None,
                    tomogram_px: Sequence[float] | None = None) -> TrackSet:
        """The projections as a :class:`TrackSet` (needs the extended file); see
        :func:`napari_cspt2d.io.cistem.tracks_from_tables` for how tilts are rebuilt when ``tilts`` is not given.
        pyp's ``extract_bin`` and the reconstruction's size (which its box positions need) come from ``parameters``
        (:func:`cistem_geometry`; ``tomogram_px`` overrides the size, e.g. from ``{name}.pkl``), else from the
        parameters this was written with, else 1 and pyp's defaults."""
        if self.extended is None:
            raise CsptInputError("has no _extended.cistem beside it", file=self.path, field="extended",
                                 expected="the particles and tilts of the tracks")
        geometry = dict(self.geometry)
        if parameters is not None and image_shape_yx is not None:
            geometry = cistem_geometry(parameters, image_shape_yx)
        if tomogram_px is not None:
            geometry["tomogram_px"] = tomogram_px
        return cistem.tracks_from_tables(self.main, self.extended.particles, self.extended.tilts, path=self.path,
                                         image_shape_yx=image_shape_yx, tilt_table=tilts, dose_per_tilt=dose_per_tilt,
                                         **geometry)

    def write(self, path: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``path`` (``.cistem``) and ``{stem}_extended.cistem``, each atomically, as a pair
        (:func:`napari_cspt2d.io.cistem.write_pair`); returns both paths."""
        if self.extended is None:
            raise CsptInputError("has no particles/tilts tables", file=path, field="extended",
                                 expected="Parameters with extended data")
        return cistem.write_pair(path, self.main, self.extended.particles, self.extended.tilts)

