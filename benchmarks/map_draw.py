"""One draw of the cockpit's docked map viewer (:class:`napari_cspt2d._qt.results.MapPanel`) per display mode.

A shown napari viewer and a map panel at the docked size (``--width``: 331 px is the cockpit's map canvas at
1366×768, 470 px at 1920×1080; 254 px high), the 128³ EMD-3197 map (``../shared/data/maps``, resampled; a Gaussian
blob without it). For each mode: the first draw after the change and the median of 5 (``paintGL`` with the context
current, then ``glFinish``: the GUI-thread time of one draw, whatever the renderer). Tells which display a renderer
affords per map update (the panel shows the central slice on software OpenGL: :mod:`napari_cspt2d._qt._gl_info`).
Prints a table and writes ``benchmarks/results/map_draw.json``. Run under Xvfb:
``xvfb-run -a -s "-screen 0 1920x1080x24" .venv/bin/python benchmarks/map_draw.py [--width 331]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "map_draw.json"
MAP = ROOT.parent / "shared" / "data" / "maps" / "EMD-3197.map"
BOX = 128
MAP_PANEL_HEIGHT_PX = 320  # the panel with its title and mode rows around a map canvas ~254 px high, as docked


def sample_map() -> tuple[np.ndarray, str]:
    """A ``BOX``³ float32 map with some noise, and where it came from."""
    rng = np.random.default_rng(0)
    if MAP.is_file():
        import mrcfile
        from scipy import ndimage

        with mrcfile.open(MAP, permissive=True) as f:
            volume = np.asarray(f.data, np.float32)
        volume = ndimage.zoom(volume, BOX / volume.shape[0], order=1)[:BOX, :BOX, :BOX]
        source = f"{MAP.name} resampled to {BOX}³"
    else:
        z, y, x = np.mgrid[:BOX, :BOX, :BOX] - BOX / 2
        volume = np.exp(-(x * x + 2 * y * y + 3 * z * z) / (2 * (BOX / 8) ** 2)).astype(np.float32)
        source = f"Gaussian blob {BOX}³ ({MAP} absent)"
    return volume + rng.normal(0, 0.3 * volume.std(), volume.shape).astype(np.float32), source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=331, help="map canvas width (px)")
    args = parser.parse_args()
    import napari
    from qtpy.QtWidgets import QApplication
    from vispy.gloo import gl

    from napari_cspt2d._qt._gl_info import gl_renderer
    from napari_cspt2d._qt.results import MapPanel
    from napari_cspt2d.runs import map_display

    volume, source = sample_map()
    full = map_display(volume, 2.0)
    half = map_display(volume.reshape(BOX // 2, 2, BOX // 2, 2, BOX // 2, 2).mean((1, 3, 5)), 4.0)
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    panel = MapPanel()
    panel.resize(args.width, MAP_PANEL_HEIGHT_PX)
    panel.show()

    def settle(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.005)

    settle(1.0)
    panel.prepare()
    settle(0.5)
    native = panel.qt_viewer.canvas.native

    def draw_ms() -> float:
        native.makeCurrent()
        t0 = time.perf_counter()
        native.paintGL()
        gl.glFinish()
        return (time.perf_counter() - t0) * 1000.0

    rows: dict[str, dict[str, float]] = {}

    def measure(label: str, display, three_d: bool, rendering: str = "iso", step: float = 1.0) -> None:
        panel.view_3d_button.setChecked(three_d)
        panel.show_map(display, label)
        panel.layer.rendering = rendering
        if three_d:
            panel.qt_viewer.canvas.layer_to_visual[panel.layer].node.relative_step_size = step
        first = draw_ms()
        median = statistics.median(draw_ms() for _ in range(5))
        rows[label] = {"first_ms": round(first, 1), "median_ms": round(median, 1)}

    measure(f"2D central slice {BOX}² (software default)", full, False)
    measure(f"3D iso {BOX}³ (GPU default)", full, True)
    measure(f"3D iso {BOX}³, step 2", full, True, step=2.0)
    measure(f"3D iso {BOX // 2}³ (binned 2)", half, True)
    measure(f"3D mip {BOX}³", full, True, "mip")
    measure(f"3D attenuated_mip {BOX}³", full, True, "attenuated_mip")
    measure(f"3D mip {BOX // 2}³ (binned 2)", half, True, "mip")
    size = f"{native.width()}x{native.height()}"
    viewer.close()
    renderer = gl_renderer()
    print(f"renderer {renderer}; map canvas {size} px; {source}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'display':<44} {'first draw (ms)':>16} {'median (ms)':>12}")
    for label, row in rows.items():
        print(f"{label:<44} {row['first_ms']:>16} {row['median_ms']:>12}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    summary = {"renderer": renderer, "canvas": size, "map": source, "load_average": round(os.getloadavg()[0], 2),
               "draws": rows}
    RESULTS.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
