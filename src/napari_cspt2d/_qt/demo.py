"""``make demo`` with a display: napari with the plugin docked and the sample loaded."""

from __future__ import annotations


def run_gui() -> int:
    """Open napari with the sample tilt series, its tracks and the plugin's dock widgets."""
    import napari

    viewer = napari.Viewer(title="napari-cspt2d demo")
    viewer.open_sample("napari-cspt2d", "synthetic")
    for widget in ("Tracks curation", "Parameters", "Run"):
        viewer.window.add_plugin_dock_widget("napari-cspt2d", widget)
    napari.run()
    return 0
