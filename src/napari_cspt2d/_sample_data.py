"""npe2 sample data: the synthetic tilt series (40 particles × 41 tilts, 1k × 1k) with its picked tracks.

Making the sample takes seconds (every particle's projection is rendered analytically), so the first time a set of
sample arguments is used the stack and tracks are kept in the user cache folder
(``$XDG_CACHE_HOME/napari-cspt2d/samples/``, an ``.npy`` stack memory-mapped on the next opening and an ``.npz`` of
the track arrays, written atomically); the key is a hash of the arguments and of ``sample.py`` itself, so a changed
sample is never served stale. Later openings show the first image at once.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from . import sample as sample_module
from ._reader import series_layer_data
from .io.atomic import atomic_open
from .model.tiltseries import TiltSeries
from .model.tracks import ParticleTable, TiltTable, TrackSet
from .sample import make_sample

__all__ = ["SAMPLE_SOURCE", "make_sample_data", "sample_cache_folder"]

#: The autosave key of the sample's tracks (it has no file).
SAMPLE_SOURCE = "napari-cspt2d:sample"
_TRACK_FIELDS = ("particle", "tilt", "shift_px", "score", "occupancy")
_PARTICLE_FIELDS = ("id", "xyz_px", "euler_deg")
_TILT_FIELDS = ("id", "angle_deg", "defocus_um", "axis_deg", "dose", "order")


def sample_cache_folder() -> Path:
    """``$XDG_CACHE_HOME/napari-cspt2d/samples`` (default ``~/.cache/...``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "napari-cspt2d" / "samples"


def _cache_key(kwargs: dict[str, Any]) -> str:
    digest = hashlib.sha1(inspect.getsource(sample_module).encode())
    digest.update(json.dumps(kwargs, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _save(folder: Path, key: str, stack: np.ndarray, tracks: TrackSet, pixel_A: float, params: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {f"t_{f}": getattr(tracks, f) for f in _TRACK_FIELDS}
    arrays |= {f"p_{f}": getattr(tracks.particles, f) for f in _PARTICLE_FIELDS}
    arrays |= {f"a_{f}": getattr(tracks.tilts, f) for f in _TILT_FIELDS}
    arrays["shape_yx"] = np.asarray(tracks.image_shape_yx)
    arrays["pixel_A"] = np.asarray(pixel_A)
    arrays["params"] = np.asarray(json.dumps(params))
    with atomic_open(folder / f"{key}.npy") as fh:
        np.save(fh, np.ascontiguousarray(stack, dtype=np.float32))
    with atomic_open(folder / f"{key}.npz") as fh:  # last: its presence says the pair is complete
        np.savez(fh, **arrays)


def _load(folder: Path, key: str) -> tuple[np.ndarray, TrackSet, float, dict] | None:
    stack_path, tracks_path = folder / f"{key}.npy", folder / f"{key}.npz"
    if not (stack_path.is_file() and tracks_path.is_file()):
        return None
    try:
        with np.load(tracks_path, allow_pickle=False) as z:
            particles = ParticleTable(*(z[f"p_{f}"] for f in _PARTICLE_FIELDS))
            tilts = TiltTable(*(z[f"a_{f}"] for f in _TILT_FIELDS))
            tracks = TrackSet(*(z[f"t_{f}"] for f in _TRACK_FIELDS), particles, tilts,
                              tuple(int(v) for v in z["shape_yx"]))
            pixel_A, params = float(z["pixel_A"]), json.loads(str(z["params"]))
        stack = np.load(stack_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, KeyError):
        return None  # unreadable (interrupted, other numpy): made again
    return stack, tracks, pixel_A, params


def make_sample_data(*, cache: bool = True, **sample_kwargs: Any) -> list[tuple[Any, dict[str, Any], str]]:
    """Image, trajectories and tracks layers of :func:`napari_cspt2d.sample.make_sample` (keyword arguments are
    passed on; seconds the first time, then from the cache unless ``cache=False``). Point diameter = the sample's
    particle diameter; the tracks layer carries the sample's parameters (``metadata["cspt2d"]["params"]``)."""
    key, folder = _cache_key(sample_kwargs), sample_cache_folder()
    loaded = _load(folder, key) if cache else None
    if loaded is None:
        sample = make_sample(**sample_kwargs)
        stack, tracks, pixel_A, params = sample.stack, sample.tracks, sample.pixel_A, dict(sample.params)
        if cache:
            try:
                _save(folder, key, stack, tracks, pixel_A, params)
            except OSError:
                pass  # a read-only cache only costs the time to make it again
    else:
        stack, tracks, pixel_A, params = loaded
    series = TiltSeries(stack, pixel_A, tracks.tilts, str(params.get("data_set", "sample")))
    microscope = {"voltage_kV": params["scope_voltage"], "cs_mm": params["scope_cs"],
                  "amp_contrast": params["scope_wgh"]}
    layers = series_layer_data(series, tracks, radius_px=params["particle_rad"] / pixel_A,
                               source=SAMPLE_SOURCE, microscope=microscope)
    layers[-1][1]["metadata"]["cspt2d"]["params"] = params
    return layers
