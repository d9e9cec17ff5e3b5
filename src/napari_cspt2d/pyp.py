"""Seed-compatible façade: what nextPYP's 2D tilt-series CSPT workflow calls, on top of the napari-cspt2d core.

Sections: parameters (``.pyp_config.toml``), parameter files (``.cistem`` pairs: :class:`Parameters` from
:mod:`napari_cspt2d.io.pyp_parameters`, :func:`create_cistem_from_2d_tracks`), projects (:func:`create_project`;
:func:`load_project` from :mod:`napari_cspt2d.recon.project`); the refinement and reconstruction entry points follow
in their own sections. It sits on top of the core: nothing in model/, io/ or recon/ imports it.

Project layout (relative to the project folder, as pyp expects it)::

    .pyp_config.toml                      parameters
    {name}.pkl                            metadata (tomo size, frames, tilt table)
    {name}_stack.mrc                      tilt stack (symlink or copy)
    frealign/maps/{name}_r01.cistem       projections  } written by create_cistem_from_2d_tracks
    frealign/maps/{name}_r01_extended.cistem  particles and tilts }
    frealign/scratch/   log/
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .errors import CsptInputError, CsptRunError, warn_input
from .io import mrc
from .io.metadata import PYP_THICKNESS_PX, read_metadata, write_metadata
from .io.pyp_parameters import ExtendedParameters, Parameters
from .io.toml import CONFIG_NAME, load_params, save_params
from .model.params import PypParameters, as_parameters, check_name
from .model.settings import Settings
from .model.tracks import TiltTable, TrackSet
from .recon.project import ProjectPaths, load_project, split_regions, tracks_with_metadata
from .run_lock import one_run_per_project

__all__ = [
    "load_parameters", "save_parameters",
    "Parameters", "ExtendedParameters", "create_cistem_from_2d_tracks",
    "create_project", "load_project",
    "sort_particles_regions", "prepare_particle_cspt", "csp_split", "run_reconstruction",
]


def _as_tracks(track_data: TrackSet | Mapping[str, Any]) -> TrackSet:
    return track_data if isinstance(track_data, TrackSet) else TrackSet.from_track_data(track_data)


# ==================================================================================================== parameters
def load_parameters(path: str | os.PathLike[str] = ".", *, allow_unknown: bool = False) -> PypParameters:
    """Read ``.pyp_config.toml`` from a project folder (or the file itself); other pyp keys are kept, a key that
    looks like a typo of a known one raises :class:`CsptInputError` naming it unless ``allow_unknown``."""
    return load_params(path, strict=False, allow_unknown=allow_unknown)


def save_parameters(parameters: Mapping[str, Any], path: str | os.PathLike[str] = ".") -> Path:
    """Write ``parameters`` as ``.pyp_config.toml`` in a project folder (or to the given file), atomically."""
    return save_params(as_parameters(parameters, strict=False), path)


# ==================================================================================================== .cistem files
def create_cistem_from_2d_tracks(
    name: str,
    track_data: TrackSet | Mapping[str, Any],
    parameters: Mapping[str, Any],
    output_dir: str | os.PathLike[str] = "frealign/maps",
) -> tuple[str, str]:
    """Write ``{output_dir}/{name}_r01.cistem`` and ``{name}_r01_extended.cistem`` for the seed's ``track_data``
    dict (or a :class:`TrackSet`); ``parameters`` is a dict (other pyp keys allowed) or :class:`PypParameters`.
    ``output_dir`` is created when missing. Returns both paths as strings, like the seed."""
    check_name(name, "name")
    tracks = _as_tracks(track_data)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    target = Path(output_dir) / f"{name}_r01.cistem"
    main, ext = Parameters.from_trackset(tracks, parameters).write(target)
    return str(main), str(ext)


# ==================================================================================================== projects
def _tilts_with_angles(tracks: TrackSet, angles: TiltTable | ArrayLike) -> TiltTable:
    """A full tilt table from ``angles`` (a TiltTable, or one angle per stack section) that agrees with the tilts of
    ``tracks``; defocus, axis and dose of the tracks' tilts are kept when ``angles`` is a plain array."""
    if isinstance(angles, TiltTable):
        table = angles
    else:
        table = TiltTable.from_angles(np.asarray(angles, dtype=np.float64).reshape(-1))
        rows = np.searchsorted(table.id, tracks.tilts.id)
        if np.all(np.isin(tracks.tilts.id, table.id)):
            for attr in ("defocus_um", "axis_deg", "dose"):
                getattr(table, attr)[rows] = getattr(tracks.tilts, attr)
    used = np.unique(tracks.tilt)
    missing = np.setdiff1d(used, table.id)
    if missing.size:
        raise CsptInputError(f"have no angle for tilt(s) {missing[:5].tolist()}", field="angles",
                             expected="an angle for every tilt the tracks use")
    shared = np.intersect1d(tracks.tilts.id, table.id)
    a = table.angle_deg[np.searchsorted(table.id, shared)]
    b = tracks.tilts.angle_deg[np.searchsorted(tracks.tilts.id, shared)]
    if np.any(np.abs(a - b) > 0.01):
        bad = int(shared[np.argmax(np.abs(a - b))])
        raise CsptInputError(f"disagree with track_data for tilt {bad}", field="angles",
                             expected="the same angles (within 0.01°) as track_data's tilts")
    return table


def _place_stack(source: str | os.PathLike[str] | ArrayLike, target: Path, pixel_A: float, link: bool
                 ) -> tuple[int, int, int]:
    """Put the tilt stack at ``target`` (symlink, or a section-by-section copy); returns ``(n, ny, nx)``."""
    if isinstance(source, (str, os.PathLike)):
        source = Path(source)
        data, header_pixel = mrc.open_stack(source)
        if header_pixel > 1.0 and abs(header_pixel - pixel_A) > 0.01 * pixel_A:
            warn_input(f"header pixel {header_pixel:g} Å differs from scope_pixel x data_bin = {pixel_A:g} Å",
                       file=source, field="pixel")
        if target.exists() and target.resolve() == source.resolve():
            return tuple(data.shape)  # type: ignore[return-value]
        if link:
            tmp = target.with_name(f".{target.name}.{os.getpid()}.link")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.symlink(source.resolve(), tmp)
            os.replace(tmp, target)
            return tuple(data.shape)  # type: ignore[return-value]
    else:
        data = np.asarray(source)
        if data.ndim != 3 or data.dtype.kind not in "iuf":
            raise CsptInputError(f"has shape {data.shape} and dtype {data.dtype}", field="stack",
                                 expected="a real (n_tilts, ny, nx) array")
    mrc.merge_images(target, (data[i] for i in range(data.shape[0])), data.shape[0], pixel_A)
    return tuple(int(v) for v in data.shape)  # type: ignore[return-value]


def create_project(
    project_dir: str | os.PathLike[str],
    name: str,
    stack: str | os.PathLike[str] | ArrayLike,
    track_data: TrackSet | Mapping[str, Any],
    parameters: Mapping[str, Any],
    angles: TiltTable | ArrayLike | None = None,
    *,
    frames: list[Any] | None = None,
    link: bool = True,
) -> dict[str, Path]:
    """Create a pyp project for 2D tilt-series CSPT (layout in the module docstring).

    ``stack`` is an MRC path (symlinked, or copied section by section when ``link`` is False) or an
    ``(n_tilts, ny, nx)`` array (written section by section). ``parameters`` are validated strictly (typos raise);
    an empty ``data_set`` becomes ``name``. ``angles`` (a :class:`TiltTable`, or one angle per stack section)
    records every section's tilt in ``{name}.pkl``, including tilts without picks. Returns the paths written
    (keys ``project``, ``config``, ``metadata``, ``stack``, ``cistem``, ``extended``)."""
    check_name(name, "name")
    params = as_parameters(parameters, strict=True).copy()
    if not params["data_set"]:
        params["data_set"] = name
    check_name(params["data_set"], "data_set")
    tracks = _as_tracks(track_data)
    if angles is not None:
        tracks = tracks.replace(tilts=_tilts_with_angles(tracks, angles))
    root = Path(project_dir)
    for folder in ("frealign/maps", "frealign/scratch", "log"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    stack_path = root / f"{name}_stack.mrc"
    n_sections, ny, nx = _place_stack(stack, stack_path, params.stack_pixel_A, link)
    if len(tracks.tilts) and int(tracks.tilts.id.max()) >= n_sections:
        raise CsptInputError(f"has {n_sections} sections but the tilts go up to section {int(tracks.tilts.id.max())}",
                             file=stack_path, field="stack", expected="one section per tilt id (0-based)")
    if tracks.image_shape_yx not in (None, (ny, nx)):
        raise CsptInputError(f"are for images of {tracks.image_shape_yx}, the stack has {(ny, nx)}",
                             field="track_data", expected="tracks picked on this stack")
    tracks = tracks.replace(image_shape_yx=(ny, nx))
    config = save_params(params, root / CONFIG_NAME)
    metadata = write_metadata(root / f"{name}.pkl", nx, ny, n_sections, frames, tilts=tracks.tilts,
                              thickness_px=int(params.get("tomo_rec_thickness", PYP_THICKNESS_PX)),
                              rec_binning=float(params["tomo_rec_binning"]))
    main, ext = create_cistem_from_2d_tracks(name, tracks, params, root / "frealign" / "maps")
    return {"project": root, "config": config, "metadata": metadata, "stack": stack_path, "cistem": Path(main),
            "extended": Path(ext)}


# ==================================================================================================== pipeline
def sort_particles_regions(
    particle_coordinates: Any, corners_squares: Any = None, squaresize: Any = None, per_particle: bool = False
) -> list[list[int]]:
    """pyp's ``sort_particles_regions``: particle ids grouped by region.

    ``particle_coordinates`` rows are ``[pind, x, y, z, ...]`` (or bare ids with ``per_particle``). With
    ``per_particle`` (the ``csp_no_3d_points`` route) every particle is its own region, ``[[pind1], [pind2], ...]``
    in input order; ``corners_squares``/``squaresize`` and the coordinates are ignored. Otherwise a particle goes to
    the first square (corner ``[x, y, z]``, size ``squaresize``, bounds inclusive) that contains it, one extra last
    region collects particles outside every square, and regions are sorted by size (smallest first), as pyp does."""
    rows = [r if isinstance(r, (list, tuple, np.ndarray)) else [r] for r in particle_coordinates]
    try:
        ids = [int(float(r[0])) for r in rows]
    except (TypeError, ValueError, IndexError) as exc:
        raise CsptInputError(f"has a row without a particle id ({exc})", field="particle_coordinates",
                             expected="rows [pind, x, y, z] or particle ids") from None
    if per_particle:
        return [[i] for i in ids]
    if corners_squares is None or squaresize is None:
        raise CsptInputError("are missing", field="corners_squares/squaresize",
                             expected="square corners and size unless per_particle=True")
    size = np.asarray(squaresize, dtype=np.float64).reshape(3)
    regions: list[list[int]] = [[] for _ in range(len(corners_squares) + 1)]
    for pid, row in zip(ids, rows, strict=True):
        try:
            xyz = np.asarray([float(v) for v in row[1:4]])
        except (TypeError, ValueError) as exc:
            raise CsptInputError(f"has a bad row for particle {pid} ({exc})", field="particle_coordinates",
                                 expected="rows [pind, x, y, z]") from None
        if xyz.size != 3:
            raise CsptInputError(f"has no x, y, z for particle {pid}", field="particle_coordinates",
                                 expected="rows [pind, x, y, z] (or per_particle=True)")
        inside = [k for k, c in enumerate(corners_squares)
                  if np.all(xyz >= np.asarray(c, dtype=np.float64)) and np.all(xyz <= np.asarray(c) + size)]
        regions[inside[0] if inside else -1].append(pid)
    return sorted(regions, key=len)


def _project_root(project_dir: str | os.PathLike[str] | None) -> Path:
    return Path.cwd() if project_dir is None else Path(project_dir)


def prepare_particle_cspt(
    name: str,
    parameter_file: str | os.PathLike[str],
    alignment_parameters: Parameters,
    parameters: Mapping[str, Any],
    grids: Sequence[int] = (1, 1, 1),
    use_frames: bool = False,
    *,
    project_dir: str | os.PathLike[str] | None = None,
) -> list[tuple[str, NDArray[np.int64], NDArray[np.int64]]]:
    """The seed's ``prepare_particle_cspt`` for ``csp_no_3d_points``: no specimen bounds, no spatial regions (``grids``
    is accepted and ignored), one region per particle (:func:`sort_particles_regions` with ``per_particle=True``);
    writes ``frealign/scratch/{stem}_region{k:04d}.cistem`` (+ ``_extended``) with ``stem`` = ``parameter_file``'s and
    returns pyp's ``split_parx_list``: ``(path, [pind], tilt ids)`` per region.

    Paths are relative to ``project_dir`` (default: the current folder, as in the seed's scripts). Raises
    "Metadata is required" when ``{name}.pkl`` is missing or incomplete and "No output parameter file is generated"
    when the parameters are not in 2D tilt-series CSPT mode (``csp_no_3d_points``, "tomo", ``csp_frame_refinement``)."""
    check_name(name, "name")
    root = _project_root(project_dir)
    settings = Settings.parse(parameters)
    metadata = read_metadata(root / f"{name}.pkl")
    settings.check_cspt_mode()
    if not isinstance(alignment_parameters, Parameters):
        raise CsptInputError(f"is a {type(alignment_parameters).__name__}", field="alignment_parameters",
                             expected="Parameters.from_file(parameter_file)")
    tracks = tracks_with_metadata(alignment_parameters, root / f"{name}.pkl", metadata, settings)
    regions = sort_particles_regions(np.unique(tracks.particle), per_particle=True)
    split = split_regions(tracks, regions, parameter_file, settings, root / "frealign" / "scratch")
    return [(str(path), ids, tilt_ids) for path, ids, tilt_ids in split]


def csp_split(
    parameters: Mapping[str, Any],
    iteration: int = 2,
    *,
    project_dir: str | os.PathLike[str] | None = None,
    client: Any = None,
    serial: bool = False,
    workers: int | None = None,
    tilt_unit: str = "auto",
    progress: Any = None,
    cancel: Any = None,
) -> dict[str, Any]:
    """The seed's Option A: the whole CSPT of the project (every tilt series of ``data_set``) from ``iteration`` to
    ``refine_maxiter``: split per particle, bundle by ``slurm_bundle_size``, refine on dask (a LocalCluster unless
    the cluster parameters say otherwise, or ``client``; ``serial`` runs in this process), merge, reconstruct,
    iterate (:func:`napari_cspt2d.recon.pipeline.run_cspt`; ``tilt_unit`` says how to read
    ``csp_UseImagesForRefinementMin/Max``: "auto", "degrees" or "order"). Works in the current folder (the seed's
    scripts) or ``project_dir``. Returns the output paths: ``map``, ``half_maps``, ``fsc_table``, ``fsc_plot``,
    ``parameters``, ``log``, and ``iterations`` (per-iteration resolution and parameter changes), ``converged``,
    ``timings``."""
    from .recon.pipeline import run_cspt

    run = run_cspt(Settings.parse(parameters), project_dir=project_dir, first_iteration=iteration, client=client,
                   serial=serial, workers=workers, tilt_unit=tilt_unit, progress=progress, cancel=cancel)
    return run.outputs()


@one_run_per_project("reconstruction")
def run_reconstruction(
    name: str,
    mp: Mapping[str, Any],
    merged_recon_dir: str | os.PathLike[str] = "merged_recon",
    output_folder: str | os.PathLike[str] = "../output",
    save_stacks: bool = False,
    ref: int = 1,
    iteration: int = 2,
    *,
    project_dir: str | os.PathLike[str] | None = None,
    progress: Any = None,
    cancel: Any = None,
) -> dict[str, Any]:
    """The seed's Option B reconstruction of tilt series ``name`` at ``iteration``; returns the paths written
    (``map``, ``half_maps``, ``fsc_table``, ``fsc_plot``, ``parameters``, ``log``, ``particles``) and the half maps'
    ``resolution_A`` at FSC 0.143 and ``resolution_05_A`` at 0.5.

    Reads the iteration's parameters ``frealign/maps/{name}_r01_{iteration:02d}.cistem`` when a refinement wrote
    them, else the previous iteration's, else the input ``{name}_r01.cistem`` (via :meth:`Parameters.from_file`),
    and the stack; writes ``frealign/maps/{name}_r01_{iteration:02d}.mrc`` (voxel size set) with ``_half1.mrc``,
    ``_half2.mrc``, ``_fsc.csv``, ``_fsc.png`` beside it, the iteration's ``.cistem`` pair (when it came from an
    earlier iteration), and ``log/{name}_r01_{iteration:02d}_reconstruct.log``. ``save_stacks`` keeps the extracted
    particles as ``frealign/scratch/{name}_r01_{iteration:02d}_particles.mrcs`` (+ ``.rows.txt``, each section's
    projection row). Tilts outside ``reconstruct_mintilt``/``maxtilt`` are left out. ``merged_recon_dir`` and
    ``output_folder`` are pyp's cluster staging folders and have no use here; ``ref`` is the class (``r01``), only
    1 exists in this mode. Raises "Metadata is required" (missing/incomplete ``{name}.pkl``) and "No output
    parameter file is generated: <reason>" (wrong mode, or nothing to reconstruct); another run working on the
    project raises :class:`~napari_cspt2d.run_lock.ProjectBusyError`."""
    from .io.atomic import atomic_open
    from .recon.extract import write_particle_stack
    from .recon.arguments import reconstruction_options
    from .recon.reconstruct import reconstruct_tracks

    check_name(name, "name")
    if int(ref) != 1:
        raise CsptInputError(f"is {ref}", field="ref", expected="1 (2D tilt-series CSPT has one class)")
    root = _project_root(project_dir)
    settings = Settings.parse(mp)
    meta_path = root / f"{name}.pkl"
    metadata = read_metadata(meta_path)
    settings.check_cspt_mode()
    paths = ProjectPaths(root, name)
    candidates = [paths.parameters(name, it) for it in range(int(iteration), 0, -1)]
    source = next((p for p in candidates if p.is_file()), candidates[-1])
    tracks = tracks_with_metadata(Parameters.from_file(source), meta_path, metadata, settings)
    stack, _ = mrc.open_stack(paths.stack(name))
    stem = f"{name}_r01_{int(iteration):02d}"
    log_path = paths.logs / f"{stem}_reconstruct.log"
    opts = reconstruction_options(settings)
    try:
        result = reconstruct_tracks(stack, tracks, **opts, progress=progress, cancel=cancel)
    except CsptInputError as exc:
        raise CsptRunError(f"No output parameter file is generated: {exc}", log_path=log_path) from exc
    outputs = {"map": paths.maps / f"{stem}.mrc"}
    written = result.write(outputs["map"])
    outputs.update(half_maps=written[1:3], fsc_table=written[3], fsc_plot=written[4])
    parameters_out = paths.parameters(name, int(iteration))
    if source != parameters_out:
        Parameters.from_trackset(tracks, settings).write(parameters_out)
    outputs["parameters"] = parameters_out
    if save_stacks:
        particles = paths.scratch / f"{stem}_particles.mrcs"
        order = write_particle_stack(particles, stack, tracks, extract_box=opts["extract_box"],
                                     extract_bin=opts["extract_bin"], particle_rad_A=opts["particle_rad_A"],
                                     pixel_A=opts["pixel_A"])
        with atomic_open(particles.with_suffix(".rows.txt"), "w") as fh:
            fh.write("\n".join(str(r) for r in order.tolist()) + "\n")
        outputs["particles"] = particles
    with atomic_open(log_path, "w", encoding="utf-8") as fh:
        fh.write(f"reconstruction of {name}, iteration {iteration}, from {source}\n")
        for key, value in result.stats.items():
            fh.write(f"{key}: {value}\n")
        fh.write(f"resolution (FSC 0.143): {result.resolution_A:.2f} A; (FSC 0.5): {result.resolution_05_A:.2f} A\n")
    outputs["log"] = log_path
    outputs.update(resolution_A=result.resolution_A, resolution_05_A=result.resolution_05_A)
    return outputs
