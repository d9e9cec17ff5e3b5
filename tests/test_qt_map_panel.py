"""The Run tab's docked map viewer: a new map replaces the layer's data, contrast limits and iso level, in the layer,
its visual and its thumbnail (assigned with one refresh, :mod:`napari_cspt2d._qt._layer_update`); the layer is made
before the first map; on a software OpenGL renderer the map shows as its central slice, and the "3D" button turns
the 3D view on with a click."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

from qtpy.QtCore import Qt  # noqa: E402

from napari_cspt2d._qt import results  # noqa: E402
from napari_cspt2d._qt._gl_info import gl_renderer, is_software_renderer  # noqa: E402
from napari_cspt2d._qt.results import MapPanel  # noqa: E402
from napari_cspt2d.runs import map_display  # noqa: E402


def _blob(box: int, sigma_px: float, peak: float) -> np.ndarray:
    z, y, x = np.mgrid[:box, :box, :box] - box / 2
    return peak * np.exp(-(x * x + y * y + z * z) / (2 * sigma_px**2))


GPU = "NVIDIA GeForce RTX 3060/PCIe/SSE2"
LLVMPIPE = "llvmpipe (LLVM 15.0.6, 256 bits)"


def new_panel(qtbot, monkeypatch, renderer: str) -> MapPanel:
    """A shown map panel that believes OpenGL is ``renderer``."""
    monkeypatch.setattr(results, "gl_renderer", lambda: renderer)
    panel = MapPanel()
    qtbot.addWidget(panel)
    panel.resize(400, 420)
    panel.show()
    qtbot.waitExposed(panel)
    return panel


def shown_panel(qtbot, monkeypatch, renderer: str) -> MapPanel:
    """:func:`new_panel`, built, its map layer prepared (made, hidden)."""
    panel = new_panel(qtbot, monkeypatch, renderer)
    qtbot.waitUntil(lambda: panel._qt_viewer is not None, timeout=5000)  # built in turns
    assert len(panel.model.layers) == 0  # no layer until asked (the first layer of a process costs more)
    panel.prepare()
    qtbot.waitUntil(lambda: panel._made is not None and panel._made in panel.model.layers, timeout=5000)
    return panel


def test_a_new_map_shows_with_its_own_contrast_and_iso_level(qtbot, monkeypatch):
    panel = new_panel(qtbot, monkeypatch, GPU)  # a map at once: the viewer and its layer are made for it
    panel.show_map(map_display(_blob(24, 3.0, 1.0), 2.0), "first")
    layer = panel.layer
    first_thumbnail = layer.thumbnail.copy()

    second = map_display(_blob(32, 6.0, 40.0) - 5.0, 3.0)  # other shape, voxel, range and iso level
    panel.show_map(second, "second")

    assert panel.layer is layer and layer.data is second.volume
    assert tuple(layer.scale) == (3.0, 3.0, 3.0)
    np.testing.assert_allclose(layer.contrast_limits, second.contrast_limits)
    np.testing.assert_allclose(layer.contrast_limits_range, second.contrast_limits)
    assert layer.iso_threshold == pytest.approx(second.iso_level)
    node = panel.qt_viewer.canvas.layer_to_visual[layer].node  # what is drawn
    np.testing.assert_allclose(node.clim, second.contrast_limits, rtol=1e-6)
    assert node.threshold == pytest.approx(second.iso_level)
    assert node._last_data.shape == second.volume.shape
    # the thumbnail is that of the new map with its contrast (one recomputed now is the same), not the first one's
    shown_thumbnail = layer.thumbnail.copy()
    layer._update_thumbnail()
    np.testing.assert_array_equal(shown_thumbnail, layer.thumbnail)
    assert not np.array_equal(shown_thumbnail, first_thumbnail)
    assert "_update_thumbnail" not in vars(layer)  # the per-block stand-in is gone
    panel.close_viewer()


def test_the_renderer_is_read_from_opengl():
    name = gl_renderer()
    assert name and name == gl_renderer()  # read once
    assert is_software_renderer(LLVMPIPE) and is_software_renderer("Mesa softpipe")
    assert is_software_renderer("Google SwiftShader") and is_software_renderer("Apple Software Renderer")
    assert not is_software_renderer(GPU) and not is_software_renderer("AMD Radeon RX 6800 (radeonsi, navi21)")


def test_the_map_layer_is_made_before_the_first_map(qtbot, monkeypatch):
    panel = shown_panel(qtbot, monkeypatch, GPU)
    made = panel._made
    assert [layer.name for layer in panel.model.layers] == ["map"] and not made.visible and panel.layer is None
    display = map_display(_blob(24, 3.0, 1.0), 2.0)
    panel.show_map(display, "first")
    assert panel.layer is made and made.visible and made.data is display.volume
    assert panel.is_3d and panel.model.dims.ndisplay == 3 and panel.view_3d_button.isChecked()
    assert panel.mode_label.text() == ""  # nothing to explain on a GPU
    panel.close_viewer()


def test_software_opengl_shows_a_slice_and_one_click_turns_3d_on(qtbot, monkeypatch):
    panel = shown_panel(qtbot, monkeypatch, LLVMPIPE)
    assert panel.software and not panel.is_3d and panel.model.dims.ndisplay == 2
    assert "software OpenGL (llvmpipe)" in panel.mode_label.text() and panel.mode_label.isVisible()
    assert "software" in panel.view_3d_button.toolTip()
    display = map_display(_blob(32, 5.0, 3.0), 2.5)
    panel.show_map(display, "first")
    layer = panel.layer
    # the full-resolution map is in the layer (only how it is drawn changes), its central z section drawn in grey
    assert layer.data is display.volume and layer.data.shape == (32, 32, 32)
    assert panel.model.dims.current_step[0] == 16 and layer.colormap.name == "gray"
    node = panel.qt_viewer.canvas.layer_to_visual[layer].node
    assert node._data.shape == (32, 32)  # a 2D image visual, not the volume's ray-cast
    qtbot.mouseClick(panel.view_3d_button, Qt.MouseButton.LeftButton)
    assert panel.is_3d and panel.model.dims.ndisplay == 3 and layer.rendering == "iso"
    assert layer.colormap.name == "bop orange" and "each draw takes" in panel.mode_label.text()
    node = panel.qt_viewer.canvas.layer_to_visual[layer].node
    assert node._last_data.shape == (32, 32, 32) and node.threshold == pytest.approx(display.iso_level)
    np.testing.assert_allclose(panel.model.camera.angles, results.MAP_VIEW_ANGLES)
    # a new map in 3D stays in 3D; a click goes back to the slice
    second = map_display(_blob(32, 4.0, 2.0), 2.5)
    panel.show_map(second, "second")
    assert panel.model.dims.ndisplay == 3 and layer.data is second.volume
    qtbot.mouseClick(panel.view_3d_button, Qt.MouseButton.LeftButton)
    assert not panel.is_3d and panel.model.dims.ndisplay == 2 and "Central slice" in panel.mode_label.text()
    panel.close_viewer()


def test_making_the_docked_viewer_refreshes_no_shortcut(qtbot, monkeypatch):
    """napari's ``QtViewer`` binds every shortcut again (the same ones): the map panel makes it without the ~180
    ``shortcut_changed`` events that refreshed every viewer's welcome screen and tooltips; the shortcuts are kept."""
    from napari.utils.action_manager import action_manager

    before = {name: list(keys) for name, keys in action_manager._shortcuts.items()}
    changes: list[object] = []
    action_manager.events.shortcut_changed.connect(changes.append)
    try:
        panel = new_panel(qtbot, monkeypatch, LLVMPIPE)
        assert panel.qt_viewer is not None
        assert changes == []
    finally:
        action_manager.events.shortcut_changed.disconnect(changes.append)
    assert {name: list(keys) for name, keys in action_manager._shortcuts.items()} == before
    panel.close_viewer()
