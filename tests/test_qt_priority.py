"""The cockpit's background work runs at a lower scheduling priority than the GUI thread from its start: the GL
warm-up's thread (Mesa's compiles) and the kernels' child process (its imports of numba and scipy)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

pytest.importorskip("pytestqt")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")

from napari_cspt2d._qt import _gl_warmup, _priority, _warmup  # noqa: E402
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


@pytest.mark.gui
def test_the_gl_warm_ups_thread_lowers_its_priority(make_napari_viewer, qtbot, monkeypatch, tmp_path, qapp):
    """The warm-up's compiles run in a thread of lower priority (set by the thread itself, for llvmpipe's threads it
    starts too)."""
    calls: list[tuple[str, int]] = []
    lower = _gl_warmup.lower_thread_priority

    def noted(niceness: int) -> bool:
        calls.append((threading.current_thread().name, niceness))
        return lower(niceness)

    monkeypatch.setattr(_gl_warmup, "lower_thread_priority", noted)
    monkeypatch.setenv("MESA_SHADER_CACHE_DIR", str(tmp_path / "mesa"))
    monkeypatch.setattr(_gl_warmup, "needs_warming", lambda: True)
    monkeypatch.setattr(_gl_warmup._WARMED, "is_set", lambda: False)
    viewer = make_napari_viewer(show=True)
    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    warmer = cockpit.shader_warmer
    qtbot.waitUntil(lambda: warmer.state not in ("idle", "drawing", "compiling"), timeout=60_000)
    assert warmer.state == "done"
    assert calls == [("napari-cspt2d GL warm-up", _gl_warmup.THREAD_NICENESS)]
    assert _gl_warmup.THREAD_NICENESS > 0
