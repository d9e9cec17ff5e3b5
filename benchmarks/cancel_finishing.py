"""Cancel while a map is being finished (half maps, Wiener filter, FSC) at box 128, through the cockpit's run API.

The cockpit's Reconstruct runs :func:`napari_cspt2d.runs.run_job` in a worker thread with a cancel flag; Refine's
maps are finished by the same :meth:`HalfMapInsertion.finish`. A first run measures the finishing's steps (from its
first "reconstruct" progress to its last); then, for delays spread over the finishing, a timer thread sets the flag
that long after the finishing began, as the Cancel button does, and the time until the run ends (``CsptCancelled``)
is measured: goal <= 0.5 s. Prints a table and writes ``benchmarks/results/cancel_finishing.json``. Run:
``.venv/bin/python benchmarks/cancel_finishing.py [--box 128]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "cancel_finishing.json"
GOAL_S = 0.5


def _session(box: int):
    from napari_cspt2d.model.editing import TrackDocument
    from napari_cspt2d.model.params import PypParameters
    from napari_cspt2d.runs import Session
    from napari_cspt2d.sample import make_sample

    sample = make_sample()
    params = PypParameters({**sample.params, "extract_box": box}, strict=False)
    return Session(sample.stack, None, sample.tracks.tilts, TrackDocument(sample.tracks), sample.tracks, params,
                   None, "sample")


def _run(session, cancel_after_s: float | None) -> dict:
    """One Reconstruct; Cancel ``cancel_after_s`` after the finishing begins (None: no cancel, step times only)."""
    from napari_cspt2d.errors import CsptCancelled
    from napari_cspt2d.runs import run_job

    flag = threading.Event()
    steps: dict[int, float] = {}
    pressed: list[float] = []

    def press() -> None:
        pressed.append(time.perf_counter())
        flag.set()

    def progress(stage: str, done: int, total: int) -> None:
        if stage.endswith("reconstruct"):
            steps[done] = time.perf_counter()
            if done == 0 and cancel_after_s is not None:
                threading.Timer(cancel_after_s, press).start()

    t0 = time.perf_counter()
    outcome = "finished"
    try:
        for _ in run_job(session, "reconstruct", progress, flag.is_set):
            pass
    except CsptCancelled:
        outcome = "cancelled"
    end = time.perf_counter()
    row = {"cancel_after_s": cancel_after_s, "outcome": outcome, "run_s": round(end - t0, 2)}
    if pressed:
        row["cancel_s"] = round(end - pressed[0], 3)
    order = sorted(steps)
    row["step_s"] = {f"{a}->{b}": round(steps[b] - steps[a], 3) for a, b in zip(order, order[1:])}
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--box", type=int, default=128)
    args = parser.parse_args()
    session = _session(args.box)
    first = _run(session, None)
    finishing_s = sum(first["step_s"].values())
    rows = [first] + [_run(session, round(f * finishing_s, 2)) for f in (0.1, 0.3, 0.5, 0.7, 0.9)]
    results = {"box": args.box, "load_average": round(os.getloadavg()[0], 2), "goal_cancel_s": GOAL_S, "runs": rows}
    print(f"box {args.box}, load average {results['load_average']}")
    latencies = [row["cancel_s"] for row in rows if "cancel_s" in row]
    results["max_cancel_s"] = max(latencies, default=None)
    print(f"{'cancel after (s)':>16} {'outcome':>10} {'cancel (s)':>11}  finishing steps (s)")
    for row in rows:
        at = "-" if row["cancel_after_s"] is None else row["cancel_after_s"]
        print(f"{at!s:>16} {row['outcome']:>10} {row.get('cancel_s', '-')!s:>11}  {row['step_s']}")
    print(f"longest cancel: {results['max_cancel_s']} s (goal <= {GOAL_S} s)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(main())
