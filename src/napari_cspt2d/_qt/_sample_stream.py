"""Fill a streamed sample's stack in a worker thread while its first tilt is already shown.

The worker makes the tilts (:class:`napari_cspt2d._sample_data.SampleStream`) into the array the image layer shows;
the GUI thread only redraws the layer once per batch of tilts (about every 0.25 s) and moves the progress.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from napari.qt.threading import create_worker
from napari.utils.notifications import show_error

__all__ = ["fill_in_background"]


def fill_in_background(layer, stream: Any, *, on_progress: Callable[[int, int], None] | None = None,
                       on_done: Callable[[], None] | None = None):
    """Start filling ``stream`` (a ``SampleStream`` the caller has claimed, shown by image ``layer``) in a worker
    thread; ``on_progress(done, total)`` after each batch, ``on_done()`` when the worker ends (finished or failed).
    Returns the worker."""
    worker = create_worker(stream.fill, _start_thread=False, _ignore_errors=True)

    def made(progress: tuple[int, int]) -> None:
        layer.refresh()
        if on_progress is not None:
            on_progress(*progress)

    worker.yielded.connect(made)
    worker.errored.connect(lambda exc: show_error(f"Sample: failed: {type(exc).__name__}: {exc}"))
    if on_done is not None:
        worker.finished.connect(on_done)
    worker.start()
    return worker
