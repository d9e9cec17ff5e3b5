"""One run per project: the project lock held by another process, by this one, and left by a killed run."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import warnings

import pytest

from napari_cspt2d.errors import CsptInputError, CsptInputWarning
from napari_cspt2d.run_lock import LOCK_NAME, ProjectBusyError, lock_holder, project_lock

#: Holds the lock of the folder in argv[1] until stdin closes (or it is killed), after saying "locked".
HOLDER = """
import sys
from napari_cspt2d.run_lock import project_lock
with project_lock(sys.argv[1], "test holder"):
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path):
    """A process holding ``tmp_path``'s lock."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    if proc.poll() is None:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_a_second_run_is_refused_naming_the_first(tmp_path, holder):
    with pytest.raises(ProjectBusyError) as err:
        with project_lock(tmp_path):
            pass
    message = str(err.value)
    assert f"pid {holder.pid}" in message and socket.gethostname() in message and "test holder" in message
    assert "started" in message and isinstance(err.value, CsptInputError)
    assert lock_holder(tmp_path).pid == holder.pid


def test_the_lock_is_free_again_after_a_clean_end(tmp_path, holder):
    holder.stdin.close()
    holder.wait(timeout=30)
    assert not (tmp_path / LOCK_NAME).exists() and lock_holder(tmp_path) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", CsptInputWarning)
        with project_lock(tmp_path) as me:
            assert me.pid == os.getpid() and lock_holder(tmp_path) == me


def test_a_killed_runs_lock_is_taken_over_with_a_warning(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (tmp_path / LOCK_NAME).exists() and lock_holder(tmp_path) is None  # left behind, but held by nobody
    with pytest.warns(CsptInputWarning, match=f"taking over the lock of test holder: .* \\(pid {holder.pid}"):
        with project_lock(tmp_path, "next run") as me:
            assert lock_holder(tmp_path) == me and me.what.startswith("next run: ")
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_second_run_in_another_thread_is_refused_and_the_holding_thread_nests(tmp_path):
    errors = []

    def second_run():
        try:
            with project_lock(tmp_path, "second"):
                pass
        except ProjectBusyError as exc:
            errors.append(exc)

    with project_lock(tmp_path, "first") as first:
        thread = threading.Thread(target=second_run)
        thread.start()
        thread.join()
        with project_lock(tmp_path, "nested") as nested:  # the pipeline called by a run that holds the lock
            assert nested == first
        assert lock_holder(tmp_path) == first  # still held after the nested block
    assert len(errors) == 1 and "first" in str(errors[0])
    assert not (tmp_path / LOCK_NAME).exists()
    with project_lock(tmp_path, "third"):  # released by the first block
        pass


def test_a_missing_project_folder_is_named(tmp_path):
    with pytest.raises(CsptInputError, match="does not exist"):
        with project_lock(tmp_path / "nope"):
            pass


def test_a_file_system_without_locks_runs_with_a_warning(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(CsptInputWarning, match="does not support locks"):
        with project_lock(tmp_path, "unlocked") as me:
            assert me.what.startswith("unlocked")
    assert not (tmp_path / LOCK_NAME).exists()
