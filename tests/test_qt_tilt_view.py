"""The tilt view's release of mapped pages (:func:`connect_tilt_view`): after a tilt change, the pages of the tilt
series are released once; the timer stops when the viewer's tilt series are gone (the viewer closing) or the view is
disconnected, so it never fires on a closed viewer. Real shown napari viewers (Xvfb); no timing asserted."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

from napari_cspt2d._qt import _tilt_overlay  # noqa: E402
from napari_cspt2d._qt._tilt_overlay import RELEASE_DELAY_MS, connect_tilt_view  # noqa: E402


@pytest.fixture
def released(monkeypatch):
    calls: list[object] = []
    real = _tilt_overlay.release_pages

    def counting(array):
        calls.append(array)
        return real(array)

    monkeypatch.setattr(_tilt_overlay, "release_pages", counting)
    return calls


def _mapped_series(viewer, tmp_path):
    data = np.lib.format.open_memmap(tmp_path / "stack.npy", mode="w+", dtype=np.float32, shape=(3, 32, 32))
    data[:] = np.arange(3, dtype=np.float32)[:, None, None]
    data.flush()
    stack = np.load(tmp_path / "stack.npy", mmap_mode="r")
    return viewer.add_image(stack, metadata={"cspt2d": {"role": "tiltseries", "tilt_angles_deg": [-10.0, 0.0, 10.0]}})


def test_pages_are_released_after_a_tilt_change(make_napari_viewer, qtbot, tmp_path, released):
    viewer = make_napari_viewer(show=True)
    disconnect = connect_tilt_view(viewer)
    layer = _mapped_series(viewer, tmp_path)
    viewer.dims.set_current_step(0, 2)
    qtbot.waitUntil(lambda: len(released) >= 1, timeout=5000)
    assert released[-1] is layer.data and not disconnect.timer.isActive()
    disconnect()


def test_the_release_timer_stops_with_the_viewer(make_napari_viewer, qtbot, tmp_path, released):
    """``Viewer.close`` removes every layer, then closes the window: no release is left pending on it."""
    viewer = make_napari_viewer(show=True)
    disconnect = connect_tilt_view(viewer)
    _mapped_series(viewer, tmp_path)
    viewer.dims.set_current_step(0, 1)
    assert disconnect.timer.isActive()
    viewer.close()
    assert not disconnect.timer.isActive()
    qtbot.wait(RELEASE_DELAY_MS + 200)
    assert released == []


def test_the_release_timer_stops_when_disconnected(make_napari_viewer, qtbot, tmp_path, released):
    viewer = make_napari_viewer(show=True)
    disconnect = connect_tilt_view(viewer)
    _mapped_series(viewer, tmp_path)
    viewer.dims.set_current_step(0, 1)
    disconnect()
    assert not disconnect.timer.isActive()
    viewer.dims.set_current_step(0, 2)
    qtbot.wait(RELEASE_DELAY_MS + 200)
    assert released == [] and not disconnect.timer.isActive()
