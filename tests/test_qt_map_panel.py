"""The Run tab's docked map viewer: a new map replaces the layer's data, contrast limits and iso level, in the layer,
its visual and its thumbnail (assigned with one refresh, :mod:`napari_cspt2d._qt._layer_update`)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

from napari_cspt2d._qt.results import MapPanel  # noqa: E402
from napari_cspt2d.runs import map_display  # noqa: E402


def _blob(box: int, sigma_px: float, peak: float) -> np.ndarray:
    z, y, x = np.mgrid[:box, :box, :box] - box / 2
    return peak * np.exp(-(x * x + y * y + z * z) / (2 * sigma_px**2))


def test_a_new_map_shows_with_its_own_contrast_and_iso_level(qtbot):
    panel = MapPanel()
    qtbot.addWidget(panel)
    panel.resize(400, 420)
    panel.show()
    qtbot.waitExposed(panel)
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
