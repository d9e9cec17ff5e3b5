"""npe2 sample data: the synthetic tilt series (40 particles × 41 tilts, 1k × 1k) with its picked tracks.

Making the whole sample takes seconds (every particle's projection is rendered analytically), so it streams: the
tracks and the tilt napari shows first are ready in about a tenth of a second, and a :class:`SampleStream` makes the
other tilts, nearest first (:func:`napari_cspt2d.sample.tilt_order`), into the same array while the user looks. In
a napari window the stream is filled in the background (by a child process at a lower priority,
:meth:`SampleStream.fill_in_child`) with progress (``_qt/_sample_stream.py``: the cockpit's
Data tab, or File > Open Sample through :func:`open_sample_data`); elsewhere :func:`make_sample_data` returns the
finished sample. The finished sample is kept in the user cache folder (``$XDG_CACHE_HOME/napari-cspt2d/samples/``, an
``.npy`` stack memory-mapped on the next opening and an ``.npz`` of the track arrays, written atomically); the key is a
hash of the arguments and of ``sample.py`` itself, so a changed sample is never served stale. Later openings show the
whole sample at once.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import _sample_child
from . import sample as sample_module
from ._reader import follow_in_current_viewer, series_layer_data
from .io.atomic import atomic_open
from .model.tiltseries import TiltSeries
from .model.tracks import ParticleTable, TiltTable, TrackSet
from .sample import SamplePlan, first_tilt, tilt_order

__all__ = ["SAMPLE_SOURCE", "SampleStream", "make_sample_data", "open_sample_data", "sample_layers",
           "sample_cache_folder"]

#: The autosave key of the sample's tracks (it has no file).
SAMPLE_SOURCE = "napari-cspt2d:sample"
_TRACK_FIELDS = ("particle", "tilt", "shift_px", "score", "occupancy")
_PARTICLE_FIELDS = ("id", "xyz_px", "euler_deg")
_TILT_FIELDS = ("id", "angle_deg", "defocus_um", "axis_deg", "dose", "order")


def sample_cache_folder() -> Path:
    """``$XDG_CACHE_HOME/napari-cspt2d/samples`` (default ``~/.cache/...``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "napari-cspt2d" / "samples"


def _cache_key(kwargs: dict[str, Any]) -> str:
    digest = hashlib.sha1(inspect.getsource(sample_module).encode())
    digest.update(json.dumps(kwargs, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _save(folder: Path, key: str, stack: np.ndarray, tracks: TrackSet, pixel_A: float, params: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {f"t_{f}": getattr(tracks, f) for f in _TRACK_FIELDS}
    arrays |= {f"p_{f}": getattr(tracks.particles, f) for f in _PARTICLE_FIELDS}
    arrays |= {f"a_{f}": getattr(tracks.tilts, f) for f in _TILT_FIELDS}
    arrays["shape_yx"] = np.asarray(tracks.image_shape_yx)
    arrays["pixel_A"] = np.asarray(pixel_A)
    arrays["params"] = np.asarray(json.dumps(params))
    with atomic_open(folder / f"{key}.npy") as fh:
        np.save(fh, np.ascontiguousarray(stack, dtype=np.float32))
    with atomic_open(folder / f"{key}.npz") as fh:  # last: its presence says the pair is complete
        np.savez(fh, **arrays)


def _load(folder: Path, key: str) -> tuple[np.ndarray, TrackSet, float, dict] | None:
    stack_path, tracks_path = folder / f"{key}.npy", folder / f"{key}.npz"
    if not (stack_path.is_file() and tracks_path.is_file()):
        return None
    try:
        with np.load(tracks_path, allow_pickle=False) as z:
            particles = ParticleTable(*(z[f"p_{f}"] for f in _PARTICLE_FIELDS))
            tilts = TiltTable(*(z[f"a_{f}"] for f in _TILT_FIELDS))
            tracks = TrackSet(*(z[f"t_{f}"] for f in _TRACK_FIELDS), particles, tilts,
                              tuple(int(v) for v in z["shape_yx"]))
            pixel_A, params = float(z["pixel_A"]), json.loads(str(z["params"]))
        stack = np.load(stack_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, KeyError):
        return None  # unreadable (interrupted, other numpy): made again
    return stack, tracks, pixel_A, params


class SampleStream:
    """The stack ``(n_tilts, ny, nx)`` float32 of a :class:`~napari_cspt2d.sample.SamplePlan`, made tilt by tilt in
    :func:`~napari_cspt2d.sample.tilt_order` into ``stack`` (the first tilt when the stream is made; the sections not
    made yet are 0). :meth:`fill` makes the others; the finished sample is then saved in the cache (``save_to`` =
    ``(folder, key)``, or None). A stream is filled once: :meth:`claim` says who does it."""

    def __init__(self, plan: SamplePlan, save_to: tuple[Path, str] | None = None) -> None:
        ny, nx = plan.shape_yx
        self.plan = plan
        self.stack = np.zeros((plan.n_tilts, ny, nx), np.float32)
        self.order = tilt_order(plan.n_tilts)
        self.done = 0  # tilts made, in ``order``
        self._save_to = save_to
        self._claimed = False
        self._stopped = False
        self._child: subprocess.Popen | None = None
        self._make_next()

    @property
    def complete(self) -> bool:
        return self.done == len(self.order)

    @property
    def claimed(self) -> bool:
        """Whether someone fills (or filled) the stream."""
        return self._claimed

    def claim(self) -> bool:
        """True the first time only: the caller fills the stream (with :meth:`fill`)."""
        claimed, self._claimed = self._claimed, True
        return not claimed

    def _make_next(self) -> None:
        section = self.order[self.done]
        self.stack[section] = self.plan.render_tilt(section)
        self.done += 1

    def fill(self, batch_s: float = 0.25) -> Iterator[tuple[int, int]]:
        """Make the remaining tilts; yields ``(done, total)`` tilts every ``batch_s`` seconds and once at the end,
        after the finished sample was saved in the cache."""
        return self._batches(self._make_next, batch_s)

    def fill_in_child(self, batch_s: float = 0.25) -> Iterator[tuple[int, int]]:
        """As :meth:`fill`, but the tilts are made by a child process at a lower priority
        (:mod:`napari_cspt2d._sample_child`) and only read into :attr:`stack` here: the thread that runs this holds
        the interpreter lock for little more than the copies (a GUI in this process keeps it). :meth:`stop` ends the
        child (and this generator, after the tilt being read). If the child fails (it cannot start, import or
        render), the remaining tilts are made here, in this thread, as :meth:`fill` does."""
        if self.complete:
            yield self.done, len(self.order)  # pragma: no cover - nothing to make
            return
        env = dict(os.environ)  # the child imports this package from where the parent did
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        child = subprocess.Popen([sys.executable, "-c", _sample_child.PROGRAM], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, env=env)
        self._child = child
        failed = False
        try:
            try:
                child.stdin.write(pickle.dumps((self.plan, [int(s) for s in self.order[self.done:]])))
                child.stdin.close()
            except OSError:
                pass  # it ended at once: its output ends, and that is seen below
            if self._stopped:
                return
            yield from self._batches(lambda: self._read_next(child), batch_s)
        except _ChildFailed:
            failed = True
        finally:
            self._child = None
            _end(child)
        if failed and not self._stopped:
            yield from self._batches(self._make_next, batch_s)

    def _read_next(self, child: subprocess.Popen) -> None:
        section = self.order[self.done]
        view = memoryview(self.stack[section]).cast("B")
        got = 0
        while got < view.nbytes:
            n = child.stdout.readinto(view[got:])
            if not n:
                if self._stopped:
                    raise _Stopped
                raise _ChildFailed
            got += n
        self.done += 1

    def stop(self) -> None:
        """End :meth:`fill_in_child`'s child process (Cancel, the viewer closed); the tilts read stay."""
        self._stopped = True
        child = self._child
        if child is not None and child.poll() is None:
            try:
                child.kill()  # the reading thread then sees the end of its output, and reaps it
            except OSError:  # pragma: no cover - it ended meanwhile
                pass

    def _batches(self, make_next, batch_s: float) -> Iterator[tuple[int, int]]:
        last = time.perf_counter()
        while not self.complete:
            try:
                make_next()
            except _Stopped:
                return
            if self.complete and self._save_to is not None:
                _save_quietly(*self._save_to, self.stack, self.plan.tracks, self.plan.pixel_A, self.plan.params)
            if self.complete or time.perf_counter() - last >= batch_s:
                yield self.done, len(self.order)
                last = time.perf_counter()

    def finish(self) -> None:
        """Make every remaining tilt now (in this thread)."""
        for _ in self.fill():
            pass


class _Stopped(Exception):
    """The child making the tilts was stopped."""


class _ChildFailed(Exception):
    """The child making the tilts ended before it made them all."""


def _end(child: subprocess.Popen) -> None:
    """Kill ``child`` (if it still runs) and reap it."""
    if child.poll() is None:
        try:
            child.kill()
        except OSError:  # pragma: no cover - it ended meanwhile
            pass
    child.wait()
    for pipe in (child.stdin, child.stdout):
        try:
            if pipe is not None:
                pipe.close()
        except OSError:
            pass


def _save_quietly(folder: Path, key: str, stack: np.ndarray, tracks: TrackSet, pixel_A: float, params: dict) -> None:
    try:
        _save(folder, key, stack, tracks, pixel_A, params)
    except OSError:
        pass  # a read-only cache only costs the time to make it again


def sample_layers(*, cache: bool = True, **sample_kwargs: Any) -> list[tuple[Any, dict[str, Any], str]]:
    """Image, trajectories and tracks layers of :func:`napari_cspt2d.sample.make_sample` (keyword arguments are
    passed on), from the cache (unless ``cache=False``) or else *streaming*: the image layer's
    ``metadata["cspt2d"]["stream"]`` is then a :class:`SampleStream` with only the first tilt made, which the caller
    fills. Point diameter = the sample's particle diameter; the tracks layer carries the sample's parameters
    (``metadata["cspt2d"]["params"]``); the contrast comes from the tilt shown first."""
    key, folder = _cache_key(sample_kwargs), sample_cache_folder()
    loaded = _load(folder, key) if cache else None
    stream = None
    if loaded is None:
        plan = SamplePlan(**sample_kwargs)
        stream = SampleStream(plan, (folder, key) if cache else None)
        stack, tracks, pixel_A, params = stream.stack, plan.tracks, plan.pixel_A, dict(plan.params)
    else:
        stack, tracks, pixel_A, params = loaded
    series = TiltSeries(stack, pixel_A, tracks.tilts, str(params.get("data_set", "sample")))
    microscope = {"voltage_kV": params["scope_voltage"], "cs_mm": params["scope_cs"],
                  "amp_contrast": params["scope_wgh"]}
    layers = series_layer_data(series, tracks, radius_px=params["particle_rad"] / pixel_A,
                               source=SAMPLE_SOURCE, microscope=microscope)
    first = first_tilt(stack.shape[0])
    shown = TiltSeries(stack[first:first + 1], pixel_A, TiltTable.from_angles([0.0]))
    layers[0][1]["contrast_limits"] = shown.contrast_limits()
    layers[0][1]["metadata"]["cspt2d"]["stream"] = stream
    layers[-1][1]["metadata"]["cspt2d"]["params"] = params
    return layers


def make_sample_data(*, cache: bool = True, **sample_kwargs: Any) -> list[tuple[Any, dict[str, Any], str]]:
    """:func:`sample_layers`, finished (seconds the first time, then from the cache unless ``cache=False``)."""
    layers = sample_layers(cache=cache, **sample_kwargs)
    stream = layers[0][1]["metadata"]["cspt2d"]["stream"]
    if stream is not None and stream.claim():
        stream.finish()
    return layers


def open_sample_data(**sample_kwargs: Any) -> list[tuple[Any, dict[str, Any], str]]:
    """npe2 sample hook (File > Open Sample): in a napari window, :func:`sample_layers` streaming (the first image at
    once, the other tilts filled in the background with progress); elsewhere :func:`make_sample_data`."""
    if not follow_in_current_viewer():
        return make_sample_data(**sample_kwargs)
    return sample_layers(**sample_kwargs)
