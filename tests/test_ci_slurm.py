"""`.ci/slurm stop` (what `make test` runs after the tests) ends the daemons `start` launched and no others.

The daemons are stand-ins (``sleep`` processes with pid files where slurmd, slurmctld and munged keep theirs); the
bookkeeping is the script's own, run as `make test` runs it.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "slurm"


def _daemon(pid_file: Path) -> subprocess.Popen:
    """A stand-in daemon with its pid file, reaped as soon as it ends (as init reaps a real daemon)."""
    process = subprocess.Popen(["sleep", "60"])
    threading.Thread(target=process.wait, daemon=True).start()
    pid_file.write_text(f"{process.pid}\n")
    return process


def _stop(state: Path, munged_pid: Path) -> str:
    env = {**os.environ, "CSPT2D_SLURM_STATE": str(state), "CSPT2D_MUNGED_PID": str(munged_pid)}
    return subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def daemons(tmp_path):
    """slurmd and slurmctld launched by ``start`` (recorded), munged already running before it (not recorded)."""
    state = tmp_path / "state"
    state.mkdir()
    munged_pid = tmp_path / "munged.pid"
    procs = {"slurmd": _daemon(state / "slurmd.pid"), "slurmctld": _daemon(state / "slurmctld.pid"),
             "munged": _daemon(munged_pid)}
    (state / "started").write_text(f"{state / 'slurmctld.pid'}\n{state / 'slurmd.pid'}\n")
    yield state, munged_pid, procs
    for p in procs.values():
        p.kill()
        p.wait()


def test_stop_ends_what_start_launched_and_leaves_the_rest(daemons):
    state, munged_pid, procs = daemons
    assert "stopped" in _stop(state, munged_pid)
    assert procs["slurmd"].wait(timeout=10) is not None and procs["slurmctld"].wait(timeout=10) is not None
    assert procs["munged"].poll() is None  # it was running before `start`: left alone
    assert not (state / "started").exists()
    assert "nothing to stop" in _stop(state, munged_pid)  # a second stop (or one without start) ends nothing
    assert procs["munged"].poll() is None
