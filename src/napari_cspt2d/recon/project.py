"""A pyp project on disk: its files, its tilt series, reading and writing their parameters, and the records that
say which files an interrupted run left half-written.

Layout (relative to the project folder, as :func:`napari_cspt2d.pyp.create_project` writes it and pyp reads it)::

    .pyp_config.toml                              parameters
    {name}.pkl  {name}_stack.mrc                  metadata and tilt stack of each tilt series
    frealign/maps/{name}_r01.cistem (+ _extended) input parameters (iteration 1); _r01_{i:02d} after iteration i
    frealign/maps/{data_set}_r01_{i:02d}.mrc      the map of iteration i (+ _half1/_half2.mrc, _fsc.csv, _fsc.png)
    frealign/scratch/                             per-particle split files, bundle results, run records
    log/                                          the run log and one log per bundle job

Tilt series
    A project holds one or more tilt series (:func:`tilt_series_names`), each with its own stack, tilt table,
    defocus and parameter files; particle ids are per series. All series are refined against, and reconstructed
    into, one map per iteration, named after the project's ``data_set`` (:meth:`ProjectPaths.map`; pyp's name for
    the merged map). An empty ``data_set`` means the tilt series' name for a one-series project and, as pyp does,
    the project folder's name for several (:func:`data_set_name`).

Split files
    :func:`split_regions` writes the seed's ``pyp.prepare_particle_cspt`` split (``csp_no_3d_points``: one region
    per particle, ``frealign/scratch/{stem}_region{k:04d}.cistem``).

Interrupted runs (a kill, a power cut)
    Every file is written atomically, and while an iteration's files are being written a marker says so
    (:func:`writing_marker`; for the initial map, its :func:`initial_map_record` reads :data:`PENDING`). An
    iteration is :func:`unfinished` when its marker is there, a parameter file is torn from its
    ``_extended.cistem`` (:func:`napari_cspt2d.io.cistem.read_pair`) or a map is missing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..errors import CsptInputError
from ..io.atomic import atomic_open
from ..io.cistem import read_pair
from ..io.metadata import metadata_shape, metadata_tomogram_px, read_metadata, read_metadata_tilts
from ..io.mrc import open_stack
from ..io.pyp_parameters import Parameters
from ..io.toml import CONFIG_NAME, load_params
from ..model.params import PypParameters, check_name
from ..model.settings import Settings
from ..model.tracks import TiltTable, TrackSet

__all__ = [
    "ProjectPaths", "Series", "PENDING", "tilt_series_names", "data_set_name", "load_project", "tracks_with_metadata",
    "parameter_files",
    "load_series", "read_tracks", "write_tracks", "particle_rows", "split_regions", "file_digest", "write_record",
    "initial_map_record", "writing_marker", "unfinished", "initial_map_needed", "initial_map_inputs",
]


# ==================================================================================================== paths
@dataclass(frozen=True)
class ProjectPaths:
    """The files of a project (module docstring) under ``root`` for data set ``data_set``."""

    root: Path
    data_set: str

    @property
    def maps(self) -> Path:
        return self.root / "frealign" / "maps"

    @property
    def scratch(self) -> Path:
        return self.root / "frealign" / "scratch"

    @property
    def logs(self) -> Path:
        return self.root / "log"

    def parameters(self, name: str, iteration: int) -> Path:
        """Parameter file of a tilt series after ``iteration`` (1 = the input ``{name}_r01.cistem``)."""
        suffix = "" if iteration == 1 else f"_{iteration:02d}"
        return self.maps / f"{name}_r01{suffix}.cistem"

    def map(self, iteration: int) -> Path:
        """The map of ``iteration``, of all tilt series together: ``{data_set}_r01_{iteration:02d}.mrc``."""
        return self.maps / f"{self.data_set}_r01_{iteration:02d}.mrc"

    def stack(self, name: str) -> Path:
        return self.root / f"{name}_stack.mrc"

    def metadata(self, name: str) -> Path:
        return self.root / f"{name}.pkl"

    def bundle(self, name: str, iteration: int, index: int) -> tuple[Path, Path]:
        """``(result .npz, log)`` of a bundle job."""
        stem = f"{name}_r01_{iteration:02d}_bundle{index:04d}"
        return self.scratch / f"{stem}.npz", self.logs / f"{stem}.log"

    @property
    def run_log(self) -> Path:
        return self.logs / f"{self.data_set}_csp.log"


def tilt_series_names(root: str | os.PathLike[str]) -> list[str]:
    """Tilt series of a project: every ``frealign/maps/{name}_r01.cistem`` (not an iteration's ``_r01_NN``) that has
    a ``{name}_stack.mrc`` beside the project's ``.pyp_config.toml``, sorted."""
    maps = Path(root) / "frealign" / "maps"
    names = []
    for path in sorted(maps.glob("*_r01.cistem")):
        name = path.name[: -len("_r01.cistem")]
        if (Path(root) / f"{name}_stack.mrc").exists():
            names.append(name)
    return names


def data_set_name(data_set: str, root: str | os.PathLike[str], names: Sequence[str]) -> str:
    """The name of a project's maps: ``data_set``, or when it is empty the tilt series' name (one series) or the
    project folder's name (several, as pyp names a data set), checked as a file-name part."""
    return check_name(data_set or (names[0] if len(names) == 1 else Path(root).resolve().name), "data_set")


def load_project(
    project_dir: str | os.PathLike[str], name: str, iteration: int = 1
) -> tuple[PypParameters, TrackSet, dict[str, Any]]:
    """Read a project written by :func:`napari_cspt2d.pyp.create_project` (or by pyp with the seed's plain metadata):
    parameters,
    tracks (image shape and tilt table from ``{name}.pkl``, dose per tilt = ``scope_dose_rate`` when the metadata
    has no tilt table) and the metadata dict. ``iteration`` 1 reads the input ``{name}_r01.cistem``, a later one
    that iteration's ``{name}_r01_{iteration:02d}.cistem``."""
    check_name(name, "name")
    paths = ProjectPaths(Path(project_dir), name)
    params = load_params(paths.root / CONFIG_NAME, strict=False)
    metadata = read_metadata(paths.metadata(name))
    settings = Settings.parse(params)
    par = Parameters.from_file(parameter_files(paths.root, name, settings.data.data_set).get(
        int(iteration), paths.parameters(name, int(iteration))))
    return params, tracks_with_metadata(par, paths.metadata(name), metadata, settings), metadata


def parameter_files(root: str | os.PathLike[str], name: str, data_set: str = "") -> dict[int, Path]:
    """The parameter files of tilt series ``name`` by iteration: this project's ``frealign/maps/{name}_r01.cistem``
    (1) and ``{name}_r01_NN.cistem``, and pyp's ``frealign/maps/{data_set}_r01_NN/{name}_r01.cistem`` (the
    parameters after iteration NN, which pyp's ``csp_extract_coordinates`` reads at iteration NN + 1;
    ``pyp/inout/metadata/core.py``) where this project has none."""
    maps = Path(root) / "frealign" / "maps"
    found = {1: maps / f"{name}_r01.cistem"} if (maps / f"{name}_r01.cistem").is_file() else {}
    for path in maps.glob(f"{name}_r01_[0-9][0-9].cistem"):
        found[int(path.stem[-2:])] = path
    prefix = f"{data_set}_r01_" if data_set else "*_r01_"
    for path in maps.glob(f"{prefix}[0-9][0-9]/{name}_r01.cistem"):
        found.setdefault(int(path.parent.name[-2:]), path)
    return dict(sorted(found.items()))


def tracks_with_metadata(par: Parameters, meta_path: Path, metadata: Mapping[str, Any],
                         settings: Settings) -> TrackSet:
    """``par`` as a TrackSet with the image shape and (when stored) tilt table of ``{name}.pkl`` (``meta_path``,
    read as ``metadata``); dose per tilt ``scope_dose_rate`` when the metadata has no tilt table."""
    ny, nx, _ = metadata_shape(metadata)
    dose = settings.data.scope_dose_rate
    has_tilts = "tlt" in metadata or "cspt2d_tilts" in metadata
    tilts = read_metadata_tilts(meta_path, dose_per_tilt=dose) if has_tilts else None
    return par.to_trackset((ny, nx), tilts=tilts, dose_per_tilt=dose, parameters=settings,
                           tomogram_px=metadata_tomogram_px(metadata, settings.data.tomo_rec_binning))


# ==================================================================================================== series
@dataclass(frozen=True, eq=False)
class Series:
    """One tilt series: its input tracks (tilt table and image shape from ``{name}.pkl``) and stack path."""

    name: str
    tracks: TrackSet
    stack: Path


def load_series(paths: ProjectPaths, name: str, settings: Settings) -> Series:
    """Tilt series ``name`` of the project (read with the run's ``settings``), its stack checked against its
    metadata (image shape, sections)."""
    check_name(name, "name")
    metadata = read_metadata(paths.metadata(name))
    tracks = tracks_with_metadata(Parameters.from_file(paths.parameters(name, 1)), paths.metadata(name), metadata,
                                  settings)
    stack = paths.stack(name)
    data, _ = open_stack(stack)
    if tuple(data.shape[1:]) != tuple(tracks.image_shape_yx):
        raise CsptInputError(f"has images of {tuple(data.shape[1:])} but {paths.metadata(name)} says "
                             f"{tracks.image_shape_yx}", file=stack, field="shape", expected="the same (ny, nx)")
    if len(tracks.tilts) and int(tracks.tilts.id.max()) >= data.shape[0]:
        raise CsptInputError(f"has {data.shape[0]} sections; tilt {int(tracks.tilts.id.max())} is used", file=stack,
                             field="sections", expected="one section per tilt id")
    return Series(name, tracks, stack)


def read_tracks(path: Path, image_shape_yx: tuple[int, int], tilts: TiltTable, settings: Settings) -> TrackSet:
    """An iteration's parameter file of a tilt series as a TrackSet with the series' tilt table."""
    return Parameters.from_file(path).to_trackset(image_shape_yx, tilts=tilts, parameters=settings)


def write_tracks(path: Path, tracks: TrackSet, settings: Settings) -> Path:
    """Write ``tracks`` as the parameter file pair ``path`` (+ ``_extended``); returns ``path``."""
    return Parameters.from_trackset(tracks, settings).write(path)[0]


# ==================================================================================================== split
def particle_rows(tracks: TrackSet) -> Callable[[Sequence[int] | NDArray[np.int64]], NDArray[np.int64]]:
    """``rows(wanted)``: the rows of the particles ``wanted`` in a (particle, tilt)-sorted TrackSet (ids without
    projections give none). The index is built once here, so a call costs what it returns, not the whole set."""
    ids, first = np.unique(tracks.particle, return_index=True)
    bounds = np.append(first, len(tracks))

    def rows(wanted: Sequence[int] | NDArray[np.int64]) -> NDArray[np.int64]:
        wanted = np.asarray(wanted, dtype=np.int64).reshape(-1)
        k = np.searchsorted(ids, wanted)
        k = k[(k < ids.size) & (ids[np.minimum(k, max(ids.size - 1, 0))] == wanted)] if ids.size else k[:0]
        return np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i in k]) if k.size else np.zeros(0, np.int64)

    return rows


def split_regions(tracks: TrackSet, regions: Sequence[Sequence[int]], parameter_file: str | os.PathLike[str],
                  settings: Settings, out_dir: str | os.PathLike[str], first_index: int = 0
                  ) -> list[tuple[Path, NDArray[np.int64], NDArray[np.int64]]]:
    """Write one parameter file per region (a list of particle ids), ``{out_dir}/{stem}_region{k:04d}.cistem``
    (+ ``_extended``) with ``stem`` = ``parameter_file``'s; returns pyp's ``split_parx_list``: ``(path, particle
    ids, tilt ids)`` per non-empty region, numbered in order from ``first_index`` (a bundle job writes the regions
    of its own particles, numbered as in the whole split)."""
    tracks = tracks.sorted()
    rows_of = particle_rows(tracks)
    out = []
    for region in regions:
        rows = rows_of(region)
        if rows.size == 0:
            continue
        sub = tracks.select(rows)
        k = first_index + len(out)
        path = write_tracks(Path(out_dir) / f"{Path(parameter_file).stem}_region{k:04d}.cistem", sub, settings)
        out.append((path, sub.particles.id.copy(), np.unique(sub.tilt)))
    return out


# ==================================================================================================== records
#: Content of a record or marker while the files it vouches for are being written (module docstring).
PENDING = "pending"


def file_digest(*paths: Path) -> str:
    """SHA-256 of the files' content, in order (what a record or a bundle's fingerprint holds of its inputs)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def write_record(path: Path, text: str) -> None:
    """Write a record or marker, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def initial_map_record(paths: ProjectPaths) -> Path:
    """The record of the inputs iteration 1's map was built from (:func:`initial_map_inputs`, or :data:`PENDING`)."""
    return paths.scratch / f"{paths.data_set}_r01_01.inputs"


def writing_marker(paths: ProjectPaths, iteration: int) -> Path:
    """The marker that is there while ``iteration``'s parameter files and map are being written."""
    return paths.scratch / f"{paths.data_set}_r01_{iteration:02d}.writing"


def unfinished(paths: ProjectPaths, names: Sequence[str], iteration: int) -> bool:
    """True when a run was interrupted while writing ``iteration``'s files (module docstring); an iteration that
    never ran is not unfinished."""
    pairs = [paths.parameters(n, iteration) for n in names]
    if writing_marker(paths, iteration).is_file():
        return True
    if not any(p.is_file() for p in pairs):
        return False
    try:
        for pair in pairs:
            read_pair(pair, strict=True)
    except CsptInputError:
        return True
    stem = paths.map(iteration).with_suffix("")
    return not all(m.is_file() for m in (paths.map(iteration), *(Path(f"{stem}_half{h}.mrc") for h in (1, 2))))


def initial_map_inputs(paths: ProjectPaths, series: Sequence[Series], settings: object) -> str:
    """What iteration 1's map is built from: the digest of every series' input parameters, and of the
    reconstruction ``settings`` (box, binning, pixel, symmetry, ...; anything with a deterministic ``repr``)."""
    settings_digest = hashlib.sha256(repr(settings).encode()).hexdigest()
    return f"{file_digest(*(paths.parameters(s.name, 1) for s in series))} {settings_digest}"


def initial_map_needed(paths: ProjectPaths, series: Sequence[Series], first: int, settings: object) -> bool:
    """True when iteration 1's map must be (re)built: it is missing, or we built it from input parameters or
    reconstruction settings (a changed box or binning) that have changed since (a map without our record of its
    inputs is the user's reference and is kept)."""
    if first > 2:
        return False
    if not paths.map(1).is_file():
        return True
    source = initial_map_record(paths)
    return source.is_file() and source.read_text() != initial_map_inputs(paths, series, settings)
