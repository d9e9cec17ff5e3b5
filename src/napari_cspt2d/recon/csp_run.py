"""How a CSPT run (:mod:`napari_cspt2d.recon.pipeline`) applies pyp's constrained modes and the fitted heights.

At the start (:func:`prepare`), per tilt series:

* constrained modes (:attr:`CspModes.constrained`): the picks' particles get their points fitted from their tracks
  (:func:`constrained.start_constrained`); a resumed run continues from its last file's per-tilt geometry (tilt
  angles and axes of its tilts block, as the file is read, and ``TSHIFT_X/Y``);
* free mode with ``fitted_heights_ctf`` and tracks without 3D points: the trustworthy fitted points
  (:mod:`napari_cspt2d.recon.heights`), so that every projection's CTF has its own defocus.

Each iteration the bundle jobs only *measure* (refine, no insertion) in constrained modes; after the merge
:func:`place` solves the per-tilt geometry and the particles' points from every bundle's measurements and places
the projections, and the map is inserted from the placed projections by insertion jobs. Nothing here runs in a job:
the jobs get the per-tilt geometry and points in their TrackSet.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import replace

import numpy as np
from numpy.typing import NDArray

from ..io import cistem
from ..io.pyp_parameters import Parameters
from ..model.settings import Settings
from ..model.tracks import TrackSet
from .arguments import csp_modes
from .constrained import CspState, constrained_round, start_constrained
from .heights import fit_heights, has_heights, with_fitted_heights
from .jobs import pair_key
from .refine import RefineOptions

__all__ = ["prepare", "fitted_points", "place", "tilt_shifts"]


def prepare(picks: MutableMapping[str, TrackSet], current: MutableMapping[str, TrackSet], settings: Settings,
            resumed_from: Mapping[str, str | os.PathLike[str]]) -> dict[str, CspState]:
    """Put the fitted points into ``picks`` and ``current`` (per tilt series, in place; every projection keeps its
    position) and return the constrained state of each series (empty in free mode). ``resumed_from``: the
    parameter file each resumed series' ``current`` was read from (the other series start from their picks)."""
    modes = csp_modes(settings)
    states: dict[str, CspState] = {}
    for name, tracks in picks.items():
        if modes.constrained:
            picks[name], states[name] = start_constrained(tracks)
            if name in resumed_from:
                states[name] = _resumed(current[name], states[name], resumed_from[name], settings.stack_pixel_A)
            else:
                current[name] = picks[name]
        elif settings.refinement.fitted_heights_ctf and not has_heights(tracks):
            fit = fit_heights(tracks, pixel_A=settings.stack_pixel_A,
                              max_error_A=settings.refinement.fitted_heights_max_error_A)
            picks[name] = with_fitted_heights(tracks, fit)
            if name not in resumed_from:
                current[name] = picks[name]
    return states


def fitted_points(settings: Settings) -> tuple[str, float]:
    """Which 3D points :func:`prepare` fits into tracks without them: ``("constrained", 0)`` every particle's,
    ``("heights", max_error_A)`` the trustworthy ones, ``("none", 0)`` none."""
    if csp_modes(settings).constrained:
        return "constrained", 0.0
    if settings.refinement.fitted_heights_ctf:
        return "heights", float(settings.refinement.fitted_heights_max_error_A)
    return "none", 0.0


def _resumed(tracks: TrackSet, state: CspState, path: str | os.PathLike[str], pixel_A: float) -> CspState:
    """The state of a series resumed from its parameter file ``path``: the file's tilt angles and axes (``tracks``
    was read with them, :func:`napari_cspt2d.io.cistem.tracks_from_tables`) and its ``TSHIFT_X/Y``."""
    tilts = Parameters.from_file(path).extended.tilts
    return replace(state, geometry=replace(state.geometry, angle_deg=tracks.tilts.angle_deg.copy(),
                                           axis_deg=tracks.tilts.axis_deg.copy(),
                                           shift_px=cistem.tilt_shifts_px(tilts, tracks.tilts.order, pixel_A)))


def place(merged: TrackSet, state: CspState, picks: TrackSet, options: RefineOptions, settings: Settings
          ) -> tuple[TrackSet, CspState]:
    """The merged measurements of one tilt series placed by the constrained model (:func:`constrained_round`):
    the picks anchor the particles; the measurements with occupancy > 0 count. The particles' points are fitted to
    the tilts in the refinement range only; with ``csp_refine_micrographs`` the tilts outside it were measured too
    (:attr:`RefineOptions.measure_all_tilts`) and their geometry is fitted to those measurements, as pyp's
    micrograph refinement runs on every exposure (:mod:`~napari_cspt2d.recon.constrained`)."""
    picks_px = picks.positions_px()[_rows_of(picks, merged)]
    in_range = options.tilts.mask(merged.tilts)[merged.tilt_rows()]
    measured = in_range | options.measure_all_tilts
    placed, state, _ = constrained_round(merged, state, csp_modes(settings), pixel_A=settings.stack_pixel_A,
                                         picks_px=picks_px, use=measured & (merged.occupancy > 0),
                                         point_use=in_range)
    return placed, state


def tilt_shifts(states: Mapping[str, CspState], name: str) -> NDArray[np.float64] | None:
    """The per-tilt shifts (T, 2) of series ``name`` for ``TSHIFT_X/Y`` (None in free mode)."""
    return states[name].geometry.shift_px if name in states else None


def _rows_of(picks: TrackSet, tracks: TrackSet) -> NDArray[np.int64]:
    """Row in ``picks`` of every projection of ``tracks`` (same particles and tilts)."""
    keys = pair_key(picks.particle, picks.tilt)
    order = np.argsort(keys)
    return order[np.searchsorted(keys[order], pair_key(tracks.particle, tracks.tilt))]
