"""npe2 writers for a tracks Points layer: seed track-data JSON (or pickle) and the pyp ``.cistem`` pair.

A tracks layer is ``(tilt, y, x)`` points with a ``particle`` feature; its ``metadata["cspt2d"]["tracks"]`` (set by
the readers and kept current by the curation widget) supplies what a layer cannot hold: tilt angles, 3D points,
orientations and the image size. :func:`tracks_from_layer` turns a layer back into a :class:`TrackSet`, exactly
(the stored TrackSet itself) when the layer still shows it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from .errors import CsptInputError
from .model.tracks import ParticleTable, TrackSet

__all__ = ["tracks_from_layer", "save_tracks", "write_tracks_json", "write_tracks_cistem", "TRACK_SAVE_SUFFIXES"]

TRACK_SAVE_SUFFIXES = (".json", ".pkl", ".cistem")
MICROSCOPE_DEFAULTS = {"voltage_kV": 300.0, "cs_mm": 2.7, "amp_contrast": 0.07}


def tracks_from_layer(data: ArrayLike, features: Any, metadata: Mapping[str, Any] | None) -> TrackSet:
    """The :class:`TrackSet` a tracks Points layer shows: points ``(N, 3)`` = ``(tilt id, y, x)`` (unbinned px),
    ``features["particle"]`` the particle ids; scores and occupancies come from the features (defaults 0 and 100),
    tilts, 3D points and orientations from the TrackSet in ``metadata["cspt2d"]["tracks"]``."""
    from ._reader import points_data

    template = ((metadata or {}).get("cspt2d") or {}).get("tracks")
    if not isinstance(template, TrackSet):
        raise CsptInputError("has no napari-cspt2d tracks", field="metadata",
                             expected="a tracks layer opened or created by napari-cspt2d (it knows the tilt angles)")
    points = np.asarray(data, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or not np.all(np.isfinite(points)):
        raise CsptInputError(f"has shape {points.shape}", field="data", expected="finite (N, 3) (tilt, y, x) points")
    table = pd.DataFrame(features) if features is not None else pd.DataFrame()
    if "particle" not in table or len(table) != len(points):
        raise CsptInputError("lacks a particle id per point", field="features.particle",
                             expected=f"{len(points)} particle ids")
    particle = table["particle"].to_numpy()
    if not np.all(np.isfinite(particle.astype(np.float64))) or np.any(particle.astype(np.float64) < 0):
        bad = int(np.flatnonzero(~(particle.astype(np.float64) >= 0))[0])
        raise CsptInputError(f"point {bad} has particle id {particle[bad]!r}", field="features.particle",
                             expected="a particle id >= 0 for every point")
    particle = particle.astype(np.int64)
    if (len(points) == len(template) and np.array_equal(particle, template.particle)
            and np.array_equal(points, points_data(template))):
        return template
    tilt = np.round(points[:, 0]).astype(np.int64)
    ids = np.unique(particle)
    xyz, euler = np.zeros((ids.size, 3)), np.zeros((ids.size, 3))
    known = np.isin(ids, template.particles.id)  # keep their 3D points and orientations
    rows = np.searchsorted(template.particles.id, ids[known])
    xyz[known] = template.particles.xyz_px[rows]
    euler[known] = template.particles.euler_deg[rows]
    column = lambda name, default: (table[name].fillna(default).to_numpy(np.float64)  # noqa: E731
                                    if name in table else np.full(len(points), default))
    return TrackSet.from_positions(
        particle, tilt, points[:, [2, 1]], template.tilts, template.image_shape_yx,
        particles=ParticleTable(ids, xyz, euler), score=column("score", 0.0), occupancy=column("occupancy", 100.0),
    ).sorted()


def save_tracks(path: str | os.PathLike[str], tracks: TrackSet, *, pixel_A: float = 1.0,
                microscope: Mapping[str, float] | None = None) -> list[Path]:
    """Save tracks by suffix: ``.json``/``.pkl`` seed track data, or ``.cistem`` (+ ``_extended.cistem``, written
    with ``pixel_A`` = tilt-stack pixel in Å, ``microscope`` = voltage_kV, cs_mm, amp_contrast, and the
    ``extract_bin`` of the project the file goes into, if any). Returns the files written."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".cistem":
        from .io import cistem

        from ._reader import cistem_geometry_near

        scope = {**MICROSCOPE_DEFAULTS, **(microscope or {})}
        geometry = cistem_geometry_near(path, tracks.image_shape_yx)  # the project's extract_bin, when in one
        main, particles, tilts = cistem.tables_from_tracks(tracks, pixel_A=float(pixel_A), **scope, **geometry)
        return list(cistem.write_pair(path, main, particles, tilts))
    if suffix in (".json", ".pkl"):
        from .io.trackdata import write_track_data

        return [write_track_data(path, tracks)]
    raise CsptInputError(f"has suffix {path.suffix!r}", file=path, expected=", ".join(TRACK_SAVE_SUFFIXES))


def _layer_tracks(data: Any, attributes: Mapping[str, Any]) -> tuple[TrackSet, dict[str, Any]]:
    metadata = attributes.get("metadata") or {}
    return tracks_from_layer(data, attributes.get("features"), metadata), dict(metadata.get("cspt2d") or {})


def write_tracks_json(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 writer: a tracks Points layer as seed track-data JSON."""
    tracks, _ = _layer_tracks(data, attributes)
    return [str(p) for p in save_tracks(path, tracks)]


def write_tracks_cistem(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 writer: a tracks Points layer as the pyp ``.cistem`` pair (``{path}`` and ``..._extended.cistem``)."""
    tracks, meta = _layer_tracks(data, attributes)
    return [str(p) for p in save_tracks(path, tracks, pixel_A=meta.get("pixel_A", 1.0),
                                        microscope=meta.get("microscope"))]
