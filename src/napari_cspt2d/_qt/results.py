"""Results of a run: the map and half maps in their own napari window, and the FSC plot docked in the main window.

Why a second window: the tilt-series viewer's dimensions are ``(tilt, y, x)``; a 3D map added to it would share the
first slider (its z would move with the tilt) and its 3D rendering would switch the tilt series to 3D too. The map
window is an ordinary napari viewer in 3D (iso-surface rendering of the map, the half maps hidden below it), so every
napari tool works on the map (contrast, iso threshold, 2D slicing, saving) while the tilt-series window keeps its tilt
slider. The window is created with the first map and closed with the main window.

The FSC plot (matplotlib canvas) keeps the curve of every map shown in a run (latest in colour, earlier ones grey)
and marks the 0.143 threshold and the resolution where the latest curve crosses it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.layers import Image
from numpy.typing import NDArray
from qtpy.QtWidgets import QLabel, QVBoxLayout, QWidget

from ..recon.fsc import FscCurve
from ..recon.reconstruct import ReconstructionResult

__all__ = ["FscPlot", "MapWindow", "iso_level", "FSC_THRESHOLD"]

FSC_THRESHOLD = 0.143
MAP_AXES = ("z", "y", "x")
MAP_WINDOW_SIZE = (800, 760)
#: Initial 3D view of a map (napari camera angles, degrees): tilted so that its depth shows.
MAP_VIEW_ANGLES = (20.0, 30.0, 140.0)
#: Initial zoom over napari's fit-the-box view (a particle fills about half of its box).
MAP_ZOOM = 1.6
_BG, _FG = "#262930", "#d6d6d6"  # napari's dark theme


def iso_level(volume: NDArray[np.floating], fraction: float = 0.01) -> float:
    """Density above which the brightest ``fraction`` of the voxels lie: the first iso-surface threshold (1 %, the
    usual initial level of map viewers; a particle fills a few % of its box)."""
    return float(np.quantile(np.asarray(volume, dtype=np.float32), 1.0 - fraction))


class FscPlot(QWidget):
    """FSC curves of the maps of a run; the latest is drawn in colour with its 0.143 resolution marked."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.curves: list[tuple[str, FscCurve]] = []
        self.figure = Figure(figsize=(4, 3), dpi=100, facecolor=_BG)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.axes = self.figure.add_subplot(1, 1, 1)
        self.label = QLabel("No map yet.")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addWidget(self.canvas, 1)
        layout.addWidget(self.label)
        self.canvas.setMinimumHeight(220)
        self._draw()

    def clear(self) -> None:
        """Forget the curves (a new run starts)."""
        self.curves = []
        self._draw()

    def add_curve(self, curve: FscCurve, label: str) -> float:
        """Add ``curve`` (named ``label``, e.g. "iteration 2") and redraw; returns its resolution at 0.143 (Å)."""
        self.curves.append((label, curve))
        self._draw()
        return curve.resolution_A(FSC_THRESHOLD)

    @property
    def resolution_A(self) -> float | None:
        """Resolution at FSC 0.143 of the latest curve (Å), None without curves."""
        return self.curves[-1][1].resolution_A(FSC_THRESHOLD) if self.curves else None

    def _draw(self) -> None:
        ax = self.axes
        ax.clear()
        ax.set_facecolor(_BG)
        for spine in ax.spines.values():
            spine.set_color(_FG)
        ax.tick_params(colors=_FG, labelsize=8)
        ax.axhline(FSC_THRESHOLD, color="#888888", ls="--", lw=1)
        ax.axhline(0.0, color="#555555", lw=0.8)
        for i, (label, curve) in enumerate(self.curves):
            latest = i == len(self.curves) - 1
            fade = 1.0 if latest else 0.35 + 0.5 * i / len(self.curves)  # earlier iterations fainter
            ax.plot(curve.frequency_A_inv, curve.fsc, lw=2.0 if latest else 1.0,
                    color="#4fc3f7" if latest else "#7a7a7a", alpha=fade, label=label if latest or i == 0 else None)
        if self.curves:
            label, curve = self.curves[-1]
            res = curve.resolution_A(FSC_THRESHOLD)
            ax.axvline(1.0 / res, color="#ff8a65", lw=1.2)
            ax.annotate(f"{res:.1f} Å", (1.0 / res, FSC_THRESHOLD), xytext=(6, 8), textcoords="offset points",
                        color="#ff8a65", fontsize=9)
            ax.set_xlim(0, curve.frequency_A_inv[-1])
            ax.legend(loc="upper right", fontsize=8, facecolor=_BG, edgecolor="#555555", labelcolor=_FG)
            self.label.setText(f"{label}: {res:.2f} Å at FSC {FSC_THRESHOLD} "
                               f"(Nyquist {2 * curve.voxel_A:.2f} Å); {len(self.curves)} map(s) this run")
        else:
            self.label.setText("No map yet.")
        ax.set_ylim(-0.1, 1.05)
        ax.set_xlabel("spatial frequency (1/Å)", color=_FG, fontsize=9)
        ax.set_ylabel("FSC (half maps)", color=_FG, fontsize=9)
        self.figure.tight_layout()
        self.canvas.draw_idle()


class MapWindow:
    """The napari window of the maps (see the module docstring). ``show()`` says whether to show the window when it
    is created (e.g. only if the main window is shown); ``viewer_factory(title=..., ndisplay=3, show=...)`` makes
    the viewer (default :class:`napari.Viewer`)."""

    def __init__(self, *, show: Callable[[], bool] = lambda: True,
                 viewer_factory: Callable[..., object] | None = None) -> None:
        self.show = show
        self._factory = viewer_factory
        self._viewer = None

    @property
    def viewer(self):
        """The map viewer (created on first use)."""
        if self._viewer is None:
            if self._factory is None:
                from napari import Viewer

                self._factory = Viewer
            self._viewer = self._factory(title="napari-cspt2d: map", ndisplay=3, show=bool(self.show()))
            self._viewer.window.resize(*MAP_WINDOW_SIZE)
            self._viewer.window._qt_window.destroyed.connect(self._forget)
        return self._viewer

    @property
    def is_open(self) -> bool:
        return self._viewer is not None

    def _forget(self, *_) -> None:
        self._viewer = None

    def layer(self, name: str) -> Image | None:
        if self._viewer is None:
            return None
        return next((lyr for lyr in self._viewer.layers if lyr.name == name and isinstance(lyr, Image)), None)

    def show_volume(self, name: str, volume: NDArray[np.floating], voxel_A: float, *, visible: bool = True,
                    iso: bool = True) -> Image:
        """Add ``volume`` (z, y, x; protein positive) as layer ``name`` or replace that layer's data."""
        data = np.asarray(volume, dtype=np.float32)
        lo, hi = float(data.min()), float(data.max())
        limits = (lo, hi if hi > lo else lo + 1.0)
        layer = self.layer(name)
        scale = (float(voxel_A),) * 3
        if layer is not None and (layer.data.shape != data.shape or tuple(layer.scale) != scale):
            self._viewer.layers.remove(layer)
            layer = None
        if layer is None:
            layer = self.viewer.add_image(
                data, name=name, scale=scale, axis_labels=MAP_AXES, colormap="gray" if not iso else "bop orange",
                rendering="iso" if iso else "mip", contrast_limits=limits, visible=visible,
                metadata={"cspt2d": {"role": "map"}},
            )
            if len(self._viewer.layers) == 1:
                self._viewer.reset_view()
                self._viewer.scene.camera.angles = MAP_VIEW_ANGLES
                self._viewer.scene.camera.zoom *= MAP_ZOOM
        else:
            layer.data = data
            layer.contrast_limits_range = limits
            layer.contrast_limits = limits
        if iso:
            layer.iso_threshold = iso_level(data)
        return layer

    def show_result(self, result: ReconstructionResult, label: str) -> Image:
        """The map as an iso-surface (``map``), the half maps hidden (``half map 1/2``); the window title says
        ``label`` and the resolution."""
        self.show_volume("half map 1", result.half1, result.voxel_A, visible=False)
        self.show_volume("half map 2", result.half2, result.voxel_A, visible=False)
        layer = self.show_volume("map", result.map, result.voxel_A)
        self._viewer.layers.selection.active = layer
        self._viewer.title = f"napari-cspt2d: map ({label}, {result.resolution_A:.1f} Å)"
        return layer

    def close(self) -> None:
        viewer, self._viewer = self._viewer, None
        if viewer is not None:
            with contextlib.suppress(RuntimeError, AttributeError):
                viewer.close()
