"""Mesa's shader cache warmed when the cockpit opens (``_qt/_gl_warmup.py``): the sample's layers drawn in an
off-screen canvas whose GL commands a thread of its own replays, so the main canvas's compiles are read from the cache.
Real shown napari viewers (Xvfb); no timing is asserted."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest

pytest.importorskip("napari")

import vispy.gloo.glir as glir  # noqa: E402
from qtpy.QtCore import Qt  # noqa: E402

from napari_cspt2d._qt import _gl_warmup  # noqa: E402
from napari_cspt2d._qt._gl_info import gl_renderer, is_software_renderer  # noqa: E402

SMALL = {"n_particles": 6, "n_tilts": 11, "shape_yx": (256, 256), "box": 32}
THREAD = "napari-cspt2d GL warm-up"


@pytest.fixture
def mesa_cache(tmp_path, monkeypatch):
    """A shader cache folder of its own for the marker (Mesa itself keeps the folder it chose when this process made
    its first context), the process's warm-up not yet done, and this session's caches private."""
    monkeypatch.setenv("MESA_SHADER_CACHE_DIR", str(tmp_path / "mesa"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(_gl_warmup, "_WARMED", threading.Event())
    folder = tmp_path / "mesa" / "mesa_shader_cache"
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def software_gl(qapp):  # (an OpenGL context needs the application)
    if not is_software_renderer(gl_renderer()):
        pytest.skip(f"the warm-up is for software OpenGL; this display renders with {gl_renderer()!r}")


def test_only_a_software_renderer_without_a_marker_of_this_key_is_warmed(mesa_cache, monkeypatch):
    strings = ["llvmpipe (LLVM 15.0.6, 256 bits)", "4.5 (Compatibility Profile) Mesa 22.3.6"]
    monkeypatch.setattr(_gl_warmup, "gl_strings", lambda: tuple(strings))
    assert _gl_warmup.needs_warming()
    _gl_warmup.marker_path().write_text(json.dumps(_gl_warmup.warm_key()))
    assert not _gl_warmup.needs_warming()  # warmed before, for this renderer and versions
    strings[1] = "4.5 (Compatibility Profile) Mesa 23.0.0"  # another driver release: its own cache entries
    assert _gl_warmup.needs_warming()
    _gl_warmup.marker_path().write_text("{not json")
    assert _gl_warmup.needs_warming()
    (mesa_cache.parent / "mesa_shader_cache_db").mkdir()  # a later Mesa's folder, alone: the marker goes there
    mesa_cache.rename(mesa_cache.parent / "old")
    assert _gl_warmup.marker_path() == mesa_cache.parent / "mesa_shader_cache_db" / _gl_warmup.MARKER_NAME
    assert _gl_warmup.needs_warming()
    monkeypatch.setenv("MESA_SHADER_CACHE_DISABLE", "true")
    assert not _gl_warmup.needs_warming()
    monkeypatch.delenv("MESA_SHADER_CACHE_DISABLE")
    strings[0] = "NVIDIA GeForce RTX 3060/PCIe/SSE2"
    assert not _gl_warmup.needs_warming()


def _programs_linked(monkeypatch) -> list[tuple[str, str]]:
    """(thread name, sha1 of the sources) of every GL program linked from now on, as :func:`_gl_warmup.program_sources`
    names them."""
    linked: list[tuple[str, str]] = []
    set_data, link = glir.GlirShader.set_data, glir.GlirProgram.link_program

    def set_data_kept(self, offset, code):
        self._test_code = code
        return set_data(self, offset, code)

    def link_noted(self):
        source = "\0".join(getattr(shader, "_test_code", "") for shader in self._attached_shaders)
        linked.append((threading.current_thread().name, hashlib.sha1(source.encode()).hexdigest()))
        return link(self)

    monkeypatch.setattr(glir.GlirShader, "set_data", set_data_kept)
    monkeypatch.setattr(glir.GlirProgram, "link_program", link_noted)
    return linked


@pytest.mark.gui
def test_opening_the_cockpit_compiles_the_samples_programs_in_a_thread_of_its_own(
        make_napari_viewer, qtbot, monkeypatch, mesa_cache, software_gl):
    """The warm-up links, in its own thread and GL context, every program the main canvas then links for the sample
    (the same sources: the cache can serve them), ends with its thread joined and leaves a marker: the next cockpit
    skips it."""
    linked = _programs_linked(monkeypatch)
    viewer = make_napari_viewer(show=True)
    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    warmer = cockpit.shader_warmer
    qtbot.waitUntil(lambda: warmer.state not in ("idle", "drawing", "compiling"), timeout=60000)
    assert warmer.state == "done"
    assert warmer._thread is None and warmer._surface is None and warmer._canvas is None
    warmed = {source for thread, source in linked if thread == THREAD}
    assert len(warmed) >= 5 and warmed == set(warmer.sources)
    assert json.loads(_gl_warmup.marker_path().read_text()) == _gl_warmup.warm_key()

    del linked[:]
    cockpit.data.sample_kwargs = SMALL
    qtbot.mouseClick(cockpit.data.sample_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: cockpit.state.document is not None and not cockpit.data.busy, timeout=60000)
    qtbot.wait(300)  # the last layer's repaint
    on_screen = {source for thread, source in linked if thread == threading.main_thread().name}
    assert on_screen and on_screen <= warmed, "the main canvas linked programs the warm-up did not make"
    assert not any(thread == THREAD for thread, _ in linked)  # (done once)

    viewer2 = make_napari_viewer(show=True)
    _, cockpit2 = viewer2.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    qtbot.waitUntil(lambda: cockpit2.tabs_built, timeout=60000)
    assert cockpit2.shader_warmer.state == "skipped"


@pytest.mark.gui
def test_closing_the_window_stops_the_warm_up_and_joins_its_thread(make_napari_viewer, qtbot, mesa_cache,
                                                                    software_gl):
    viewer = make_napari_viewer(show=True)
    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    warmer = cockpit.shader_warmer
    qtbot.waitUntil(lambda: warmer._thread is not None, timeout=60000)  # drawing its stages, the thread replaying
    thread = warmer._thread
    viewer.close()
    assert not thread.is_alive()
    assert warmer.state in ("stopped", "done") and warmer._thread is None and warmer._surface is None
    assert warmer._canvas is None and not warmer._steps
    assert _gl_warmup.marker_path().exists() == (warmer.state == "done")  # no marker for a cache half warmed


_WARM_THEN_OPEN = """
import os, time
from pathlib import Path
import napari
from qtpy.QtWidgets import QApplication

def wait(done, seconds):
    end = time.time() + seconds
    while not done() and time.time() < end:
        QApplication.processEvents()
        time.sleep(0.01)

def entries():  # Mesa's cache entries (in its two-letter folders)
    folder = Path(os.environ["MESA_SHADER_CACHE_DIR"])
    return sum(1 for f in folder.rglob("*") if f.is_file() and f.parent.name != "mesa_shader_cache")

viewer = napari.Viewer(show=True)
wait(lambda: False, 1.0)
before = entries()
_, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
warmer = cockpit.shader_warmer
wait(lambda: cockpit.tabs_built and not warmer.running, 120)
wait(lambda: False, 0.5)  # (Mesa writes its entries from a thread of its own)
warmed = entries()
cockpit.data.sample_kwargs = {kwargs}
cockpit.data.sample_button.click()
wait(lambda: cockpit.state.document is not None and not cockpit.data.busy, 120)
wait(lambda: False, 1.5)
print("ENTRIES", warmer.state, before, warmed, entries())
viewer.close()
os._exit(0)
"""


@pytest.mark.slow
@pytest.mark.gui
def test_the_warm_up_fills_mesas_cache_and_the_sample_then_finds_most_of_its_programs_there(
        tmp_path, child_env, software_gl):
    """In a new napari session with an empty shader cache, the warm-up writes Mesa's cache entries, and opening the
    sample afterwards adds far fewer (the programs and most of their variants are read from the cache)."""
    env = dict(child_env, MESA_SHADER_CACHE_DIR=str(tmp_path / "mesa"), XDG_CACHE_HOME=str(tmp_path / "cache"),
               NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    script = textwrap.dedent(_WARM_THEN_OPEN).replace("{kwargs}", repr(SMALL))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    line = [text for text in out.stdout.splitlines() if text.startswith("ENTRIES")]
    assert line, out.stdout + out.stderr
    _, state, before, warmed, after = line[-1].split()
    before, warmed, after = int(before), int(warmed), int(after)
    assert state == "done"
    counts = f"entries: {before} at start, {warmed} after the warm-up, {after} after the sample"
    assert warmed - before >= 10, f"the warm-up wrote (almost) nothing into Mesa's cache ({counts})"
    assert after - warmed < (warmed - before) / 2, f"the sample compiled most of its programs again ({counts})"
    print(counts)
    assert os.path.isfile(tmp_path / "mesa" / "mesa_shader_cache" / _gl_warmup.MARKER_NAME)


@pytest.mark.gui
def test_a_failing_stage_ends_the_warm_up_quietly(make_napari_viewer, qtbot, monkeypatch, mesa_cache, software_gl):
    """A stage that raises: the warm-up says "failed", its thread ends with what it had, no marker is left (the
    next session tries again) and the cockpit is built as usual."""

    def broken(self, characters) -> None:
        raise RuntimeError("no font")

    monkeypatch.setattr(_gl_warmup.ShaderCacheWarmer, "_make_glyphs", broken)
    viewer = make_napari_viewer(show=True)
    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    warmer = cockpit.shader_warmer
    qtbot.waitUntil(lambda: cockpit.tabs_built and warmer.state == "failed" and warmer._thread is None,
                    timeout=60000)
    assert warmer._canvas is None and warmer._surface is None and not warmer._steps
    assert not _gl_warmup.marker_path().exists() and not _gl_warmup._WARMED.is_set()
