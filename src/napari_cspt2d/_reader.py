"""npe2 readers (tilt stacks, track files) and the conversion of the model into napari layer data.

Layers are views of the model. Coordinates of every tracks layer are ``(tilt, y, x)``: ``tilt`` is the tilt id (the
0-based section of the stack), ``y, x`` the projection's position in unbinned pixels of the stack (numpy convention);
the layer scale ``(1, pixel_A, pixel_A)`` puts them in Å, on top of the image layer. Layers built here carry
``metadata["cspt2d"]`` (``role`` = ``"tiltseries"``, ``"tracks"`` or ``"trajectories"``, ``uid`` tying a tracks layer
to its trajectories, and for tracks the :class:`TrackSet` itself, so the curation widget can adopt them).

This module imports napari's data classes but no Qt.
"""

from __future__ import annotations

import os
import re
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from .errors import CsptInputError
from .io.mrc import release_pages
from .model.tiltseries import TiltSeries, find_angle_file
from .model.tracks import TiltTable, TrackSet

__all__ = [
    "STACK_SUFFIXES",
    "TRACK_SUFFIXES",
    "get_stack_reader",
    "get_tracks_reader",
    "read_stack",
    "read_tracks",
    "read_trackset",
    "find_image_shape",
    "tiltseries_layer_data",
    "series_layer_data",
    "tracks_layer_data",
    "trajectory_layer_data",
    "points_data",
    "points_features",
    "particle_colors",
    "binned_view",
    "release_pages",
    "follow_in_current_viewer",
]

LayerData = tuple[Any, dict[str, Any], str]

STACK_SUFFIXES = (".mrc", ".st", ".ali", ".mrcs")
TRACK_SUFFIXES = (".json", ".pkl", ".cistem", ".fid", ".mod")
AXIS_LABELS = ("tilt", "y", "x")
DEFAULT_RADIUS_PX = 20.0
_PALETTE_SIZE = 16
_PALETTE_STEP = 7  # coprime with the palette size: consecutive ids get hues 7/16 apart


# ---------------------------------------------------------------------- colours
def _palette() -> NDArray[np.float64]:
    from matplotlib.colors import hsv_to_rgb

    hues = np.arange(_PALETTE_SIZE) / _PALETTE_SIZE
    rgb = hsv_to_rgb(np.column_stack([hues, np.full(_PALETTE_SIZE, 0.8), np.ones(_PALETTE_SIZE)]))
    return np.column_stack([rgb, np.ones(_PALETTE_SIZE)])


def _palette_index(particle_ids: NDArray[np.int64]) -> NDArray[np.int64]:
    return (np.asarray(particle_ids, dtype=np.int64) * _PALETTE_STEP) % _PALETTE_SIZE


def particle_colors(particle_ids: NDArray[np.int64]) -> NDArray[np.float64]:
    """RGBA ``(N, 4)`` colour of each particle id: a palette of 16 hues, neighbouring ids far apart in hue."""
    return _palette()[_palette_index(particle_ids)]


def _palette_colormap():
    from napari.utils.colormaps import Colormap

    return Colormap(_palette(), name="cspt2d_particles", interpolation="zero")


# ---------------------------------------------------------------------- model -> layer data
def points_data(tracks: TrackSet, rows: NDArray[np.int64] | None = None) -> NDArray[np.float64]:
    """Points coordinates ``(N, 3)`` = ``(tilt id, y, x)`` of the projections (all, or ``rows``)."""
    if tracks.image_shape_yx is None:
        raise CsptInputError("is unknown", field="image_shape_yx", expected="the tilt images' (ny, nx)")
    if rows is None:
        xy = tracks.positions_px()
        tilt = tracks.tilt
    else:
        from . import geometry

        trow = np.searchsorted(tracks.tilts.id, tracks.tilt[rows])
        prow = np.searchsorted(tracks.particles.id, tracks.particle[rows])
        xy = geometry.positions_from_shifts(
            tracks.particles.xyz_px[prow], tracks.tilts.angle_deg[trow],
            tracks.tilts.axis_deg[trow], tracks.shift_px[rows], tracks.image_shape_yx,
        )
        tilt = tracks.tilt[rows]
    return np.column_stack([tilt.astype(np.float64), xy[:, 1], xy[:, 0]])


def points_features(tracks: TrackSet, residual_px: NDArray[np.float64] | None = None) -> pd.DataFrame:
    """Features of a tracks Points layer: particle, tilt, angle_deg, score, occupancy, residual_px (NaN if unknown)."""
    residual = np.full(len(tracks), np.nan) if residual_px is None else np.asarray(residual_px, np.float64)
    return pd.DataFrame({
        "particle": tracks.particle,
        "tilt": tracks.tilt,
        "angle_deg": tracks.tilts.angle_deg[tracks.tilt_rows()],
        "score": tracks.score,
        "occupancy": tracks.occupancy,
        "residual_px": residual,
    })


def tracks_layer_data(
    tracks: TrackSet,
    *,
    name: str = "tracks",
    pixel_A: float = 1.0,
    radius_px: float = DEFAULT_RADIUS_PX,
    residual_px: NDArray[np.float64] | None = None,
    source: str | None = None,
    uid: str | None = None,
    microscope: dict[str, float] | None = None,
) -> LayerData:
    """Points layer data for ``tracks``: one ring per projection, coloured per particle, diameter ``2 radius_px``.

    ``source`` names where the tracks came from (autosave key), ``microscope`` (voltage_kV, cs_mm, amp_contrast) is
    kept for writing ``.cistem`` files."""
    meta = {"cspt2d": {"role": "tracks", "tracks": tracks, "source": source, "pixel_A": float(pixel_A),
                       "radius_px": float(radius_px), "uid": uid or uuid.uuid4().hex, "microscope": microscope}}
    kwargs = {
        "name": name,
        "features": points_features(tracks, residual_px),
        "feature_defaults": {"particle": -1, "tilt": -1, "angle_deg": np.nan, "score": 0.0, "occupancy": 100.0,
                             "residual_px": np.nan},
        "size": 2.0 * float(radius_px),
        "face_color": "transparent",
        "border_color": particle_colors(tracks.particle) if len(tracks) else "white",  # napari refuses (0, 4)
        "border_width": 0.12,
        "border_width_is_relative": True,
        "scale": (1.0, float(pixel_A), float(pixel_A)),
        "axis_labels": AXIS_LABELS,
        "out_of_slice_display": False,
        "metadata": meta,
    }
    return points_data(tracks), kwargs, "points"


def trajectory_data(tracks: TrackSet) -> tuple[NDArray[np.float64], pd.DataFrame]:
    """Tracks-layer rows ``(particle, tilt, y, x)`` (sorted by particle, tilt as napari sorts them) and features."""
    ts = tracks.sorted()
    pos = points_data(ts)
    data = np.column_stack([ts.particle.astype(np.float64), pos])
    features = pd.DataFrame({"colour": (_palette_index(ts.particle) + 0.5) / _PALETTE_SIZE})
    return data, features


def trajectory_layer_data(tracks: TrackSet, *, name: str = "trajectories", pixel_A: float = 1.0,
                          uid: str | None = None) -> LayerData:
    """Tracks layer data drawing every particle's whole trajectory on every tilt (jumps stand out). napari cannot
    make an empty Tracks layer: without tracks it holds one hidden placeholder vertex."""
    data, features = trajectory_data(tracks)
    if not len(data):
        data, features = np.zeros((1, 4)), pd.DataFrame({"colour": [0.0]})
    n_tilts = max(int(tracks.n_tilts), 1)
    kwargs = {
        "visible": bool(len(tracks)),
        "name": name,
        "features": features,
        "color_by": "colour",
        "colormaps_dict": {"colour": _palette_colormap()},
        "tail_length": n_tilts,
        "head_length": n_tilts,
        "tail_width": 1.5,
        "opacity": 0.6,
        "blending": "translucent",
        "scale": (1.0, float(pixel_A), float(pixel_A)),
        "axis_labels": AXIS_LABELS,
        "metadata": {"cspt2d": {"role": "trajectories", "uid": uid}},
    }
    return data, kwargs, "tracks"


def series_layer_data(
    series: TiltSeries,
    tracks: TrackSet | None = None,
    *,
    bin_factor: int = 1,
    radius_px: float = DEFAULT_RADIUS_PX,
    source: str | None = None,
    microscope: dict[str, float] | None = None,
) -> list[LayerData]:
    """The image layer of a tilt series and, with ``tracks``, its trajectories and tracks layers (in that order)."""
    layers = [tiltseries_layer_data(series, bin_factor=bin_factor)]
    if tracks is not None:
        if tracks.image_shape_yx != series.shape_yx:
            raise CsptInputError(f"are for images of {tracks.image_shape_yx}, the stack has {series.shape_yx}",
                                 file=source, field="image_shape_yx", expected="the stack's (ny, nx)")
        if len(tracks.tilts) and int(tracks.tilts.id.max()) >= series.data.shape[0]:
            raise CsptInputError(f"refer to section {int(tracks.tilts.id.max())}, the stack has "
                                 f"{series.data.shape[0]}", file=source, field="tilts", expected="stack sections")
        uid = uuid.uuid4().hex
        layers += [
            trajectory_layer_data(tracks, name=f"{series.name} trajectories", pixel_A=series.pixel_A, uid=uid),
            tracks_layer_data(tracks, name=f"{series.name} tracks", pixel_A=series.pixel_A, radius_px=radius_px,
                              source=source, uid=uid, microscope=microscope),
        ]
    return layers


# ---------------------------------------------------------------------- tilt stacks
def binned_view(data: NDArray, bin_factor: int):
    """A lazy ``(n, ny // b, nx // b)`` float32 view of a stack, each section binned by block mean when displayed."""
    b = int(bin_factor)
    if b < 1:
        raise CsptInputError(f"is {bin_factor}", field="bin", expected="an integer >= 1")
    if b == 1:
        return data
    import dask.array as da

    n, ny, nx = data.shape
    if ny < b or nx < b:
        raise CsptInputError(f"{b} is larger than the image {ny}×{nx}", field="bin", expected="a smaller factor")
    lazy = da.from_array(data, chunks=(1, ny, nx), lock=False, asarray=False)[:, : ny // b * b, : nx // b * b]
    return lazy.map_blocks(_bin_block, b, chunks=(1, ny // b, nx // b), dtype=np.float32)


def _bin_block(block: NDArray, b: int) -> NDArray[np.float32]:
    n, ny, nx = block.shape
    out = np.asarray(block, dtype=np.float32).reshape(n, ny // b, b, nx // b, b).mean(axis=(2, 4), dtype=np.float32)
    release_pages(block)
    return out


def tiltseries_layer_data(series: TiltSeries, *, bin_factor: int = 1) -> LayerData:
    """Image layer data for a tilt series: the memory map itself (or a lazily binned view), scale = pixel size,
    axis labels ``('tilt', 'y', 'x')``, contrast from robust percentiles of a subsample."""
    b = int(bin_factor)
    lo, hi = series.contrast_limits()
    release_pages(series.data)  # the subsample's pages (with read-ahead, ~100 MB for a 4k stack)
    pixel = float(series.pixel_A)
    offset = (b - 1) / 2.0 * pixel  # a binned pixel's centre sits between the unbinned pixels it averages
    angles = np.full(series.data.shape[0], np.nan)
    angles[series.tilts.id] = series.tilts.angle_deg
    meta = {"cspt2d": {"role": "tiltseries", "name": series.name, "pixel_A": pixel, "bin": b,
                       "path": None if series.path is None else str(series.path),
                       "shape_yx": list(series.shape_yx), "tilt_angles_deg": angles.tolist(),
                       "tilts": series.tilts}}
    kwargs = {
        "name": series.name,
        "scale": (1.0, pixel * b, pixel * b),
        "translate": (0.0, offset, offset),
        "contrast_limits": (lo, hi),
        "colormap": "gray",
        "axis_labels": AXIS_LABELS,
        "multiscale": False,
        "metadata": meta,
    }
    return binned_view(series.data, b), kwargs, "image"


def follow_in_current_viewer() -> bool:
    """In a napari window (called on its GUI thread), have its viewer follow the tilt series it is given: the tilt
    angle shown on the canvas, a streamed sample filled in the background (``_qt/_viewer_watch.py``). False outside a
    napari window (nothing done; napari's Qt part is not even imported)."""
    if "napari._qt" not in sys.modules:
        return False
    from ._qt._viewer_watch import watch_current_viewer

    return watch_current_viewer()


def read_stack(path: str | os.PathLike[str], angles: Any = None, *, bin_factor: int = 1) -> list[LayerData]:
    """A tilt stack as an image layer; angles come from ``angles`` or a file beside the stack. A stack without
    angles opens too (sections are then shown without their tilt angle). In a napari window the tilt angle of the
    section shown is written on the canvas (:func:`follow_in_current_viewer`)."""
    path = Path(path)
    follow_in_current_viewer()
    if angles is None and find_angle_file(path) is None:
        from .io.mrc import open_stack

        data, pixel = open_stack(path)
        n = data.shape[0]
        stem = path.stem[: -len("_stack")] if path.stem.endswith("_stack") else path.stem
        series = TiltSeries(data, pixel if pixel > 0 else 1.0, TiltTable.from_angles(np.zeros(n)), stem, path)
        layer = tiltseries_layer_data(series, bin_factor=bin_factor)
        layer[1]["metadata"]["cspt2d"].update(tilt_angles_deg=[float("nan")] * n, tilts=None)
        return [layer]
    return [tiltseries_layer_data(TiltSeries.open(path, angles), bin_factor=bin_factor)]


def get_stack_reader(path: str | list[str]) -> Callable[[str], list[LayerData]] | None:
    """npe2 reader hook for ``.mrc/.st/.ali/.mrcs`` tilt stacks."""
    if isinstance(path, list) or not str(path).lower().endswith(STACK_SUFFIXES):
        return None
    return read_stack


# ---------------------------------------------------------------------- track files
_PYP_SUFFIX = re.compile(r"(_r\d+)?(_\d+)?(_extended)?$")


def _candidate_names(path: Path) -> list[str]:
    stem = path.name.split(".")[0]
    names = [stem, _PYP_SUFFIX.sub("", stem)]
    names += [n[: -len("_stack")] for n in list(names) if n.endswith("_stack")]
    return list(dict.fromkeys(n for n in names if n))


def _beside(path: Path) -> Iterator[tuple[Path, str]]:
    """``(folder, name)`` pairs where a track file's stack or metadata may be: its folder and up to two above (pyp
    keeps ``.cistem`` files in ``frealign/maps/``), for each candidate name."""
    for folder in dict.fromkeys([path.parent, path.parent.parent, path.parent.parent.parent]):
        for name in _candidate_names(path):
            yield folder, name


def _stack_beside(path: Path) -> Path | None:
    for folder, name in _beside(path):
        for suffix in ("_stack.mrc",) + STACK_SUFFIXES:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    return None


def _metadata_beside(path: Path) -> dict[str, Any] | None:
    from .io.metadata import read_metadata

    for folder, name in _beside(path):
        meta = folder / f"{name}.pkl"
        if meta.is_file() and meta != path:
            try:
                return read_metadata(meta) | {"__path__": meta}
            except CsptInputError:
                continue
    return None


def find_image_shape(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """``(ny, nx)`` of the tilt images a track file refers to, from a stack or ``{name}.pkl`` metadata found beside
    it or up to two folders above."""
    from .io.metadata import metadata_shape
    from .io.mrc import open_stack

    path = Path(path)
    stack = _stack_beside(path)
    if stack is not None:
        data, _ = open_stack(stack)
        return int(data.shape[1]), int(data.shape[2])
    meta = _metadata_beside(path)
    return None if meta is None else metadata_shape(meta)[:2]


def cistem_geometry_near(path: Path, image_shape_yx: tuple[int, int] | None,
                         metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """pyp's ``extract_bin`` and reconstruction size for a ``.cistem`` pair at ``path``
    (:func:`napari_cspt2d.io.pyp_parameters.cistem_geometry`), from the ``.pyp_config.toml`` of the project it is in
    (its folder or up to two above) and ``{name}.pkl``; defaults (1, pyp's) outside a project."""
    from .io.metadata import metadata_tomogram_px
    from .io.pyp_parameters import cistem_geometry
    from .io.toml import CONFIG_NAME, load_params

    config = next((f / CONFIG_NAME for f in dict.fromkeys([path.parent, path.parent.parent, path.parent.parent.parent])
                   if (f / CONFIG_NAME).is_file()), None)
    if config is None:
        return {}
    params = load_params(config, strict=False, allow_unknown=True)
    geometry = cistem_geometry(params, image_shape_yx)
    tomogram = None if metadata is None else metadata_tomogram_px(metadata, params["tomo_rec_binning"])
    return geometry if tomogram is None else {**geometry, "tomogram_px": tomogram}


def _tilts_beside(path: Path) -> TiltTable | None:
    from .model.tiltseries import read_angles

    found = find_angle_file(path)
    if found is None:
        stack = _stack_beside(path)
        found = None if stack is None else find_angle_file(stack)
    return None if found is None else read_angles(found)


def read_trackset(path: str | os.PathLike[str], image_shape_yx: tuple[int, int] | None = None) -> TrackSet:
    """Read a track file into a :class:`TrackSet` with ``image_shape_yx`` set (given, stored in the file or found
    beside it by :func:`find_image_shape`): seed track-data ``.json``/``.pkl``, a ``.cistem`` pair (either file of
    it), IMOD ``.fid``/``.mod`` (angles from a ``.tlt`` beside it)."""
    path = Path(path)
    if not path.is_file():
        raise CsptInputError("does not exist", file=path, expected="a track file")
    suffix = path.suffix.lower()
    if suffix not in TRACK_SUFFIXES:
        raise CsptInputError(f"has suffix {suffix!r}", file=path, expected=", ".join(TRACK_SUFFIXES))
    shape = None if image_shape_yx is None else tuple(int(v) for v in image_shape_yx)
    if suffix in (".fid", ".mod"):
        from .io.imod import read_fiducial_model

        tracks = read_fiducial_model(path, _tilts_beside(path), image_shape_yx=shape)
    elif suffix == ".cistem":
        from .io import cistem
        from .io.metadata import read_metadata_tilts

        main = path.with_name(path.name.replace("_extended.cistem", ".cistem"))
        meta = _metadata_beside(main)
        has_tilts = meta is not None and ("tlt" in meta or "cspt2d_tilts" in meta)
        tilt_table = read_metadata_tilts(meta["__path__"]) if has_tilts else None
        table, particles, tilts = cistem.read_pair(main)
        shape = shape or find_image_shape(main)
        tracks = cistem.tracks_from_tables(table, particles, tilts, path=main, image_shape_yx=shape,
                                           tilt_table=tilt_table, **cistem_geometry_near(main, shape, meta))
    else:
        from .io.trackdata import read_track_data

        tracks = read_track_data(path, shape)
    if tracks.image_shape_yx is None:
        found = find_image_shape(path)
        if found is None:
            raise _no_shape(path)
        tracks = tracks.replace(image_shape_yx=found)
    return tracks


def _no_shape(path: Path) -> CsptInputError:
    names = ", ".join(_candidate_names(path))
    return CsptInputError(
        "the tilt image size is unknown", file=path, field="image_shape_yx",
        expected=f"a tilt stack or {{name}}.pkl beside the file (name: {names}), or open the stack first and load "
                 "the tracks from the Tilt-series loader",
    )


def _pixel_beside(path: Path) -> float:
    from .io.mrc import read_voxel_size_A

    stack = _stack_beside(path)
    if stack is None:
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pixel = read_voxel_size_A(stack)
    return pixel if pixel > 0 else 1.0


def read_relion5_picks_layers(path: str | os.PathLike[str]) -> list[LayerData]:
    """A RELION 5 picks star: per tomogram whose tilt images are found, a Points layer and a Tracks layer
    (positions = RELION's projection of the picks; :func:`napari_cspt2d.relion.read_relion5_picks`)."""
    from .relion import read_relion5_picks

    layers = []
    for name, (tracks, pixel) in read_relion5_picks(path).items():
        uid = uuid.uuid4().hex
        layers += [trajectory_layer_data(tracks, name=f"{name} trajectories", pixel_A=pixel, uid=uid),
                   tracks_layer_data(tracks, name=f"{name} tracks", pixel_A=pixel, source=str(path), uid=uid)]
    return layers


def read_tracks(path: str | os.PathLike[str]) -> list[LayerData]:
    """A track file as a Points layer (one ring per projection) plus a Tracks layer of trajectories."""
    path = Path(path)
    if path.suffix.lower() == ".star":
        return read_relion5_picks_layers(path)
    tracks = read_trackset(path)
    pixel = _pixel_beside(path)
    name = path.stem
    uid = uuid.uuid4().hex
    return [
        trajectory_layer_data(tracks, name=f"{name} trajectories", pixel_A=pixel, uid=uid),
        tracks_layer_data(tracks, name=f"{name} tracks", pixel_A=pixel, source=str(path), uid=uid),
    ]


def _file_head(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(65536)
    except OSError:
        return b""


def _looks_like_track_data(path: Path) -> bool:
    """Whether a ``.json``/``.pkl`` file names the track-data keys near its start (a ``{name}.pkl`` metadata
    pickle or another JSON file does not), without parsing it."""
    head = _file_head(path)
    return any(key in head for key in (b"projections", b"particles"))


def _looks_like_relion5_picks(path: Path) -> bool:
    """Whether a ``.star`` file names RELION 5's picked-particle columns near its start."""
    head = _file_head(path)
    return b"_rlnTomoName" in head and b"_rlnCenteredCoordinateXAngst" in head


def get_tracks_reader(path: str | list[str]) -> Callable[[str], list[LayerData]] | None:
    """npe2 reader hook for track files (seed ``.json``/``.pkl``, ``.cistem``, IMOD ``.fid``/``.mod``, a RELION 5
    picks ``.star``)."""
    if isinstance(path, list):
        return None
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".star":
        return read_tracks if _looks_like_relion5_picks(p) else None
    if suffix not in TRACK_SUFFIXES or (suffix in (".json", ".pkl") and not _looks_like_track_data(p)):
        return None
    return read_tracks

