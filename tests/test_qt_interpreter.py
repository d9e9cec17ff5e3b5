"""The interpreter tuned while the cockpit's window is open, so that background threads do not freeze the GUI thread
(long-lived objects frozen out of full garbage collections, a shorter switch interval), undone when it closes."""

from __future__ import annotations

import gc
import sys

import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

from napari_cspt2d._qt._interpreter import FULL_COLLECTION_AFTER, SWITCH_INTERVAL_S  # noqa: E402


def test_the_cockpit_tunes_the_interpreter_until_the_window_closes(make_napari_viewer, qtbot):
    gc.unfreeze()
    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    viewer = make_napari_viewer(show=True)
    viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    assert gc.get_freeze_count() > 50_000  # napari, Qt wrappers, the cockpit: out of full collections
    assert sys.getswitchinterval() == min(interval, SWITCH_INTERVAL_S)
    assert gc.get_threshold() == (*thresholds[:2], max(thresholds[2], FULL_COLLECTION_AFTER)) != thresholds
    qtbot.waitExposed(viewer.window._qt_window)
    qtbot.wait(100)
    viewer.close()  # the window's close event: the cockpit's session ends
    assert gc.get_freeze_count() == 0 and sys.getswitchinterval() == interval and gc.get_threshold() == thresholds
