"""Where the jobs run: in this process or on dask, with the cluster started for a run and closed early.

:class:`Executor` runs jobs one after the other in this process (a serial run) or on a dask client, reporting
progress per job, and collects the half-map grids every process filled. :func:`run_client` starts the client a run
uses (:func:`napari_cspt2d.cluster.make_client`, with :data:`QUIET_WORKERS`) and :class:`EarlyClose` stops it in a
thread once no more jobs will come, while the main process finishes the last map. :class:`Background` runs what
nothing in the run waits for (the FSC plots) on a thread.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..model.settings import Settings
from . import refine
from .jobs import BundleJob, InsertJob, take_inserted_grids
from .reconstruct import InsertedGrids

__all__ = ["QUIET_WORKERS", "Executor", "Background", "EarlyClose", "run_client"]


#: dask settings for the workers this pipeline starts: no statistical profiler (it samples every worker thread each
#: 10 ms) and slower housekeeping ticks. On 2 cores the defaults made even *idle* workers slow the reconstruction
#: in the main process by 30-60 %.
QUIET_WORKERS = {"distributed.worker.profile.enabled": False, "distributed.admin.tick.interval": "500ms",
                 "distributed.worker.memory.monitor-interval": "1s"}


class Executor:
    """Runs jobs in this process (``client`` None) or on a dask client; reports progress per job. ``release()``
    says no more jobs will come: a cluster started for the run closes then, while the last map is finished."""

    def __init__(self, client: Any, stage: refine._Stage, release: Callable[[], None]) -> None:
        self.client, self.stage, self.release = client, stage, release

    def run(self, function: Callable[[Any], Any], jobs: Sequence[BundleJob | InsertJob], label: str) -> list[Any]:
        """``function(job)`` of every job, in the jobs' order."""
        self.stage(label, 0, len(jobs))
        if self.client is None:
            out = []
            for i, job in enumerate(jobs):
                out.append(function(job))
                self.stage(label, i + 1, len(jobs))
            return out
        from distributed import as_completed

        token = os.urandom(4).hex()
        with warnings.catch_warnings():  # the jobs carry their particles' tracks by design (~0.1 MB per job)
            warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
            futures = self.client.map(function, jobs, pure=False,
                                      key=[f"cspt-{j.label.replace(' ', '-')}-{token}" for j in jobs])
        index = {f.key: i for i, f in enumerate(futures)}
        out: list[Any] = [None] * len(jobs)
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                out[index[future.key]] = future.result()
                self.stage(label, done, len(jobs))
        except BaseException:
            self.client.cancel(futures)
            raise
        return out

    def take_grids(self, key: str) -> list[tuple[InsertedGrids, list[str]]]:
        """Every process's grids of map ``key`` (:func:`take_inserted_grids`); the processes forget them."""
        found = [take_inserted_grids(key)]
        if self.client is not None:
            found += self.client.run(take_inserted_grids, key).values()
        return [f for f in found if f is not None]

    def run_into_map(self, function: Callable[[Any], Any], jobs: Sequence[BundleJob | InsertJob], label: str,
                     key: str) -> tuple[list[Any], list[tuple[InsertedGrids, list[str]]]]:
        """:meth:`run` jobs that insert into map ``key``, then take the grids; on an error the grids are dropped."""
        try:
            out = self.run(function, jobs, label)
        except BaseException:
            with contextlib.suppress(Exception):
                self.take_grids(key)
            raise
        return out, self.take_grids(key)


class Background:
    """Work for the main process while it waits for the workers: the FSC plot of each map (nothing in the run reads
    it; matplotlib takes ~0.1 s a plot, ~1 s to import). Leaving the ``with`` block waits for it; its first error
    is raised then, unless the block itself raised."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cspt-plots")
        self.pending: list[Future[Any]] = []

    def submit(self, function: Callable[..., Any], *args: Any) -> None:
        self.pending.append(self.pool.submit(function, *args))

    def __enter__(self) -> Background:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.pool.shutdown(wait=True)
        if exc_type is None:
            for future in self.pending:
                future.result()


class EarlyClose:
    """Closes a dask ``client`` and the cluster it runs on (both started for the run by ``context``): in a thread
    from :meth:`start` on, so the cluster stops while the main process finishes the last map; :meth:`finish` waits
    for that thread and then leaves ``context`` in this thread (its closes are then no-ops; the client's context
    variable can only be reset in the thread that set it)."""

    def __init__(self, context: contextlib.AbstractContextManager[Any], client: Any) -> None:
        self.context, self.client = context, client
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _close(self) -> None:
        try:
            self.client.close()
            if self.client.cluster is not None:
                self.client.cluster.close()
        except BaseException as exc:  # raised in the main thread by finish()
            self.error = exc

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._close, name="cspt-close-cluster", daemon=True)
            self.thread.start()

    def finish(self, exc_info: tuple[Any, Any, Any] = (None, None, None)) -> bool:
        """Wait for an early close and leave the context (with the exception of ``exc_info``, if any); True when the
        context handled that exception. Raises what closing raised when nothing else is being raised."""
        if self.thread is not None:
            self.thread.join()
        handled = bool(self.context.__exit__(*exc_info))
        if self.error is not None and exc_info[1] is None:
            raise self.error
        return handled


@contextlib.contextmanager
def run_client(client: Any, serial: bool, settings: Settings, workers: int | None, n_jobs: int,
               root: Path) -> Iterator[tuple[Any, Callable[[], None]]]:
    """``(client, release)``: the dask client to use (None: run in this process) and the function that closes a
    cluster started here early (:class:`EarlyClose`); it is closed on exit at the latest."""
    if serial or client is not None:
        yield None if serial else client, lambda: None
        return
    import dask

    from ..cluster import make_client

    with dask.config.set(QUIET_WORKERS):
        context = make_client(settings, workers=workers, tasks=max(1, n_jobs), project_dir=root, dashboard=False)
        started = context.__enter__()
        closer = EarlyClose(context, started)
        try:
            yield started, closer.start
        except BaseException:
            if not closer.finish(sys.exc_info()):
                raise
        else:
            closer.finish()
