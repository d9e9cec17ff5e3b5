"""Opening the cockpit: the GL warm-up's stand-in layers are made in the import thread before the tabs are built (no
thread runs Python beside the tabs' building, where each GUI-thread call into Qt waited for the interpreter lock
again)."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("pytestqt")

from napari_cspt2d._qt import _gl_warmup  # noqa: E402
from napari_cspt2d._qt.cockpit import TABS, Cockpit  # noqa: E402


@pytest.fixture
def warming(monkeypatch, tmp_path):
    """A warm-up is needed (an empty Mesa cache folder)."""
    monkeypatch.setenv("MESA_SHADER_CACHE_DIR", str(tmp_path / "mesa"))
    monkeypatch.setattr(_gl_warmup, "needs_warming", lambda: True)
    monkeypatch.setattr(_gl_warmup._WARMED, "is_set", lambda: False)


@pytest.mark.gui
def test_the_stand_in_layers_are_made_in_the_import_thread_before_the_tabs_are_built(
        make_napari_viewer, qtbot, monkeypatch, warming):
    made: list[tuple[str, int]] = []  # (thread, tabs built then)
    building: list[bool] = []  # at each piece of a tab built: whether a thread makes the stand-in layers
    cockpits: list[Cockpit] = []
    make, build = _gl_warmup.stand_in_layers, Cockpit._build_now

    def made_noted():
        made.append((threading.current_thread().name, len(cockpits[0]._built) if cockpits else -1))
        return make()

    def build_noted(self, index):
        building.append(self.shader_warmer._maker is not None)
        return build(self, index)

    monkeypatch.setattr(_gl_warmup, "stand_in_layers", made_noted)
    monkeypatch.setattr(Cockpit, "_build_now", build_noted)
    viewer = make_napari_viewer(show=True)
    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    cockpits.append(cockpit)
    warmer = cockpit.shader_warmer
    qtbot.waitUntil(lambda: warmer.state not in ("idle", "drawing", "compiling"), timeout=60_000)
    assert warmer.state == "done" and cockpit.tabs_built
    assert len(made) == 1 and made[0][0] != threading.main_thread().name and made[0][1] <= 0
    assert len(building) >= len(TABS) and not any(building)
    assert warmer._prepared is None


def test_a_marker_or_a_disabled_cache_makes_no_stand_in_layers(monkeypatch, tmp_path):
    monkeypatch.setenv("MESA_SHADER_CACHE_DIR", str(tmp_path / "mesa"))
    monkeypatch.setattr(_gl_warmup._WARMED, "is_set", lambda: False)
    assert _gl_warmup.may_need_warming()
    monkeypatch.setenv("MESA_SHADER_CACHE_DISABLE", "1")
    assert not _gl_warmup.may_need_warming()
    monkeypatch.delenv("MESA_SHADER_CACHE_DISABLE")
    _gl_warmup.marker_path().parent.mkdir(parents=True)
    _gl_warmup.marker_path().write_text("{}")
    assert not _gl_warmup.may_need_warming()
    warmer = _gl_warmup.ShaderCacheWarmer()
    warmer.prepare()
    assert warmer._prepared is None
