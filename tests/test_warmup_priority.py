"""The kernels' child lowers its own priority to CHILD_NICENESS, not by it: the cockpit has already set it when it
started the child (:class:`napari_cspt2d._qt._warmup.KernelWarmer`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="niceness as Linux sets it")

PROGRAM = """
import os, sys
os.nice(int(sys.argv[1]))  # what the parent set before
from napari_cspt2d.recon.warmup import CHILD_NICENESS, lower_own_priority
print(CHILD_NICENESS, lower_own_priority(), os.nice(0))
"""


@pytest.mark.parametrize("before", [0, 10, 15])
def test_the_child_ends_at_the_child_niceness_or_where_it_was(before):
    out = subprocess.run([sys.executable, "-c", PROGRAM, str(before)], capture_output=True, text=True, check=True)
    wanted, returned, now = map(int, out.stdout.split())
    start = min(os.nice(0) + before, 19)  # (the test's own niceness is inherited)
    assert returned == now == max(wanted, start)
