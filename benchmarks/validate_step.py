"""GUI-thread cost of a Refine step's review arriving in the Validate tab, in a shown napari viewer on the sample.

The cockpit opens on File > Open Sample's layers (default sample: 40 particles × 41 tilts); then, several times, a
new review (other refined positions and scores) is shown the way a run's step shows it, piece by piece: the refined-
shift vectors assigned to their layer, then the jump to the worst projection: its tilt, then its particle (each a turn
of its own, as a run's step does; ``--one-turn-jump``: both in one call). Per piece: the
GUI thread's CPU (``time.thread_time``) and wall time of the call, and of the event-loop turn after it (the repaints it
asked for: the main canvas, the layer list), and how many events the viewer's layer list heard during the call (each
a ``dataChanged`` of a row). The machine may be shared: CPU time is the number to compare.

Run (without a display: under ``xvfb-run -a -s "-screen 0 1366x768x24"``):
``PYTHONPATH=src .venv/bin/python benchmarks/validate_step.py [--steps 8] [--one-turn-jump] [--profile]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.thread_time()
    fn()
    return (time.perf_counter() - w) * 1e3, (time.thread_time() - c) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--one-turn-jump", action="store_true", help="the jump in one piece (as before)")
    parser.add_argument("--profile", action="store_true", help="cProfile each piece (its top calls, last step)")
    args = parser.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_cspt2d._qt._loader import add_layers
    from napari_cspt2d._sample_data import make_sample_data
    from napari_cspt2d.model.params import PypParameters
    from napari_cspt2d.review import ShiftReview, shift_vectors, worst_first
    from napari_cspt2d.sample import make_sample

    app = QApplication.instance() or napari.qt.get_qapp()
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1366, 768)
    add_layers(viewer, make_sample_data())
    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    validation = cockpit.validate
    document = cockpit.curate.document
    sample = make_sample()
    params = PypParameters(sample.params)
    validation.prepare_layer(float(sample.pixel_A))

    def settle(seconds: float = 0.3) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.005)

    settle(2.0)
    heard: list[str] = []  # what the viewer's layer list hears (each a dataChanged of a row)
    viewer.layers.events.connect(lambda event: heard.append(f"{event.type}@{getattr(event, 'index', '-')}"))
    relayed: dict[str, list[int]] = {}
    before = document.tracks
    rng = np.random.default_rng(0)
    rows: dict[str, list[tuple[float, float]]] = {}
    for step in range(args.steps):
        n = len(before)
        after = before.with_positions(np.arange(n), before.positions_px() + rng.normal(0.0, 2.0, (n, 2)))
        after = after.replace(score=rng.uniform(0.2, 0.9, n))
        review = ShiftReview(before, after)
        vectors = shift_vectors(review)
        validation.review = review  # what set_review does before its staged pieces (not timed)
        validation._params, validation._stack = params, sample.stack
        validation._volume = np.zeros((params["extract_box"],) * 3, np.float32)
        validation._order = worst_first(review)
        validation._current_row = None
        row = int(worst_first(review)[step % 5])
        pieces = {"vectors assigned": lambda v=vectors: validation._show_vectors(v),
                  "jump: the tilt": lambda r=row: validation._go_to_tilt(r),
                  "jump: the particle": lambda r=row: validation.jump(r)}
        if args.one_turn_jump:
            pieces = {"vectors assigned": lambda v=vectors: validation._show_vectors(v),
                      "jump (in one turn)": lambda r=row: validation.jump(r)}
        for name, piece in pieces.items():
            profile = None
            if args.profile and step == args.steps - 1:
                import cProfile

                profile = cProfile.Profile()
                profile.enable()
            heard.clear()
            rows.setdefault(name, []).append(_timed(piece))
            relayed.setdefault(name, []).append(len(heard))
            rows.setdefault(name + ": next turn (paint)", []).append(_timed(app.processEvents))
            if profile is not None:
                import pstats

                profile.disable()
                print(f"--- {name} (+ next turn)")
                pstats.Stats(profile).sort_stats("cumulative").print_stats(40)
            settle(0.3)
    print(f"{'piece (ms, steps 2..)':<44}{'CPU median':>11}{'CPU max':>9}{'wall median':>12}{'wall max':>9}")
    for name, values in rows.items():
        values = values[1:]  # the first step makes the layer's visual
        wall, cpu = [v[0] for v in values], [v[1] for v in values]
        print(f"{name:<44}{statistics.median(cpu):11.1f}{max(cpu):9.1f}{statistics.median(wall):12.1f}"
              f"{max(wall):9.1f}")
    print("events the layer list heard per piece (median, max):",
          {name: (statistics.median(n[1:]), max(n[1:])) for name, n in relayed.items()})
    viewer.close()


if __name__ == "__main__":
    main()
