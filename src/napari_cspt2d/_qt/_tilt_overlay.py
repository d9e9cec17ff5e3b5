"""What follows the tilt the viewer shows: the tilt label on the canvas, and the release of memory-mapped pages.

napari reads the shown section of a memory-mapped stack; those pages stay mapped (counted in the process's RSS)
until released, so scrolling through a 4 GB stack would slowly map all of it. Half a second after the last tilt
change, the pages of every tilt-series layer are released (the shown section is already on the GPU).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

from napari.layers import Image
from qtpy.QtCore import QTimer

from ..io.mrc import release_pages

__all__ = ["connect_tilt_view", "tiltseries_layer", "tilt_label", "RELEASE_DELAY_MS"]

RELEASE_DELAY_MS = 500


def _tiltseries_layers(viewer) -> list[Image]:
    return [layer for layer in viewer.layers
            if isinstance(layer, Image) and layer.metadata.get("cspt2d", {}).get("role") == "tiltseries"]


def tiltseries_layer(viewer) -> Image | None:
    """The top visible tilt-series image layer (opened by napari-cspt2d), if any."""
    visible = [layer for layer in _tiltseries_layers(viewer) if layer.visible]
    return visible[-1] if visible else None


def tilt_label(viewer) -> str:
    """``"tilt 20 of 0–40  +0.0°"`` for the section shown (numbered from 0, as napari's slider counts), or ``""``
    without a tilt series."""
    layer = tiltseries_layer(viewer)
    if layer is None:
        return ""
    angles = layer.metadata["cspt2d"]["tilt_angles_deg"]
    section = int(round(layer.world_to_data(viewer.dims.point)[0]))
    if not 0 <= section < len(angles):
        return ""
    angle = angles[section]
    text = f"tilt {section} of 0–{len(angles) - 1}"
    return text if angle is None or math.isnan(angle) else f"{text}  {angle:+.1f}°"


def connect_tilt_view(viewer) -> Callable[[], None]:
    """Keep the canvas text overlay showing :func:`tilt_label` and release mapped pages after tilt changes;
    returns a function that disconnects both."""
    overlay = viewer.canvas.overlays.text
    timer = QTimer()
    timer.setSingleShot(True)
    timer.setInterval(RELEASE_DELAY_MS)
    timer.timeout.connect(lambda: [release_pages(layer.data) for layer in _tiltseries_layers(viewer)])

    def update(event=None) -> None:
        text = tilt_label(viewer)
        overlay.text = text
        overlay.visible = bool(text)
        timer.start()

    overlay.position = "top_left"
    overlay.font_size = 12
    viewer.dims.events.current_step.connect(update)
    viewer.layers.events.inserted.connect(update)
    viewer.layers.events.removed.connect(update)
    update()

    def disconnect() -> None:
        timer.stop()
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            viewer.dims.events.current_step.disconnect(update)
            viewer.layers.events.inserted.disconnect(update)
            viewer.layers.events.removed.disconnect(update)

    return disconnect
