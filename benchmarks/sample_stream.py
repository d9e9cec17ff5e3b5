"""First image after Open Sample, the first time (the sample is made, streamed) and cached, on a shown viewer.

Two ways in: the cockpit's Data tab (**Synthetic sample**: the button to the first tilt-series layer painted) and
napari's File > Open Sample (``viewer.open_sample``: the call to the first paint). Each way opens the sample in a
fresh napari session (a virtual X display when $DISPLAY is unset) with an empty cache ("first time"), then in a
second fresh session with the cache the first one filled ("cached"): both pay the session's first image layer
(napari's layer controls, the first paint), so the difference between them is the making of the sample. Also: the
time until the whole sample is made, and the tilt label shown with the first image. Goal: first image <= 2 s.
Prints a table and writes ``benchmarks/results/sample_stream.json``. Run: ``.venv/bin/python
benchmarks/sample_stream.py [--way cockpit|hook]`` (the machine is shared: the load average is recorded with the
numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "sample_stream.json"
GOAL_S = 2.0


def _session(way: str) -> dict:
    """One napari session: Open Sample once by ``way``; the numbers."""
    import napari

    from gui import _settle, _wait  # benchmarks/gui.py's event-loop helpers

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1366, 768)
    cockpit = None
    if way == "cockpit":
        _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    _settle(1.0)
    row: dict = {"load_average": round(os.getloadavg()[0], 2)}

    def image() -> object | None:
        return next((layer for layer in viewer.layers
                     if layer.metadata.get("cspt2d", {}).get("role") == "tiltseries"), None)

    def complete() -> bool:
        stream = image().metadata["cspt2d"].get("stream")
        return (stream is None or stream.complete) and (cockpit is None or not cockpit.data.busy)

    t0 = time.perf_counter()
    if cockpit is not None:
        cockpit.data.sample_button.click()
        _wait(lambda: image() is not None, 300)
    else:
        viewer.open_sample("napari-cspt2d", "synthetic")
    viewer.window._qt_viewer.canvas.native.repaint()
    row["first_image_s"] = round(time.perf_counter() - t0, 2)
    row["tilt_label"] = viewer.canvas.overlays.text.text
    _wait(complete, 300)
    row["whole_sample_s"] = round(time.perf_counter() - t0, 2)
    viewer.close()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--way", choices=("cockpit", "hook"))
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one session, JSON out
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_session(args.way)))
        return 0
    results: dict = {"goal_first_image_s": GOAL_S}
    for way in [args.way] if args.way else ["cockpit", "hook"]:
        with tempfile.TemporaryDirectory() as tmp:  # an empty cache, then the cache the first session filled
            env = dict(os.environ, XDG_CACHE_HOME=tmp)
            command = [sys.executable, __file__, "--way", way, "--one"]
            if not os.environ.get("DISPLAY"):
                command = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24"] + command
            for label in ("first time", "cached"):
                out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
                results[f"{way}, {label}"] = json.loads(out.strip().splitlines()[-1])
    print(f"{'open sample':<22} {'first image (s)':>16} {'whole (s)':>10} {'load':>6}  tilt label")
    for key, row in results.items():
        if isinstance(row, dict):
            print(f"{key:<22} {row['first_image_s']:>16} {row['whole_sample_s']:>10} {row['load_average']:>6}  "
                  f"{row['tilt_label']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
