"""The FSC plot of a session's maps as an RGBA image, drawn with matplotlib's Agg canvas (no Qt), so that a worker
thread can draw it and the cockpit only shows the pixels.

Every map keeps its curve, named in the legend; the highlighted one is drawn in colour with its resolution at FSC
0.143 marked, the others fade (earlier ones fainter).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["FSC_THRESHOLD", "FscEntry", "render_fsc_plot"]

FSC_THRESHOLD = 0.143
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
