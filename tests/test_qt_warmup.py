"""What the cockpit does in the background when it opens, so that the first actions do not freeze the window: the
OpenGL shader cache filled by a child process drawing every layer kind; the interpreter tuned while the window is
open (long-lived objects frozen out of full garbage collections, a shorter switch interval), undone when it closes."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

from napari_cspt2d._qt._interpreter import SWITCH_INTERVAL_S  # noqa: E402


def _renderer() -> str:
    """The OpenGL renderer's name (e.g. ``llvmpipe (LLVM 15.0.6, 256 bits)``)."""
    from OpenGL import GL
    from qtpy.QtGui import QOffscreenSurface, QOpenGLContext

    context, surface = QOpenGLContext(), QOffscreenSurface()
    surface.create()
    assert context.create()
    context.makeCurrent(surface)
    try:
        return GL.glGetString(GL.GL_RENDERER).decode()
    finally:
        context.doneCurrent()


def test_shader_warm_up_fills_the_mesa_shader_cache(qapp, tmp_path):
    if "llvmpipe" not in _renderer() or os.environ.get("MESA_SHADER_CACHE_DISABLE"):
        pytest.skip("the shader cache checked here is Mesa's (software OpenGL)")
    cache = tmp_path / "mesa"
    env = {**os.environ, "MESA_SHADER_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-m", "napari_cspt2d._qt._gl_warmup"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) > 10_000  # compiled programs were stored


def test_shader_warm_up_waits_for_the_kernel_warm_up(qapp, qtbot):
    from qtpy.QtCore import QObject, Signal

    from napari_cspt2d._qt._gl_warmup import ShaderWarmer

    class Kernels(QObject):  # the part of KernelWarmer the shader warm-up uses
        ready = Signal()
        is_ready = False

    kernels = Kernels()
    warmer = ShaderWarmer(kernels)
    try:
        assert not warmer.started and not warmer.running  # the two children do not compete for the cores
        kernels.ready.emit()
        assert warmer.started
        qtbot.waitUntil(lambda: warmer.running or warmer.process.exitCode() == 0, timeout=5000)
    finally:
        warmer.stop()


def test_the_cockpit_tunes_the_interpreter_until_the_window_closes(make_napari_viewer, qtbot):
    gc.unfreeze()
    interval = sys.getswitchinterval()
    viewer = make_napari_viewer(show=True)
    viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    assert gc.get_freeze_count() > 50_000  # napari, Qt wrappers, the cockpit: out of full collections
    assert sys.getswitchinterval() == min(interval, SWITCH_INTERVAL_S)
    qtbot.waitExposed(viewer.window._qt_window)
    qtbot.wait(100)
    viewer.close()  # the window's close event: the cockpit's session ends
    assert gc.get_freeze_count() == 0 and sys.getswitchinterval() == interval
