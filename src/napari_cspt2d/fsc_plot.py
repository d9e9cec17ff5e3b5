"""The FSC plot of a session's maps as an RGBA image, drawn with matplotlib's Agg canvas (no Qt), so that the
cockpit only shows the pixels.

:func:`render_fsc_plot_apart` (and :func:`plot_fsc_apart`, a map's FSC PNG) draws it in a process of its own (one,
started at the first plot and kept): matplotlib is Python from end to end and holds the interpreter lock (GIL) while
it draws (~0.1-0.3 s a plot, ~1 s to import); drawn in a thread of napari's process, it was the thread most often
seen holding the GIL during the window's stalls in the cockpit's Refine (py-spy ``--gil``: 9 stack changes a second
inside stalls, 1 outside; README "The cockpit's loop").

The process runs at a lower scheduling priority (:data:`PLOT_NICENESS`) and a run starts it as it begins
(:func:`start_plot_process`): its start-up (~0.6 s of a core: a new interpreter importing numpy and matplotlib) then
overlaps the reconstruction instead of coming when the first map is finished, and on a machine with few cores it
takes only what the window's process leaves.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["FSC_THRESHOLD", "PLOT_NICENESS", "FscEntry", "plot_fsc_apart", "render_fsc_plot", "render_fsc_plot_apart",
           "start_plot_process"]

FSC_THRESHOLD = 0.143
#: How much lower the plot process's scheduling priority is than the window's (``os.nice``).
PLOT_NICENESS = 10
_BG, _FG, _LATEST, _MARK = "#262930", "#d6d6d6", "#4fc3f7", "#ff8a65"  # napari's dark theme


@dataclass(frozen=True, eq=False)
class FscEntry:
    """One map's curve: ``label`` for the legend, ``frequency_A_inv`` (K,) and ``fsc`` (K,), ``resolution_A`` at
    FSC 0.143."""

    label: str
    frequency_A_inv: NDArray[np.float64]
    fsc: NDArray[np.float64]
    resolution_A: float


def render_fsc_plot(entries: Sequence[FscEntry], highlight: int, size_px: tuple[int, int], dpi: int = 100
                    ) -> NDArray[np.uint8]:
    """The plot of ``entries`` with entry ``highlight`` in colour, as an ``(height, width, 4)`` RGBA image of
    ``size_px`` (width, height)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = size_px
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor=_BG)
    canvas = FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    ax.set_facecolor(_BG)
    for spine in ax.spines.values():
        spine.set_color(_FG)
    ax.tick_params(colors=_FG, labelsize=7)
    ax.axhline(FSC_THRESHOLD, color="#888888", ls="--", lw=1)
    ax.axhline(0.0, color="#555555", lw=0.8)
    for i, entry in enumerate(entries):
        shown = i == highlight
        ax.plot(entry.frequency_A_inv, entry.fsc, label=entry.label, zorder=3 if shown else 2,
                color=_LATEST if shown else "#8a8a8a", lw=2.0 if shown else 1.0,
                alpha=1.0 if shown else 0.3 + 0.5 * (i + 1) / (len(entries) + 1))
    if entries:
        res = entries[highlight].resolution_A
        ax.axvline(1.0 / res, color=_MARK, lw=1.2)
        ax.annotate(f"{res:.1f} Å", (1.0 / res, FSC_THRESHOLD), xytext=(6, 8), textcoords="offset points",
                    color=_MARK, fontsize=8)
        ax.set_xlim(0, max(float(e.frequency_A_inv[-1]) for e in entries))
        ax.legend(loc="upper right", fontsize=7, facecolor=_BG, edgecolor="#555555", labelcolor=_FG)
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlabel("spatial frequency (1/Å)", color=_FG, fontsize=8)
    ax.set_ylabel("FSC", color=_FG, fontsize=8)
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def _plot_process() -> ProcessPoolExecutor:
    """The one process that draws plots (spawned, not forked: napari's process has Qt and other threads)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_lower_priority)
            atexit.register(_pool.shutdown, wait=False, cancel_futures=True)
        return _pool


def _lower_priority() -> None:
    if hasattr(os, "nice"):
        os.nice(PLOT_NICENESS)


def _ready() -> int:
    """What a plot needs, imported (in the plot process); returns the process's niceness."""
    from matplotlib.backends import backend_agg  # noqa: F401

    from .recon import fsc  # noqa: F401

    return os.nice(0) if hasattr(os, "nice") else 0


def start_plot_process() -> Future:
    """Start the plot process (module docstring) and import matplotlib in it, without waiting; the future gives the
    process's niceness."""
    return _plot_process().submit(_ready)


def render_fsc_plot_apart(entries: Sequence[FscEntry], highlight: int, size_px: tuple[int, int], dpi: int = 100
                          ) -> NDArray[np.uint8]:
    """:func:`render_fsc_plot` drawn in the plot process (module docstring); the calling thread waits without
    holding the GIL."""
    return _plot_process().submit(render_fsc_plot, list(entries), highlight, size_px, dpi).result()


def plot_fsc_apart(path, curve, *, title: str) -> None:
    """:func:`napari_cspt2d.recon.fsc.plot_fsc` (the FSC PNG beside a map) drawn in the plot process: a run in the
    cockpit's process writes its first map's plot without importing or running matplotlib in its thread (that held
    the GIL for ~0.35 s of the first Reconstruct; py-spy ``--gil``)."""
    from .recon.fsc import plot_fsc

    _plot_process().submit(plot_fsc, path, curve, title=title).result()
