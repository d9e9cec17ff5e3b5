"""RELION 5 tomography projects in and out of a pyp project (what ``cspt2d import``/``export`` do with star files).

Import (:func:`import_relion5`): the picks star (``rlnTomoName`` + ``rlnCenteredCoordinate*Angst``, any number of
tomograms), the ``tomograms.star`` and the tilt-series stars it names. Every tomogram imported (one named, or all the
picks name) becomes one tilt series of the same pyp project, its whole tilt geometry taken from RELION's tilt-series
star (:func:`napari_cspt2d.io.star.read_relion5_tomograms`: ``rlnTomoYTilt``, ``rlnTomoZRot``, X/Y shifts, defocus,
pre-exposure -> dose and acquisition order), never from a ``.tlt``; the pixel is ``rlnTomoTiltSeriesPixelSize``, the
optics ``rlnVoltage``/``rlnSphericalAberration``/``rlnAmplitudeContrast``. The tilt stack of each tomogram holds its
tilt images in the tilt-series star's row order (stack section = star row). Positions are RELION's own projection of
the 3D coordinates.

The RELION tables as read are kept in the project, ``relion/{name}/`` (``tomograms.star`` with the tomogram's row,
``tilt_series/{name}.star``, ``particles.star`` with its picks), so that :func:`export_relion5` carries every column
this project does not use through unchanged: exporting an untouched import gives RELION's files back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CsptInputError, warn_input
from .io import mrc, star
from .model.params import PypParameters
from .model.tracks import TrackSet

__all__ = ["RELION_FOLDER", "relion5_parameters", "import_relion5", "export_relion5", "stack_for_template",
           "find_tomograms_star", "tilt_image_shape", "read_relion5_picks"]

#: Folder of a project that keeps the RELION tables a tilt series was imported from.
RELION_FOLDER = "relion"


def stack_for_template(template: str | os.PathLike[str], names: Sequence[str]) -> Callable[[str], Path]:
    """``name -> stack path`` from a path that may hold ``{name}`` (required when importing several tomograms)."""
    text = os.fspath(template)
    if len(names) > 1 and "{name}" not in text:
        raise CsptInputError(f"is {text!r} for {len(names)} tomograms ({', '.join(names)})", field="--stack",
                             expected="a path with {name} (replaced by each rlnTomoName), or --tomo NAME")
    return lambda name: Path(text.replace("{name}", name))


def relion5_parameters(series: star.Relion5TiltSeries, parameters: PypParameters,
                       keep: Sequence[str] = ()) -> PypParameters:
    """``parameters`` with RELION's pixel (``scope_pixel`` = ``rlnTomoTiltSeriesPixelSize / data_bin``), optics and
    dose per tilt (median step of ``rlnMicrographPreExposure``); keys in ``keep`` (set by the user) are left."""
    params = parameters.copy()
    row = series.global_row
    values: dict[str, Any] = {"scope_pixel": series.pixel_A / params["data_bin"]}
    for key, column in (("scope_voltage", "rlnVoltage"), ("scope_cs", "rlnSphericalAberration"),
                        ("scope_wgh", "rlnAmplitudeContrast")):
        if column in row:
            values[key] = float(row[column])
    if np.any(series.tilts.dose > 0):
        values["scope_dose_rate"] = float(np.median(series.tilts.dose))
    for key, value in values.items():
        if key not in keep:
            params[key] = value
    return params


def _stack_shape(stack: Path, series: star.Relion5TiltSeries) -> tuple[int, int]:
    """``(ny, nx)`` of ``stack``, checked to hold one section per row of the tilt-series star."""
    data, header_pixel = mrc.open_stack(stack)
    if data.shape[0] != len(series.tilts):
        raise CsptInputError(f"has {data.shape[0]} sections but the tilt-series star of {series.name} lists "
                             f"{len(series.tilts)} tilt images", file=stack, field="stack",
                             expected="the tilt images of the tilt-series star, one section per row, in its order")
    if header_pixel > 1.0 and abs(header_pixel - series.pixel_A) > 0.01 * series.pixel_A:
        warn_input(f"header pixel {header_pixel:g} Å differs from rlnTomoTiltSeriesPixelSize {series.pixel_A:g} Å "
                   "(the star's is used)", file=stack, field="pixel")
    return int(data.shape[1]), int(data.shape[2])


def import_relion5(
    particles_star: str | os.PathLike[str],
    tomograms_star: str | os.PathLike[str],
    out: str | os.PathLike[str],
    stack_for: Callable[[str], Path],
    parameters: PypParameters,
    *,
    tomograms: Sequence[str] | None = None,
    keep: Sequence[str] = (),
    relion_dir: str | os.PathLike[str] | None = None,
    link: bool = True,
) -> dict[str, tuple[TrackSet, dict[str, Path]]]:
    """Import the picks of ``tomograms`` (default: every tomogram ``particles_star`` names) into the pyp project
    ``out``, one tilt series each (module docstring). ``stack_for(name)`` gives each tomogram's tilt stack;
    ``parameters`` get RELION's pixel and optics (:func:`relion5_parameters`, except the keys in ``keep``).
    ``relion_dir``: the RELION project folder the tilt-series star paths are relative to (default: found above
    ``tomograms_star``). Returns, per tomogram, its tracks and the paths :func:`napari_cspt2d.pyp.create_project`
    wrote."""
    from .pyp import create_project

    table = star.read_relion5_particle_table(particles_star, tomograms)
    names = list(dict.fromkeys(table["rlnTomoName"].astype(str)))
    series = star.read_relion5_tomograms(tomograms_star, project_dir=relion_dir)
    unknown = [n for n in names if n not in series]
    if unknown:
        raise CsptInputError(f"names tomogram {unknown[0]!r}, which {Path(tomograms_star).name} does not list",
                             file=particles_star, field="rlnTomoName", expected=f"one of {sorted(series)}")
    shapes = {name: _stack_shape(stack_for(name), series[name]) for name in names}
    tracks = star.read_relion5_particles(particles_star, series, shapes, tomograms=names)
    root = Path(out)
    done = {}
    for name in names:
        params = relion5_parameters(series[name], parameters, keep)
        paths = create_project(root, name, stack_for(name), tracks[name], params, angles=tracks[name].tilts,
                               link=link)
        _keep_relion_tables(root / RELION_FOLDER / name, series[name],
                            table[table["rlnTomoName"].astype(str) == name])
        done[name] = (tracks[name], paths)
    return done


def _keep_relion_tables(folder: Path, series: star.Relion5TiltSeries, rows: Any) -> None:
    star.write_relion5_tomograms(folder / "tomograms.star", {series.name: series}, project_dir=folder)
    star.write_star_blocks(folder / "particles.star", {"particles": rows.reset_index(drop=True)})


def export_relion5(
    out: str | os.PathLike[str],
    tracks: Mapping[str, TrackSet],
    project: str | os.PathLike[str],
    parameters: PypParameters,
) -> list[Path]:
    """Write ``out/tomograms.star`` (+ ``tilt_series/{name}.star``) and ``out/particles.star`` for ``tracks`` (per
    tilt-series name). A tilt series imported from RELION (``relion/{name}/`` in ``project``) keeps every column
    of its RELION tables, the model's values replacing only the geometry it holds; others get new tables."""
    series, base = {}, {}
    for name, ts in tracks.items():
        kept = Path(project) / RELION_FOLDER / name
        if (kept / "tomograms.star").is_file():
            original = star.read_relion5_tomograms(kept / "tomograms.star", project_dir=kept)[name]
            series[name] = star.relion5_series_from_tracks(original, ts)
            base[name] = star.read_relion5_particle_table(kept / "particles.star", [name]) if len(ts) else None
        else:
            series[name] = star.relion5_series(name, ts, parameters.stack_pixel_A,
                                               voltage_kV=parameters["scope_voltage"], cs_mm=parameters["scope_cs"],
                                               amp_contrast=parameters["scope_wgh"])
    out = Path(out)
    written = star.write_relion5_tomograms(out / "tomograms.star", series)
    star.write_relion5_particles(out / "particles.star", tracks, series,
                                 base={k: v for k, v in base.items() if v is not None})
    return [*written, out / "particles.star"]


# ---------------------------------------------------------------------------------------------- File > Open
def find_tomograms_star(particles_star: str | os.PathLike[str]) -> Path | None:
    """The ``tomograms.star`` of a picks file: beside it, or in a folder above it, or in the latest
    ``Tomograms/job*/`` of a RELION project folder above it."""
    for folder in Path(particles_star).resolve().parents:
        if (folder / "tomograms.star").is_file():
            return folder / "tomograms.star"
        jobs = sorted(folder.glob("Tomograms/job*/tomograms.star"), key=lambda p: p.parent.name)
        if jobs:
            return jobs[-1]
    return None


def _relion_project_dir(tomograms_star: Path, series: star.Relion5TiltSeries) -> Path | None:
    relative = str(series.global_row.get("rlnTomoTiltSeriesStarFile", ""))
    return next((p for p in tomograms_star.resolve().parents if relative and (p / relative).is_file()), None)


def tilt_image_shape(tomograms_star: Path, series: star.Relion5TiltSeries) -> tuple[int, int] | None:
    """``(ny, nx)`` of a tilt series' images, from the header of its first ``rlnMicrographName`` (None when that
    image is not found)."""
    if "rlnMicrographName" not in series.table.columns:
        return None
    project = _relion_project_dir(tomograms_star, series)
    image = Path(str(series.table["rlnMicrographName"].iloc[0]))
    path = image if image.is_absolute() or project is None else project / image
    if not path.is_file():
        return None
    data, _ = mrc.open_stack(path)
    return int(data.shape[1]), int(data.shape[2])


def read_relion5_picks(particles_star: str | os.PathLike[str]) -> dict[str, tuple[TrackSet, float]]:
    """The tracks of every tomogram of a RELION 5 picks file whose tilt images are found (their size comes from
    the first micrograph's header), with the tilt-series pixel (Å): ``{name: (tracks, pixel_A)}``. Tomograms
    without images are left out with a warning; none at all raises."""
    particles_star = Path(particles_star)
    tomograms_star = find_tomograms_star(particles_star)
    if tomograms_star is None:
        raise CsptInputError("has no tomograms.star beside it or above it", file=particles_star, field="rlnTomoName",
                             expected="the RELION 5 project's Tomograms/job*/tomograms.star (or cspt2d import "
                                      "--tomograms)")
    names = list(dict.fromkeys(star.read_relion5_particle_table(particles_star)["rlnTomoName"].astype(str)))
    series = star.read_relion5_tomograms(tomograms_star)
    shapes = {n: tilt_image_shape(tomograms_star, series[n]) for n in names if n in series}
    found = [n for n in names if shapes.get(n) is not None]
    missing = [n for n in names if n not in found]
    if not found:
        raise CsptInputError(f"names tomograms whose tilt images are not found ({', '.join(missing)})",
                             file=particles_star, field="rlnMicrographName",
                             expected="the micrographs of the tilt-series stars (for their size), or cspt2d import "
                                      "with --stack")
    if missing:
        warn_input(f"tilt images of {', '.join(missing)} not found: left out", file=particles_star,
                   field="rlnMicrographName")
    tracks = star.read_relion5_particles(particles_star, series, {n: shapes[n] for n in found}, tomograms=found)
    return {n: (tracks[n], series[n].pixel_A) for n in found}
