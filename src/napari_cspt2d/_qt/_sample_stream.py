"""Fill a streamed sample's stack in a worker thread while its first tilt is already shown.

The tilts are made by a child process at a lower priority (:meth:`napari_cspt2d._sample_data.SampleStream.
fill_in_child`): the worker thread only reads them into the array the image layer shows, so the GUI thread, which
adds and first draws the sample's layers meanwhile, no longer waits for the interpreter lock the rendering held. The
child is stopped when ``stop_with`` (a widget, e.g. the cockpit's Data tab) is destroyed, when the application quits
and at exit;
the GUI thread moves the progress once per batch of tilts (about every 0.25 s) and redraws the layer only when the
tilt it shows was made in the batch (the tilt shown first is made before the layer is added; a redraw of a 1k × 1k
tilt costs 20–60 ms of GUI-thread work in software OpenGL).
"""

from __future__ import annotations

import atexit
import weakref
from collections.abc import Callable
from typing import Any

from napari.qt.threading import create_worker
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QApplication

#: The streams being filled (their child processes are ended at exit).
_FILLING: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for stream in list(_FILLING):
        stream.stop()

__all__ = ["fill_in_background"]


def _safe(shown: Callable[[], int]) -> int | None:
    try:
        return int(shown())
    except Exception:  # noqa: BLE001 - a closed viewer: no redraw
        return None


def fill_in_background(layer, stream: Any, *, on_progress: Callable[[int, int], None] | None = None,
                       on_done: Callable[[], None] | None = None, shown: Callable[[], int] | None = None,
                       stop_with=None):
    """Start filling ``stream`` (a ``SampleStream`` the caller has claimed, shown by image ``layer``) in a worker
    thread; ``on_progress(done, total)`` after each batch, ``on_done()`` when the worker ends (finished or failed).
    ``shown()`` is the section the viewer shows: the layer is redrawn after a batch that made it (without
    ``shown``, after every batch). The tilts are made in a child process, stopped (:meth:`~napari_cspt2d.
    _sample_data.SampleStream.stop`) when the QObject ``stop_with`` is destroyed or the application quits.
    Returns the worker."""
    worker = create_worker(stream.fill_in_child, _start_thread=False, _ignore_errors=True)
    _FILLING.add(stream)
    stop = stream.stop  # a bound method: the connections keep the stream, not the layer
    if stop_with is not None:
        stop_with.destroyed.connect(lambda *_: stop())
    app = QApplication.instance()
    if app is not None:
        app.aboutToQuit.connect(stop)
        worker.finished.connect(lambda: _disconnect(app.aboutToQuit, stop))
    before = [stream.done]  # tilts made when the layer was last drawn

    def made(progress: tuple[int, int]) -> None:
        done = progress[0]
        new = stream.order[before[0]:done]
        before[0] = done
        if shown is None or _safe(shown) in set(new):
            layer.refresh()
        if on_progress is not None:
            on_progress(*progress)

    worker.yielded.connect(made)
    worker.errored.connect(lambda exc: show_error(f"Sample: failed: {type(exc).__name__}: {exc}"))
    if on_done is not None:
        worker.finished.connect(on_done)
    worker.start()
    return worker


def _disconnect(signal, slot) -> None:
    try:
        signal.disconnect(slot)
    except (TypeError, RuntimeError):  # pragma: no cover - already gone
        pass
