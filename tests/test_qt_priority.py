"""The kernels' child process runs at a lower scheduling priority than the GUI thread from its start (its imports of
numba and scipy competed with opening the cockpit). (The GL warm-up's thread is not lowered: under other processes'
load it then got ~10% of a core and was not done before Open Sample.)"""

from __future__ import annotations

import os
import sys
import threading

import pytest

pytest.importorskip("pytestqt")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")

from napari_cspt2d._qt import _priority, _warmup  # noqa: E402
from napari_cspt2d._qt._warmup import KernelWarmer  # noqa: E402


def _niceness(native_id: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, native_id)


def test_a_thread_lowers_its_own_priority_and_not_the_processs():
    seen: list[int] = []

    def body() -> None:
        assert _priority.lower_thread_priority(_niceness(threading.get_native_id()) + 3)
        seen.append(_niceness(threading.get_native_id()))

    before = _niceness(threading.get_native_id())
    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [before + 3]
    assert _niceness(threading.get_native_id()) == before  # (the calling thread's own is unchanged)
    assert not _priority.lower_priority(threading.get_native_id(), 0)  # nothing asked: nothing done


@pytest.mark.gui
def test_the_kernels_child_runs_at_a_lower_priority_from_its_start(qtbot):
    """Checked while the child still sleeps in its first line (before it could lower its own priority)."""
    warmer = KernelWarmer(("-c", "import time; time.sleep(60)"))
    try:
        qtbot.waitUntil(lambda: int(warmer.process.processId()) > 0, timeout=10_000)
        own = _niceness(threading.get_native_id())
        assert _niceness(int(warmer.process.processId())) >= max(own, _warmup.CHILD_NICENESS)
    finally:
        warmer.stop()


def test_a_run_works_at_a_lower_priority_and_its_thread_gets_its_own_back(monkeypatch):
    """The run's worker (and the thread pools it starts) run at RUN_NICENESS; the pooled thread serves other work
    afterwards: its niceness is set back where the system allows it (root, or a raised RLIMIT_NICE)."""
    from napari_cspt2d._qt import run_widget

    seen: dict[str, int] = {}

    def fake_run_job(s, mode, progress, cancel):
        seen["run"] = _niceness(threading.get_native_id())
        inner = threading.Thread(target=lambda: seen.setdefault("started", _niceness(threading.get_native_id())))
        inner.start()
        inner.join()
        yield from ()

    monkeypatch.setattr(run_widget, "run_job", fake_run_job)
    monkeypatch.setattr(run_widget, "wait_for_kernels", lambda *a, **k: 0.0)
    out: dict[str, object] = {}

    def body() -> None:
        out["before"] = _niceness(threading.get_native_id())
        out["result"] = list(run_widget._prepared_run(None, "reconstruct", lambda *a: None, lambda: False))
        out["after"] = _niceness(threading.get_native_id())

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert out["result"] == []
    assert run_widget.RUN_NICENESS > 0
    assert seen["run"] == seen["started"] == max(out["before"], run_widget.RUN_NICENESS)
    if os.geteuid() == 0:
        assert out["after"] == out["before"]
