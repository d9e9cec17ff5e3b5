"""The ``cspt2d`` command: the same core as the napari plugin, headless.

Exit codes: 0 success, 2 bad input (the message names file and field), 3 a processing step failed (the message gives
its log), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import CsptCancelled, CsptInputError, CsptInputWarning, CsptRunError

EXIT_OK, EXIT_INPUT, EXIT_RUN, EXIT_INTERRUPTED = 0, 2, 3, 130

Configure = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[str, Configure, Run]] = {}


def register(name: str, help_text: str, configure: Configure, run: Run) -> None:
    """Add a subcommand: ``configure(parser)`` declares its arguments, ``run(args)`` returns an exit code."""
    _COMMANDS[name] = (help_text, configure, run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cspt2d", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, configure, run) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure(p)
        p.set_defaults(_run=run)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


@contextlib.contextmanager
def _notes_as_lines(command: str) -> Iterator[None]:
    """Show napari-cspt2d's input warnings as one ``cspt2d COMMAND: note: ...`` line each on stderr (not as Python
    warnings with a source line); other warnings are shown as usual."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if issubclass(category, CsptInputWarning):
                print(f"cspt2d {command}: note: {message}", file=sys.stderr)
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cspt2d`` console script."""
    args = build_parser().parse_args(argv)
    try:
        with _notes_as_lines(args.command):
            return int(args._run(args) or EXIT_OK)
    except CsptInputError as exc:
        print(f"cspt2d {args.command}: bad input: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except CsptRunError as exc:
        print(f"cspt2d {args.command}: failed: {exc}", file=sys.stderr)
        return EXIT_RUN
    except (KeyboardInterrupt, CsptCancelled):
        print(f"cspt2d {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def print_outputs(outputs: dict) -> None:
    """One ``label: path`` line per output, labels right-aligned."""
    width = max((len(str(k)) for k in outputs), default=0)
    for label, value in outputs.items():
        print(f"{label:>{width}}: {value}")


def progress_printer(description: str):
    """A ``progress(stage, done, total)`` callback that draws a rich progress bar on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   transient=False)
    task = bar.add_task(description, total=None)

    def update(stage: str, done: int, total: int) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(task, description=f"{description}: {stage}", completed=done, total=total)
        if done >= total:
            bar.refresh()

    update.stop = bar.stop  # type: ignore[attr-defined]
    return update


# ---------------------------------------------------------------------------------------------------- sample
def _configure_sample(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="project folder to create")
    p.add_argument("--name", default="sample", help="tilt-series name (default: sample)")
    p.add_argument("--particles", type=int, default=40)
    p.add_argument("--tilts", type=int, default=41)
    p.add_argument("--snr", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)


def _run_sample(args: argparse.Namespace) -> int:
    from .sample import make_sample, write_sample

    sample = make_sample(n_particles=args.particles, n_tilts=args.tilts, snr=args.snr, seed=args.seed)
    print_outputs(write_sample(sample, args.out, name=args.name))
    return EXIT_OK


register("sample", "write the synthetic sample tilt series as a pyp project folder (with its ground truth)",
         _configure_sample, _run_sample)


# ---------------------------------------------------------------------------------------------------- fsc
def _configure_fsc(p: argparse.ArgumentParser) -> None:
    p.add_argument("map1", type=Path)
    p.add_argument("map2", type=Path)
    p.add_argument("--out", type=Path, help="write the FSC table (.txt) and plot (.png) with this stem")


def _run_fsc(args: argparse.Namespace) -> int:
    from .io.mrc import open_stack
    from .recon import fsc

    map1, voxel = open_stack(args.map1)
    map2, _ = open_stack(args.map2)
    if map1.shape != map2.shape:
        raise CsptInputError(f"has shape {map2.shape}, {args.map1} has {map1.shape}", file=args.map2,
                             expected="maps of the same shape")
    curve = fsc.fsc_curve(map1, map2, voxel_A=voxel)
    print(f"resolution at FSC 0.143: {curve.resolution_A(0.143):.2f} Å; at 0.5: {curve.resolution_A(0.5):.2f} Å")
    if args.out:
        table, plot = Path(f"{args.out}.csv"), Path(f"{args.out}.png")
        fsc.write_fsc_table(table, curve)
        fsc.plot_fsc(plot, curve)
        print(f"wrote {table} and {plot}")
    return EXIT_OK


register("fsc", "Fourier shell correlation between two maps; prints the resolution at 0.143 and 0.5",
         _configure_fsc, _run_fsc)


# ---------------------------------------------------------------------------------------------------- demo
def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="where the headless demo writes its project")
    p.add_argument("--headless", action="store_true", help="run the headless pipeline demo even with a display")


def _run_demo(args: argparse.Namespace) -> int:
    from . import demo

    if args.headless or not demo.display_available():
        return demo.run_headless(args.out)
    from ._qt.demo import run_gui

    return run_gui()


register("demo", "open napari with the plugin and the sample (or, without a display, run the headless demo)",
         _configure_demo, _run_demo)


# ---------------------------------------------------------------------------------------------------- import
def _parse_settings(pairs: Sequence[str]) -> dict[str, str]:
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CsptInputError(f"is {pair!r}", field="--set", expected="KEY=VALUE")
        settings[key.strip()] = value.strip()
    return settings


def _configure_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("tracks", type=Path, help="seed .json/.pkl, .cistem, IMOD .fid/.mod, or a RELION 5 particles .star")
    p.add_argument("--stack", required=True,
                   help="the tilt stack the tracks were picked on (RELION 5: its sections in the tilt-series star's "
                        "order; with several tomograms a path with {name}, e.g. stacks/{name}.mrc)")
    p.add_argument("--out", type=Path, required=True, help="project folder to create")
    p.add_argument("--name", help="tilt-series name (default: the stack's name without _stack; RELION: rlnTomoName)")
    p.add_argument("--angles", type=Path, help=".tlt/.rawtlt/.mdoc (default: found beside the stack; not for RELION, "
                                               "whose tilt-series star has the geometry)")
    p.add_argument("--tomograms", type=Path, help="RELION 5 tomograms.star (with a particles .star)")
    p.add_argument("--tomo", action="append", metavar="NAME",
                   help="RELION 5 tomogram (rlnTomoName) to import; repeatable; default: every one the star names")
    p.add_argument("--relion-dir", type=Path,
                   help="RELION project folder the tilt-series star paths are relative to (default: found)")
    p.add_argument("--config", type=Path, help="start from this .pyp_config.toml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="set a parameter (repeatable)")
    p.add_argument("--copy", action="store_true", help="copy the stack into the project instead of linking it")


def _import_params(args: argparse.Namespace, header_pixel_A: float | None):
    """Parameters of an import: ``--config`` (or defaults), the stack header's pixel when set, then ``--set``."""
    from .io.toml import load_params
    from .model.params import PypParameters

    params = load_params(args.config) if args.config else PypParameters()
    settings = _parse_settings(args.set)
    if not args.config and "scope_pixel" not in settings and header_pixel_A is not None and header_pixel_A > 1.0:
        params["scope_pixel"] = header_pixel_A  # the header's pixel size, when it is set (1.0 means unset)
    for key, value in settings.items():
        params[key] = value
    return params, settings


def _import_relion(args: argparse.Namespace) -> int:
    """``cspt2d import particles.star --tomograms tomograms.star [--tomo NAME]...``: see :mod:`napari_cspt2d.relion`."""
    from .io.star import read_relion5_particle_table
    from .relion import import_relion5, stack_for_template

    if args.tomograms is None:
        raise CsptInputError("needs --tomograms", file=args.tracks, expected="the RELION 5 tomograms.star")
    if args.angles is not None or args.name is not None:
        raise CsptInputError("is not used with a RELION 5 star", field="--angles/--name",
                             expected="the geometry of the tilt-series star and rlnTomoName")
    names = args.tomo or list(dict.fromkeys(read_relion5_particle_table(args.tracks)["rlnTomoName"].astype(str)))
    params, settings = _import_params(args, None)
    done = import_relion5(args.tracks, args.tomograms, args.out, stack_for_template(args.stack, names), params,
                          tomograms=names, keep=list(settings), relion_dir=args.relion_dir, link=not args.copy)
    for name, (tracks, paths) in done.items():
        print(f"imported {name}: {len(tracks)} projections of {tracks.n_particles} particles in {tracks.n_tilts} tilts")
        print_outputs(paths)
    return EXIT_OK


def _run_import(args: argparse.Namespace) -> int:
    from ._reader import read_trackset
    from .model.tiltseries import TiltSeries
    from .pyp import create_project

    if args.tracks.suffix.lower() == ".star":
        return _import_relion(args)
    if args.tomo or args.tomograms:
        raise CsptInputError("are for RELION 5 particles stars", field="--tomo/--tomograms", file=args.tracks,
                             expected="a particles .star, or no --tomo/--tomograms")
    series = TiltSeries.open(args.stack, args.angles)
    tracks = read_trackset(args.tracks, series.shape_yx)
    params, _ = _import_params(args, series.pixel_A)
    name = args.name or series.name
    paths = create_project(args.out, name, args.stack, tracks, params, angles=series.tilts, link=not args.copy)
    print(f"imported {len(tracks)} projections of {tracks.n_particles} particles in {tracks.n_tilts} tilts")
    print_outputs(paths)
    return EXIT_OK


register("import", "make a pyp project folder from a tilt stack and tracks (json/pkl, .cistem, IMOD, RELION 5)",
         _configure_import, _run_import)


# ---------------------------------------------------------------------------------------------------- run / reconstruct
def _configure_project(p: argparse.ArgumentParser) -> None:
    p.add_argument("project", type=Path, help="project folder (with .pyp_config.toml)")
    p.add_argument("--allow-unknown", action="store_true",
                   help="keep parameter names that look like typos of known ones (default: stop and name them)")


def _load_project_parameters(args: argparse.Namespace):
    from .pyp import load_parameters

    return load_parameters(args.project, allow_unknown=args.allow_unknown)


def print_resolutions(outputs: dict) -> None:
    """One line per refinement iteration: resolution at FSC 0.143 and 0.5 and its FSC plot."""
    if not outputs.get("iterations"):
        return
    stem = Path(outputs["map"]).with_suffix("")
    data_set_stem = stem.name.rsplit("_", 1)[0]
    print("iteration  FSC 0.143  FSC 0.5  FSC plot")
    for it in outputs["iterations"]:
        plot = stem.with_name(f"{data_set_stem}_{it['iteration']:02d}_fsc.png")
        print(f"{it['iteration']:>9}  {it['resolution_A']:>7.2f} Å  {it['resolution_05_A']:>5.2f} Å  {plot}")


def _configure_run(p: argparse.ArgumentParser) -> None:
    _configure_project(p)
    p.add_argument("--iteration", type=int, help="first iteration (default: refine_iter)")
    p.add_argument("--workers", type=int, help="dask workers (default: the workers parameter, 0 = one per core)")
    p.add_argument("--scheduler", help="address of a running dask scheduler (overrides cluster_backend)")
    p.add_argument("--serial", action="store_true", help="run in this process, without dask")
    p.add_argument("--dry-run", action="store_true", help="check the project and print the plan, run nothing")


def _run_run(args: argparse.Namespace) -> int:
    from .pyp import csp_split
    from .recon.pipeline import plan_cspt

    params = _load_project_parameters(args)
    if args.scheduler:
        params["cluster_backend"], params["cluster_address"] = "address", args.scheduler
    first = args.iteration or params["refine_iter"]
    if args.dry_run:
        from .run_lock import lock_holder

        print(plan_cspt(params, project_dir=args.project, first_iteration=first))
        holder = lock_holder(args.project)
        if holder is not None:
            print(f"  running now: {holder.describe()} (a run started now would stop)")
        return EXIT_OK
    progress = progress_printer("CSPT")
    try:
        outputs = csp_split(params, first, project_dir=args.project, serial=args.serial, workers=args.workers,
                            progress=progress)
    finally:
        progress.stop()
    print_resolutions(outputs)
    print_outputs({k: outputs[k] for k in ("map", "half_maps", "fsc_plot", "parameters", "log") if k in outputs})
    return EXIT_OK


register("run", "run the CSPT refinement of a project (pyp's csp_split) on dask", _configure_run, _run_run)


def _configure_reconstruct(p: argparse.ArgumentParser) -> None:
    _configure_project(p)
    p.add_argument("--name", help="tilt-series name (default: data_set)")
    p.add_argument("--iteration", type=int, default=2, help="iteration number of the output (default 2)")
    p.add_argument("--save-stacks", action="store_true", help="keep the extracted particles in frealign/scratch/")


def _run_reconstruct(args: argparse.Namespace) -> int:
    from .pyp import run_reconstruction

    params = _load_project_parameters(args)
    progress = progress_printer("reconstruction")
    try:
        outputs = run_reconstruction(args.name or params["data_set"], params, save_stacks=args.save_stacks,
                                     iteration=args.iteration, project_dir=args.project, progress=progress)
    finally:
        progress.stop()
    print(f"resolution at FSC 0.143: {outputs.pop('resolution_A'):.2f} Å; "
          f"at 0.5: {outputs.pop('resolution_05_A'):.2f} Å")
    print_outputs(outputs)
    return EXIT_OK


register("reconstruct", "reconstruct one tilt series' map with half maps and FSC (pyp's run_reconstruction)",
         _configure_reconstruct, _run_reconstruct)


# ---------------------------------------------------------------------------------------------------- export
def _latest_iteration(project: Path, name: str) -> int:
    """The last iteration with a parameter file (``{name}_r01_NN.cistem`` or pyp's ``{data_set}_r01_NN/``; 1 = only
    the input exists)."""
    from .recon.project import parameter_files

    return max(parameter_files(project, name), default=1)


def _configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("project", type=Path, help="project folder")
    p.add_argument("--to", choices=("relion", "cryodrgn", "json"), required=True)
    p.add_argument("--out", type=Path, required=True, help="folder to write into")
    p.add_argument("--name", help="tilt-series name (default: RELION every tilt series of the project, else data_set)")
    p.add_argument("--iteration", type=int, help="parameters of this iteration (default: the latest)")


def _export_cryodrgn(out: Path, project: Path, name: str, tracks, params) -> list[Path]:
    """Particle stack (protein white, as RELION extracts, for cryoDRGN's default data inversion), poses and CTF, one
    entry per projection in the stack's order. Boxes are cut at each projection's position, so the poses carry no
    further translation."""
    import numpy as np

    from .io import cryodrgn
    from .io.mrc import open_stack
    from .recon.extract import write_particle_stack

    stack, _ = open_stack(project / f"{name}_stack.mrc")
    particles = out / f"{name}_particles.mrcs"
    order = write_particle_stack(particles, stack, tracks, extract_box=params.box_unbinned_px,
                                 extract_bin=params["extract_bin"], particle_rad_A=params["particle_rad"],
                                 pixel_A=params.stack_pixel_A, invert=True)
    in_stack_order = tracks.select(order)
    rot, trans = cryodrgn.poses(in_stack_order, box_px=params["extract_box"], binning=params["extract_bin"],
                                offset_px=np.zeros((len(order), 2)))
    cryodrgn.write_poses(out / f"{name}_poses.pkl", rot, trans)
    ctf = cryodrgn.ctf_params(in_stack_order, box_px=params["extract_box"], pixel_A=params.particle_pixel_A,
                              tilt_pixel_A=params.stack_pixel_A, voltage_kV=params["scope_voltage"],
                              cs_mm=params["scope_cs"], amp_contrast=params["scope_wgh"])
    cryodrgn.write_ctf(out / f"{name}_ctf.pkl", ctf)
    return [particles, out / f"{name}_poses.pkl", out / f"{name}_ctf.pkl"]


def _run_export(args: argparse.Namespace) -> int:
    from .io.trackdata import write_track_data
    from .pyp import load_parameters, load_project
    from .recon.project import tilt_series_names
    from .relion import export_relion5

    params = load_parameters(args.project)
    in_project = tilt_series_names(args.project)
    if args.name:
        names = [args.name]
    elif args.to == "relion" or params["data_set"] not in in_project:
        names = in_project
    else:
        names = [params["data_set"]]
    if not names:
        raise CsptInputError("has no tilt series", file=args.project,
                             expected="frealign/maps/{name}_r01.cistem with {name}_stack.mrc")
    args.out.mkdir(parents=True, exist_ok=True)
    tracks, written, iterations = {}, [], {}
    for name in names:
        iterations[name] = args.iteration or _latest_iteration(args.project, name)
        params, tracks[name], _ = load_project(args.project, name, iterations[name])
    if args.to == "relion":
        written = export_relion5(args.out, tracks, args.project, params)
    elif args.to == "cryodrgn":
        for name in names:
            written += _export_cryodrgn(args.out, args.project, name, tracks[name], params)
    else:
        written = [write_track_data(args.out / f"{name}_r01_{iterations[name]:02d}.json", tracks[name])
                   for name in names]
    for name in names:
        print(f"exported iteration {iterations[name]} of {name} ({len(tracks[name])} projections)")
    for path in written:
        print(f"  {path}")
    return EXIT_OK


register("export", "export a project's tracks: RELION 5 star files, cryoDRGN particles/poses/CTF, or seed json",
         _configure_export, _run_export)


# ---------------------------------------------------------------------------------------------------- fit / autotrack
def _configure_tracks_in(p: argparse.ArgumentParser) -> None:
    p.add_argument("tracks", type=Path, help="track file: seed .json/.pkl, .cistem, IMOD .fid/.mod")
    p.add_argument("--image-shape", type=int, nargs=2, metavar=("NY", "NX"), help="tilt image size if not found")
    p.add_argument("--refine", default="", help="comma list of axis,rotation,shift,mag,tilt (global refinement)")
    p.add_argument("--axis-search", action="store_true", help="search the tilt-axis angle first")
    p.add_argument("--robust", choices=("none", "huber", "tukey"), default="huber")


def _fit_from_args(args: argparse.Namespace):
    from ._reader import read_trackset
    from .recon.trackfit import fit_tracks

    tracks = read_trackset(args.tracks, args.image_shape)
    refine = [r.strip() for r in args.refine.split(",") if r.strip()]
    return tracks, fit_tracks(tracks, refine=refine, robust=args.robust, axis_search=args.axis_search)


def _write_tracks(path: Path, tracks) -> None:
    if path.suffix.lower() in (".fid", ".mod"):
        from .io.imod import write_fiducial_model

        write_fiducial_model(path, tracks)
    else:
        from .io.trackdata import write_track_data

        write_track_data(path, tracks)
    print(f"wrote {path}")


def _configure_fit(p: argparse.ArgumentParser) -> None:
    _configure_tracks_in(p)
    p.add_argument("--out", type=Path, help="write the tracks with fitted 3D points (.json/.pkl/.fid/.mod)")


def _run_fit(args: argparse.Namespace) -> int:
    import numpy as np

    from .recon.trackfit import apply_fit

    tracks, fit = _fit_from_args(args)
    print(f"{tracks.n_particles} particles, {tracks.n_tilts} tilts, {len(tracks)} projections; "
          f"mean residual {fit.mean_residual_px:.3f} px, rms {fit.rms_px:.3f} px"
          f"{'' if fit.determined.all() else f', {int((~fit.determined).sum())} particles without height'}")
    worst = [int(i) for i in fit.particle_id[np.argsort(-np.nan_to_num(fit.particle_mean_residual_px))[:5]]]
    print(f"tilt axis {fit.geometry.axis_deg.min():.2f}..{fit.geometry.axis_deg.max():.2f} deg; "
          f"largest mean residuals: particles {worst}")
    if args.out:
        _write_tracks(args.out, apply_fit(tracks, fit))
    return EXIT_OK


register("fit", "fit 3D particle positions to 2D tracks (optionally refining the tilt geometry)",
         _configure_fit, _run_fit)


def _configure_autotrack(p: argparse.ArgumentParser) -> None:
    _configure_tracks_in(p)
    p.add_argument("stack", type=Path, help="tilt stack (.mrc/.st), sections = tilt ids")
    p.add_argument("--out", type=Path, required=True, help="tracks with the new points (.json/.pkl/.fid/.mod)")
    p.add_argument("--box", type=int, default=48, help="reference box (px, default 48)")
    p.add_argument("--search", type=int, default=12, help="largest correction of a prediction (px, default 12)")
    p.add_argument("--min-confidence", type=float, default=0.4, help="normalised CC peak to accept (default 0.4)")


def _run_autotrack(args: argparse.Namespace) -> int:
    import numpy as np

    from .io.mrc import open_stack
    from .recon.autotrack import AutotrackOptions, autotrack_all

    stack, _ = open_stack(args.stack)
    tracks, fit = _fit_from_args(args)
    options = AutotrackOptions(box_px=args.box, search_px=args.search, min_confidence=args.min_confidence)
    progress = progress_printer("assisted tracking")
    try:
        result = autotrack_all(tracks, stack, fit=fit if args.refine else None, options=options, progress=progress)
    finally:
        progress.stop()
    print(f"accepted {int(result.accepted.sum())} of {len(result.accepted)} attempted points "
          f"(median confidence {np.nanmedian(result.confidence) if len(result.confidence) else float('nan'):.2f})")
    _write_tracks(args.out, result.tracks)
    return EXIT_OK


register("autotrack", "find picked particles in their other tilts by cross-correlation (like IMOD beadtrack)",
         _configure_autotrack, _run_autotrack)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
