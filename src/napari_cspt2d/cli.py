"""The ``cspt2d`` command: the same core as the napari plugin, headless.

Exit codes: 0 success, 2 bad input (the message names file and field), 3 a processing step failed (the message gives
its log), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import CsptCancelled, CsptInputError, CsptRunError

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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cspt2d`` console script."""
    args = build_parser().parse_args(argv)
    try:
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
    paths = write_sample(sample, args.out, name=args.name)
    for label, path in paths.items():
        print(f"{label:>12}: {path}")
    return EXIT_OK


register("sample", "write the synthetic sample tilt series as a pyp project folder (with its ground truth)", _configure_sample, _run_sample)


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


register("fsc", "Fourier shell correlation between two maps; prints the resolution at 0.143 and 0.5", _configure_fsc, _run_fsc)


# ---------------------------------------------------------------------------------------------------- demo
def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="where the headless demo writes its project")
    p.add_argument("--headless", action="store_true", help="run the headless pipeline demo even with a display")


def _run_demo(args: argparse.Namespace) -> int:
    from . import demo

    if args.headless or not demo.display_available():
        return demo.run_headless(args.out)
    return demo.run_gui()


register("demo", "open napari with the plugin and the sample (or, without a display, run the headless demo)", _configure_demo, _run_demo)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
