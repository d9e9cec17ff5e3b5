"""The current tilt (section and angle) written on the canvas as the user steps through the tilt series."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

from napari.layers import Image

__all__ = ["connect_tilt_overlay", "tiltseries_layer", "tilt_label"]


def tiltseries_layer(viewer) -> Image | None:
    """The top visible tilt-series image layer (opened by napari-cspt2d), if any."""
    for layer in reversed(viewer.layers):
        if isinstance(layer, Image) and layer.visible and layer.metadata.get("cspt2d", {}).get("role") == "tiltseries":
            return layer
    return None


def tilt_label(viewer) -> str:
    """``"tilt 20/41  +0.0°"`` for the section shown, or ``""`` without a tilt series."""
    layer = tiltseries_layer(viewer)
    if layer is None:
        return ""
    angles = layer.metadata["cspt2d"]["tilt_angles_deg"]
    section = int(round(layer.world_to_data(viewer.dims.point)[0]))
    if not 0 <= section < len(angles):
        return ""
    angle = angles[section]
    text = f"tilt {section}/{len(angles)}"
    return text if angle is None or math.isnan(angle) else f"{text}  {angle:+.1f}°"


def connect_tilt_overlay(viewer) -> Callable[[], None]:
    """Keep the canvas text overlay showing :func:`tilt_label`; returns a function that disconnects it."""
    overlay = viewer.canvas.overlays.text

    def update(event=None) -> None:
        text = tilt_label(viewer)
        overlay.text = text
        overlay.visible = bool(text)

    overlay.position = "top_left"
    overlay.font_size = 12
    viewer.dims.events.current_step.connect(update)
    viewer.layers.events.inserted.connect(update)
    viewer.layers.events.removed.connect(update)
    update()

    def disconnect() -> None:
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            viewer.dims.events.current_step.disconnect(update)
            viewer.layers.events.inserted.disconnect(update)
            viewer.layers.events.removed.disconnect(update)

    return disconnect
