"""Fill the OpenGL driver's shader cache before the cockpit's layers are first drawn.

The first time a kind of layer is drawn, the driver compiles its shaders. In software OpenGL (Mesa llvmpipe, the
usual case on a remote desktop or a cluster node) that froze the window 0.8–1.6 s at the first tilt image and
0.15–0.4 s at the first map and the first shift vectors. Mesa keeps compiled shaders on disk (``MESA_SHADER_CACHE_DIR``
or ``$XDG_CACHE_HOME/mesa_shader_cache``), keyed by their source; a linked program found there costs about 1 ms (1.19 s
of ``glLinkProgram`` for an image and the tilt label became 1 ms). So this matters for the first session on a machine
(or after a napari, vispy or driver update); later sessions find the shaders on disk anyway.

Once the kernel warm-up is done (:mod:`._warmup`), a child process (``python -m napari_cspt2d._qt._gl_warmup``, no
interpreter lock shared with the window) draws, in hidden napari viewers, one tiny layer of every kind the cockpit
shows, made by the cockpit's own code so that the shaders are the ones the shown viewer will ask for: the tilt image
and the tracks layers (the reader's layer data), the tilt label, the active-track and refined-shift vectors, and the
map (the Run tab's :class:`~napari_cspt2d._qt.results.MapPanel`). A draw that comes before the child is done compiles
as it did. With a GPU driver this costs the child a few seconds and changes nothing.
"""

from __future__ import annotations

import sys

import numpy as np
from qtpy.QtCore import QObject, QProcess

from ._warmup import KernelWarmer

__all__ = ["ShaderWarmer", "draw_every_layer_kind", "warm_shaders_once"]


def draw_every_layer_kind() -> None:
    """Draw one small layer of each kind the cockpit shows in hidden viewers (see the module docstring)."""
    from napari.components import ViewerModel
    from napari.qt import QtViewer

    from .._reader import series_layer_data
    from ..model.editing import TrackDocument
    from ..model.tiltseries import TiltSeries
    from ..recon.warmup import tiny_tracks
    from ..review import ShiftVectors
    from ..runs import map_display
    from ._loader import add_layers
    from ._tilt_overlay import connect_tilt_view
    from ._tracks_layer import TracksLayerController
    from .results import MapPanel
    from .validation import add_shift_vectors_layer

    rng = np.random.default_rng(0)
    tracks = tiny_tracks(rng, size=64)
    series = TiltSeries(rng.normal(size=(3, 64, 64)).astype(np.float32), 4.0, tracks.tilts, "warm-up")
    n = len(tracks)
    start = np.column_stack([tracks.tilt.astype(np.float64), np.full((n, 2), 32.0)])
    vectors = ShiftVectors(np.stack([start, np.column_stack([np.zeros(n), rng.normal(size=(n, 2))])], axis=1),
                           {"particle": tracks.particle, "tilt": tracks.tilt, "shift_px": np.ones(n),
                            "score": rng.uniform(size=n), "residual_px": np.ones(n)}, (0.0, 1.0), 4, 1.5)
    model = ViewerModel(title="napari-cspt2d shader warm-up")
    viewer = QtViewer(model)
    disconnect = connect_tilt_view(model)
    try:
        _, trajectories, points = add_layers(model, series_layer_data(series, tracks))
        controller = TracksLayerController(model, TrackDocument(tracks), points, trajectories)  # + the active track
        add_shift_vectors_layer(model, vectors, series.pixel_A)
        viewer.screenshot()
        controller.close()
    finally:
        disconnect()
        viewer.close()
    panel = MapPanel()
    try:
        panel.show_map(map_display(rng.normal(size=(16, 16, 16)), 4.0), "warm-up")
        panel.qt_viewer.screenshot()
    finally:
        panel.close_viewer()


class ShaderWarmer(QObject):
    """Runs :func:`draw_every_layer_kind` in a child process once ``kernels`` (the kernel warm-up) are ready — not
    beside it: on 2 cores the two children and the window's first draw slowed one another (the kernels were not ready
    at the end of the first Reconstruct, which then loaded them itself). ``stop()`` kills it (the window closes)."""

    def __init__(self, kernels: KernelWarmer) -> None:
        super().__init__()
        self.process = QProcess(self)
        self.started = False
        if kernels.is_ready:
            self.start()
        else:
            kernels.ready.connect(self.start)

    def start(self) -> None:
        """Start the child process (once)."""
        if not self.started:
            self.started = True
            self.process.start(sys.executable, ["-m", "napari_cspt2d._qt._gl_warmup"])

    @property
    def running(self) -> bool:
        """True while the child process draws."""
        return self.process.state() != QProcess.ProcessState.NotRunning

    def stop(self) -> None:
        """Kill the child process if it still runs."""
        if self.running:
            self.process.kill()
            self.process.waitForFinished(2000)


_WARMER: ShaderWarmer | None = None


def warm_shaders_once(kernels: KernelWarmer) -> ShaderWarmer:
    """The process's :class:`ShaderWarmer` (made on the first call: the cache is on disk, once is enough)."""
    global _WARMER
    if _WARMER is None:
        _WARMER = ShaderWarmer(kernels)
    return _WARMER


if __name__ == "__main__":  # pragma: no cover - run by the cockpit in a child process
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(sys.argv[:1])
    draw_every_layer_kind()
    sys.exit(0)
