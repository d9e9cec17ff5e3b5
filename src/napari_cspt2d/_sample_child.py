"""The child process that makes a streamed sample's tilts (``python -m napari_cspt2d._sample_child``).

The GUI process's worker thread would otherwise render them itself and hold the interpreter lock for most of the
time the first layers are being added and drawn (software OpenGL draws on the GUI thread, which then waits for the
lock). Here they are made in a process of their own, at a lower priority (``os.nice``): the parent writes a pickled
``(SamplePlan, sections)`` to its stdin, and it writes each section's float32 image (C order) to its stdout, in the
order given. It ends when they are all written or when the parent stops reading (its pipe closed or it is killed).
"""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np

#: How much lower than its parent the child runs (a renice of the GUI's competitor for the CPU).
NICENESS = 10


def main() -> int:
    try:
        os.nice(NICENESS)
    except (AttributeError, OSError):
        pass  # no nice on this platform: the normal priority
    plan, sections = pickle.load(sys.stdin.buffer)
    out = sys.stdout.buffer
    try:
        for section in sections:
            out.write(np.ascontiguousarray(plan.render_tilt(int(section)), np.float32).data)
            out.flush()
    except (BrokenPipeError, OSError):
        return 0  # the parent stopped reading: stopped, not failed
    return 0


if __name__ == "__main__":
    sys.exit(main())
