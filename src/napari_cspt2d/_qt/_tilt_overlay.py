"""What follows the tilt the viewer shows: the tilt label on the canvas, and the release of memory-mapped pages.

napari reads the shown section of a memory-mapped stack; those pages stay mapped (counted in the process's RSS)
until released, so scrolling through a 4 GB stack would slowly map all of it. Half a second after the last tilt
change, the pages of every tilt-series layer are released (the shown section is already on the GPU).
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable

from napari.layers import Image
from qtpy.QtCore import QTimer

from ..io.mrc import release_pages
from ._prebuild import build_in_turns

__all__ = ["connect_tilt_view", "tiltseries_layer", "tilt_label", "warm_label_glyphs", "warm_label_program",
           "RELEASE_DELAY_MS", "LABEL_CHARACTERS", "MEASURED_CHARACTERS", "PLACEHOLDER_TEXT"]

RELEASE_DELAY_MS = 500
#: The characters vispy measures every text's height with (``_text_to_vbo``): each text visual's font renders them.
MEASURED_CHARACTERS = "ÅÉÑŐjgpqy"
#: Those, then every character :func:`tilt_label` writes, those of the first label shown first.
LABEL_CHARACTERS = MEASURED_CHARACTERS + "tilt 20of–4+.°1356789-"
#: The text the hidden overlay holds while its program is built (:func:`warm_label_program`).
PLACEHOLDER_TEXT = "tilt"
GLYPHS_PER_TURN = 2
GLYPH_DELAY_MS = 20


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


def _label_font(viewer):
    """The texture font the canvas's text overlay draws with (napari 0.9: one Qt-rendered font per canvas, shared by
    its text visuals), or None where it cannot be found (another napari, no window)."""
    try:
        with warnings.catch_warnings():  # napari 0.9 warns of private access from a plugin's code
            warnings.simplefilter("ignore", FutureWarning)
            font_info = viewer.window._qt_viewer.canvas.font_info
        font_info = font_info() if callable(font_info) else font_info  # a method in napari 0.9
        return font_info.font_manager.get_font(font_info.face)
    except Exception:  # noqa: BLE001 - a private path: without it the glyphs are made when first drawn, as usual
        return None


def warm_label_glyphs(viewer, characters: str = LABEL_CHARACTERS) -> bool:
    """Make the glyphs of the tilt label in the canvas's text font ahead of time, :data:`GLYPHS_PER_TURN` per turn
    of the event loop: each new glyph costs ~8 ms (Qt render + CPU distance field), which the first label drawn
    (~15 glyphs) otherwise paid inside the paint of the first image; then the label's shader program
    (:func:`warm_label_program`). Returns whether the font was found."""
    font = _label_font(viewer)
    if font is None:
        return False
    todo = list(dict.fromkeys(characters))

    def step() -> None:
        for char in todo[:GLYPHS_PER_TURN]:
            font[char]  # made once; later calls return the stored glyph
        del todo[:GLYPHS_PER_TURN]
        if todo:
            QTimer.singleShot(GLYPH_DELAY_MS, step)
        else:
            warm_label_program(viewer)

    QTimer.singleShot(GLYPH_DELAY_MS, step)
    return True


def warm_label_program(viewer) -> None:
    """Build the text overlay's shader program while it is hidden, in turns of their own (:mod:`._prebuild`): its
    first draw (~40 ms in software OpenGL, most of it vispy's Python build of the text program) otherwise came in
    the paint of the first image. napari makes an overlay's visuals when it is first shown, and vispy builds a text's
    program only once it has text: the overlay is given :data:`PLACEHOLDER_TEXT` and shown and hidden again in this
    turn (no paint comes in between: nothing is drawn), and gets its empty text back after the build, unless a label
    came meanwhile."""
    overlay = viewer.canvas.overlays.text
    if overlay.visible or overlay.text:
        return  # a label is shown (its program was built when it was drawn)
    overlay.text = PLACEHOLDER_TEXT
    overlay.visible = True
    overlay.visible = False

    def done() -> None:
        if not overlay.visible and overlay.text == PLACEHOLDER_TEXT:
            overlay.text = ""

    build_in_turns(viewer, overlay, done, first=False)


def _release(viewer_ref: weakref.ref) -> None:
    """Release the mapped pages of the viewer's tilt series (nothing once the viewer is gone or its layers removed; a
    mapping closed meanwhile is skipped)."""
    viewer = viewer_ref()
    if viewer is None:
        return
    for layer in _tiltseries_layers(viewer):
        with contextlib.suppress(ValueError, OSError, BufferError):  # e.g. "mmap closed or invalid"
            release_pages(layer.data)


def connect_tilt_view(viewer) -> Callable[[], None]:
    """Keep the canvas text overlay showing :func:`tilt_label` and release mapped pages after tilt changes;
    returns a function that disconnects both.

    The release timer holds the viewer only weakly, runs only while a tilt series is shown in it (it is stopped when
    the last one is removed, e.g. as the viewer closes: ``Viewer.close`` removes every layer) and is stopped when
    disconnected; ``disconnect.timer`` is the timer."""
    overlay = viewer.canvas.overlays.text
    timer = QTimer()
    timer.setSingleShot(True)
    timer.setInterval(RELEASE_DELAY_MS)
    ref = weakref.ref(viewer)
    timer.timeout.connect(lambda: _release(ref))

    def update(event=None) -> None:
        text = tilt_label(viewer)
        overlay.text = text
        overlay.visible = bool(text)
        if _tiltseries_layers(viewer):
            timer.start()
        else:  # nothing mapped to release (the viewer may be closing)
            timer.stop()

    def inserted(event) -> None:
        event.value.events.visible.connect(update)  # the label names the top *visible* tilt series
        update()

    def removed(event) -> None:
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            event.value.events.visible.disconnect(update)
        update()

    overlay.position = "top_left"
    overlay.font_size = 12
    viewer.dims.events.current_step.connect(update)
    viewer.layers.events.inserted.connect(inserted)
    viewer.layers.events.removed.connect(removed)
    for layer in viewer.layers:
        layer.events.visible.connect(update)
    update()
    if not overlay.visible:  # no label yet: its glyphs are made now, while the window is idle
        warm_label_glyphs(viewer)

    def disconnect() -> None:
        timer.stop()
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            viewer.dims.events.current_step.disconnect(update)
            viewer.layers.events.inserted.disconnect(inserted)
            viewer.layers.events.removed.disconnect(removed)
            for layer in viewer.layers:
                layer.events.visible.disconnect(update)

    disconnect.timer = timer
    return disconnect
