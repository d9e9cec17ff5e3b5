"""The child process that makes a streamed sample's tilts (``python -c PROGRAM``, see :data:`PROGRAM`).

The GUI process's worker thread would otherwise render them itself and hold the interpreter lock for most of the
time the first layers are being added and drawn (software OpenGL draws on the GUI thread, which then waits for the
lock). Here they are made in a process of their own, at a lower priority: the parent writes a pickled
``(SamplePlan, sections)`` to its stdin, and it writes each section's float32 image (C order) to its stdout, in the
order given. It ends when they are all written or when the parent stops reading (its pipe closed or it is killed).
"""

from __future__ import annotations

import pickle
import sys

import numpy as np

#: What the parent runs (``python -c PROGRAM``): the priority lowered (``os.nice(10)``: the GUI's competitor for
#: the CPU) before numpy and scipy are imported (a few tenths of a second of CPU), then :func:`main`.
PROGRAM = ("import os\ntry:\n    os.nice(10)\nexcept (AttributeError, OSError):\n    pass\n"
           "from napari_cspt2d._sample_child import main\nraise SystemExit(main())")


def main() -> int:
    """Make the tilts asked on stdin (:data:`PROGRAM` lowered the priority before the imports)."""
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
