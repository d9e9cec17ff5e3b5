"""``make demo`` with a display: napari sized to the screen, the cockpit docked, the sample opened from it."""

from __future__ import annotations


def fit_to_screen(viewer) -> None:
    """Size the main window to the screen it is on (at most 1600 × 1000), so it fits a 1366 × 768 laptop."""
    window = viewer.window._qt_window
    screen = window.screen().availableGeometry()
    window.resize(min(screen.width(), 1600), min(screen.height(), 1000))
    window.move(screen.topLeft())


def run_gui() -> int:
    """Open napari with the cockpit; the sample opens in a worker (from the cache after the first time)."""
    import napari

    viewer = napari.Viewer(title="napari-cspt2d demo")
    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    fit_to_screen(viewer)
    cockpit.data.open_sample()
    napari.run()
    return 0
