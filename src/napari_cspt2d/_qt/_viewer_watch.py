"""What any napari viewer does with a tilt series opened by napari-cspt2d, with or without the cockpit.

:func:`watch_viewer` (once per viewer, for its life) keeps the tilt label on the canvas (:mod:`._tilt_overlay`) and
fills a streamed sample inserted into the viewer in the background, with napari's progress bar
(:mod:`._sample_stream`); the first one makes vispy's shader parsing linear (:mod:`._shader_parse`). The npe2 hooks
call :func:`watch_current_viewer` (the stack reader, the sample), so the tilt angle shows as soon as a stack opens
from File > Open; the cockpit's Data tab calls :func:`watch_viewer`.
"""

from __future__ import annotations

import weakref

from qtpy.QtCore import QThread, QTimer
from qtpy.QtWidgets import QApplication

from . import _shader_parse
from ._sample_stream import fill_in_background
from ._tilt_overlay import connect_tilt_view

__all__ = ["watch_viewer", "watch_current_viewer"]

_WATCHED: dict[int, weakref.ref] = {}


def watch_viewer(viewer) -> None:
    """Make ``viewer`` show the tilt label and fill streamed samples (nothing if it already does)."""
    viewer = getattr(viewer, "__wrapped__", viewer)  # napari hands plugin widgets a proxy of the viewer
    key = id(viewer)
    known = _WATCHED.get(key)
    if known is not None and known() is viewer:
        return
    _WATCHED[key] = weakref.ref(viewer)
    weakref.finalize(viewer, _forget, key)
    _shader_parse.install()  # its visuals' programs are built faster (once per process)
    connect_tilt_view(viewer)
    ref = weakref.ref(viewer)
    viewer.layers.events.inserted.connect(lambda event: _fill_stream(event.value, ref))
    for layer in viewer.layers:
        _fill_stream(layer, ref)


def _forget(key: int) -> None:
    known = _WATCHED.get(key)
    if known is not None and known() is None:  # the id may already belong to a newer viewer
        del _WATCHED[key]


def watch_current_viewer() -> bool:
    """:func:`watch_viewer` on napari's current viewer, when called on the GUI thread; whether one was watched."""
    app = QApplication.instance()
    if app is None or QThread.currentThread() is not app.thread():
        return False
    from napari import current_viewer

    viewer = current_viewer()
    if viewer is None:
        return False
    watch_viewer(viewer)
    return True


def _fill_stream(layer, viewer_ref) -> None:
    """Fill the stream of a streamed sample's image ``layer`` unless it is finished or filled already."""
    meta = layer.metadata.get("cspt2d", {}) if isinstance(layer.metadata, dict) else {}
    stream = meta.get("stream")
    if stream is None or stream.complete or not stream.claim():
        return  # not streamed, or filled by whoever made it (the cockpit's Data tab)
    QTimer.singleShot(0, lambda: _fill_with_progress(layer, stream, viewer_ref))  # once the layers being added are in


def _fill_with_progress(layer, stream, viewer_ref) -> None:
    from napari.utils import progress

    bar = progress(total=len(stream.order), desc="Making the sample's tilts")
    bar.update(stream.done)
    fill_in_background(layer, stream, on_progress=lambda done, _: bar.update(done - bar.n), on_done=bar.close,
                       shown=lambda: _shown_section(layer, viewer_ref()))
    viewer = viewer_ref()
    if viewer is not None:
        weakref.finalize(viewer, stream.stop)  # the viewer gone: its tilts are no longer made


def _shown_section(layer, viewer) -> int:
    """The section of ``layer`` that ``viewer`` shows (-1 once the viewer is gone)."""
    return -1 if viewer is None else int(round(layer.world_to_data(viewer.dims.point)[0]))
