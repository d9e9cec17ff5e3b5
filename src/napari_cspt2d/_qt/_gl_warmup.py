"""Warm Mesa's on-disk shader cache for the sample's layers, from a thread with an OpenGL context of its own, when the
cockpit opens in a napari session on a software renderer (Mesa llvmpipe).

In a user's first napari session on a machine without a GPU, vispy compiles and links each new GL program on the GUI
thread: Open Sample makes 13 programs of 7 sources, ~1 s of compile, link and first draw (one repaint of the main
canvas took ~0.6 s). Mesa keeps what it compiled in an on-disk cache, keyed on the shader sources and on the draw
state it compiled them for; in every later session the same programs cost ~60 ms. This module fills that cache
before the user needs it:

1. On the GUI thread, in event-loop turns of their own (:func:`._stages.in_own_turn`, each ≤ ~50 ms), the layers
   Open Sample adds, made by the same code (:func:`napari_cspt2d._reader.series_layer_data`,
   :func:`._tracks_layer.active_track_layer`) from a 64² stand-in series of 2 particles × 3 tilts, go into an
   off-screen napari canvas (a ``ViewerModel``'s ``VispyCanvas``: the main canvas's scene and transforms, never
   shown, not in the user's layer list) one at a time, as the loader adds them, and a frame is drawn after each, as
   the window repaints. Nothing touches OpenGL there: the canvas's GLIR parser only records the commands.
2. A thread replays each frame's commands as soon as it is drawn (the image's first: the first program the user
   waits for) with a fresh vispy ``GlirParser`` in a ``QOpenGLContext`` of its own (the canvas's surface format) on
   a ``QOffscreenSurface``, into a framebuffer like ``QOpenGLWidget``'s (RGBA8 texture, depth 24 + stencil 8). The
   OpenGL calls release the interpreter lock: llvmpipe compiles on the other core, and the GUI thread's own compiles
   of the same programs later find them in the cache.

A frame is recorded per stage because the state a draw leaves behind (line smoothing, line width) is part of the
variants Mesa compiles for the draws after it: one frame of all the layers left a third of the time uncached.

When the replay is done, a marker in Mesa's cache folder (:func:`marker_path`) names what was warmed (renderer,
driver release, napari, vispy and this package's versions), and later sessions skip the warm-up; the marker goes
when the cache is deleted. With a GPU, or with Mesa's cache disabled, nothing is done. A failure is logged and
otherwise ignored: this is only an optimisation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from napari.qt.threading import create_worker
from qtpy.QtCore import QObject, Signal

from ._gl_info import gl_strings, is_software_renderer
from ._stages import in_own_turn

__all__ = ["MARKER_NAME", "ShaderCacheWarmer", "marker_path", "may_need_warming", "needs_warming", "replay",
           "stand_in_layers", "warm_key"]

_LOG = logging.getLogger(__name__)

#: The marker's file name in Mesa's cache folder.
MARKER_NAME = "napari-cspt2d-warm-up.json"
#: Raised when what is warmed changes (other layers), so that caches warmed before are warmed again.
WARM_UP_VERSION = 1
#: The stand-in series: (tilts, y, x) float32 like the sample's (power-of-two sides, as its 1024²).
STAND_IN_SHAPE = (3, 64, 64)
STAND_IN_PIXEL_A = 4.0
STAND_IN_RADIUS_PX = 8.0
#: The label the canvas's text overlay shows in the stand-in (the tilt label's shader does not depend on the text).
STAND_IN_LABEL = "t"
#: How long closing the cockpit waits for the thread (it stops between two GL commands; one link takes ≤ ~0.3 s).
JOIN_TIMEOUT_S = 5.0
_WARMED = threading.Event()  # a warm-up of this process ran to its end (the cache holds its programs)
_LATER = object()  # a stage's answer: it goes on in turns of its own


#: The folders Mesa keeps its cache in, under its base folder: one file per entry (Mesa 22), one database or one
#: file (later releases).
MESA_CACHE_NAMES = ("mesa_shader_cache", "mesa_shader_cache_db", "mesa_shader_cache_sf")


def mesa_cache_folder() -> Path:
    """Mesa's shader cache folder: under ``$MESA_SHADER_CACHE_DIR``, else ``$XDG_CACHE_HOME`` or ``~/.cache``, the
    first of :data:`MESA_CACHE_NAMES` that exists (the first if none does)."""
    base = os.environ.get("MESA_SHADER_CACHE_DIR") or os.environ.get("MESA_GLSL_CACHE_DIR")
    if not base:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    folders = [Path(base) / name for name in MESA_CACHE_NAMES]
    return next((folder for folder in folders if folder.is_dir()), folders[0])


def marker_path() -> Path:
    """Where a warm-up leaves its marker: inside Mesa's cache folder, so it goes with the cache."""
    return mesa_cache_folder() / MARKER_NAME


def _cache_disabled() -> bool:
    names = ("MESA_SHADER_CACHE_DISABLE", "MESA_GLSL_CACHE_DISABLE")
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes") for name in names)


def warm_key() -> dict[str, Any]:
    """What a warm-up warms for: the renderer, the driver's release, napari's, vispy's and this package's versions."""
    import napari
    import vispy

    from .. import __version__

    renderer, version = gl_strings()
    return {"renderer": renderer, "gl_version": version, "napari": napari.__version__, "vispy": vispy.__version__,
            "napari_cspt2d": __version__, "warm_up": WARM_UP_VERSION}


def needs_warming() -> bool:
    """Whether the sample's programs may be missing from the shader cache: a software renderer, Mesa's cache on, and
    no marker of a warm-up with this :func:`warm_key`."""
    renderer, _ = gl_strings()
    if not is_software_renderer(renderer) or _cache_disabled():
        return False
    try:
        return json.loads(marker_path().read_text()) != warm_key()
    except (OSError, ValueError):
        return True


def may_need_warming() -> bool:
    """What :func:`needs_warming` can tell without an OpenGL context (any thread): Mesa's cache on and no marker
    in its folder (a marker of another key is found out by :func:`needs_warming`)."""
    return not _WARMED.is_set() and not _cache_disabled() and not marker_path().is_file()


def _write_marker() -> None:
    folder = mesa_cache_folder()
    if not folder.is_dir():  # Mesa wrote nothing there: nothing to mark
        _LOG.info("GL warm-up: no shader cache folder at %s, no marker written", folder)
        return
    path = marker_path()
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(warm_key(), indent=1))
    os.replace(temporary, path)


def stand_in_layers() -> list:
    """The layers Open Sample adds (image, trajectories, tracks, the active trajectory), made by the same code as
    the sample's from a stand-in series (:data:`STAND_IN_SHAPE`); not yet in a viewer. Any thread."""
    from napari.layers import Layer

    from .._reader import series_layer_data
    from ..model.tiltseries import TiltSeries
    from ..model.tracks import TiltTable, TrackSet
    from ._tracks_layer import active_track_layer

    n, ny, nx = STAND_IN_SHAPE
    tilts = TiltTable.from_angles(np.linspace(-3.0, 3.0, n))
    particle, tilt = np.repeat([1, 2], n), np.tile(tilts.id, 2)
    xy = np.column_stack([np.repeat([0.3 * nx, 0.7 * nx], n), np.full(2 * n, 0.5 * ny)])
    tracks = TrackSet.from_positions(particle, tilt, xy, tilts, (ny, nx))
    series = TiltSeries(np.zeros(STAND_IN_SHAPE, np.float32), STAND_IN_PIXEL_A, tilts, "GL warm-up")
    data = series_layer_data(series, tracks, radius_px=STAND_IN_RADIUS_PX)
    data[0][1]["contrast_limits"] = (0.0, 1.0)  # (the sample's come from its first tilt; a uniform in the shader)
    layers = [Layer.create(array, kwargs, kind) for array, kwargs, kind in data]
    return layers + [active_track_layer("GL warm-up active", STAND_IN_PIXEL_A, STAND_IN_RADIUS_PX)]


def _recorder():
    """A GLIR parser that keeps the commands and makes no OpenGL call."""
    from vispy.gloo.glir import BaseGlirParser

    class Recorder(BaseGlirParser):
        def __init__(self) -> None:
            super().__init__()
            self.commands: list[tuple] = []

        def is_remote(self) -> bool:
            return False

        @property
        def shader_compatibility(self) -> str:
            return "desktop"

        def parse(self, commands) -> None:
            self.commands.extend(commands)

        def take(self) -> list[tuple]:
            """The commands recorded since the last call."""
            taken, self.commands = self.commands, []
            return taken

    return Recorder()


def program_sources(commands) -> list[str]:
    """The sha1 of each program's shader sources (as attached, joined by NUL), in the order ``commands`` link them."""
    kinds: dict[int, str] = {}
    code: dict[int, str] = {}
    attached: dict[int, list[int]] = {}
    out = []
    for command in commands:
        kind, target = command[0], command[1]
        if kind == "CREATE":
            kinds[target] = command[2]
        elif kind == "DATA" and str(kinds.get(target, "")).endswith("Shader"):
            code[target] = command[3]
        elif kind == "ATTACH" and kinds.get(target) == "Program":
            attached.setdefault(target, []).append(command[2])
        elif kind == "LINK":
            source = "\0".join(code.get(shader, "") for shader in attached.pop(target, []))
            out.append(hashlib.sha1(source.encode()).hexdigest())
    return out


def replay(batches: Iterable[list[tuple]], surface, surface_format, stop: threading.Event,
           size: tuple[int, int] = (64, 64)) -> bool:
    """Run the GLIR commands of ``batches`` (lists of commands, as they come: e.g. a frame each) in a new OpenGL
    context of ``surface_format`` on ``surface`` (a created ``QOffscreenSurface``), drawing into a framebuffer like
    ``QOpenGLWidget``'s of ``size`` (w, h); True if every command ran, False if ``stop`` was set first. In the calling
    thread (any); the context is gone on return."""
    from qtpy.QtCore import QSize
    from qtpy.QtGui import QOpenGLContext
    from qtpy.QtOpenGL import QOpenGLFramebufferObject, QOpenGLFramebufferObjectFormat
    from vispy.gloo import gl
    from vispy.gloo.glir import GlirParser

    context = QOpenGLContext()
    context.setFormat(surface_format)
    if not context.create() or not context.makeCurrent(surface):
        raise RuntimeError("no OpenGL context could be made current on the off-screen surface")
    try:
        fb_format = QOpenGLFramebufferObjectFormat()
        fb_format.setAttachment(QOpenGLFramebufferObject.Attachment.CombinedDepthStencil)
        fb_format.setSamples(max(surface_format.samples(), 0))
        framebuffer = QOpenGLFramebufferObject(QSize(*size), fb_format)
        try:
            if not framebuffer.isValid() or not framebuffer.bind():
                raise RuntimeError("no framebuffer for the warm-up")
            parser = GlirParser()
            for batch in batches:
                for command in batch:
                    if stop.is_set():
                        return False
                    if command[0] == "CURRENT":  # the canvas's framebuffer is ours here
                        command = ("CURRENT", 0, framebuffer.handle())
                    parser.parse([command])
            if stop.is_set():
                return False
            gl.glFinish()
            return True
        finally:
            framebuffer.release()
            del framebuffer  # (deleted while its context is current)
    finally:
        context.doneCurrent()
        del context


@contextlib.contextmanager
def _drawing(scene_canvas) -> Iterator[None]:
    """vispy's current canvas is ``scene_canvas`` while drawing (its draws go to its GLIR queue), then again the one
    before (the next paint of the main canvas makes its context current anyway)."""
    from vispy.gloo.context import get_current_canvas, set_current_canvas

    previous = get_current_canvas()
    try:
        yield
    finally:
        if previous is not None and previous is not scene_canvas:
            set_current_canvas(previous)


class ShaderCacheWarmer(QObject):
    """The warm-up (module docstring): :meth:`start` it once the modules are loaded, :meth:`stop` it when the window
    closes. ``state``: "idle", "skipped" (nothing to warm), "drawing" (the GUI-thread stages), "compiling" (the
    thread), "done", "stopped" or "failed"; ``sources``: the sha1 of each program the thread linked (see
    :func:`program_sources`); ``compile_s``: the thread's time."""

    _thread_ended = Signal(bool)  # (emitted by the thread, received on the GUI thread)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.state = "idle"
        self.sources: list[str] = []
        self.compile_s = 0.0
        self._stop = threading.Event()
        self._steps: deque[Callable[[], None]] = deque()
        self._maker = None
        self._prepared: list | None = None  # the stand-in layers, made by :meth:`prepare` before :meth:`start`
        self._model = None
        self._canvas = None
        self._recorder = None
        self._surface = None
        self._batches: queue.SimpleQueue[list[tuple] | None] = queue.SimpleQueue()  # frames for the thread; None: end
        self._thread: threading.Thread | None = None
        self._thread_ended.connect(self._on_thread_ended)

    @property
    def running(self) -> bool:
        """Whether some of it is still to come (stages or the thread)."""
        return self.state in ("drawing", "compiling")

    def prepare(self) -> None:
        """Make the stand-in layers now, in the calling thread (any: the cockpit's import thread, before its tabs
        are built), if a warm-up may be needed (:func:`may_need_warming`); :meth:`start` then uses them instead of
        making them in a thread of its own beside the GUI thread's work. A failure leaves that to :meth:`start`."""
        if self.state != "idle" or self._prepared is not None:
            return
        try:
            if may_need_warming():
                self._prepared = stand_in_layers()
        except Exception as exc:  # noqa: BLE001 - an optimisation: never in the user's way
            _LOG.info("GL warm-up: making the stand-in layers failed (%s: %s)", type(exc).__name__, exc)

    # ------------------------------------------------------------------ GUI thread
    def start(self) -> None:
        """Begin, unless nothing needs warming (:func:`needs_warming`); once."""
        if self.state != "idle":
            return
        try:
            if _WARMED.is_set() or not needs_warming():
                self.state, self._prepared = "skipped", None
                return
            from qtpy.QtWidgets import QApplication

            self.state = "drawing"
            QApplication.instance().aboutToQuit.connect(self.stop)  # (also when the app quits with the cockpit open)
            if self._prepared is not None:
                layers, self._prepared = self._prepared, None
                self._on_layers(layers)
                return
            self._maker = create_worker(stand_in_layers, _start_thread=False, _ignore_errors=True)
            self._maker.returned.connect(self._on_layers)
            self._maker.errored.connect(lambda exc: self._abandon("making the stand-in layers", exc))
            self._maker.start()
        except Exception as exc:  # noqa: BLE001 - an optimisation: never in the user's way
            self._abandon("starting", exc)

    def _on_layers(self, layers: list) -> None:
        self._maker = None
        if self._stop.is_set():
            return
        try:
            self._plan(layers)
        except Exception as exc:  # noqa: BLE001
            self._abandon("planning the stages", exc)

    def _plan(self, layers: list) -> None:
        from napari.layers import Points

        from ._tilt_overlay import GLYPHS_PER_TURN, MEASURED_CHARACTERS  # (loaded with the tabs' modules by now)

        self._steps.append(self._make_canvas)
        for index, layer in enumerate(layers):  # as the loader adds them: each added, its programs built, a frame
            # (the frame of the layer before in the same turn: ~2 ms; fewer turns, the sooner the thread has them)
            self._steps.append(partial(self._add, layer, frame_first=index > 0))
            if not index:  # the tilt label shows with the first image; its font's glyphs made a few per turn
                self._steps.append(self._show_label)
                characters = list(dict.fromkeys(MEASURED_CHARACTERS + STAND_IN_LABEL))
                self._steps.extend(partial(self._make_glyphs, characters[i:i + GLYPHS_PER_TURN])
                                   for i in range(0, len(characters), GLYPHS_PER_TURN))
            # a layer's programs built in a turn of their own before its frame; napari's Points has three (two
            # markers, a text: ~50-80 ms together), built one per turn as the loader does (:mod:`._prebuild`)
            self._steps.append(partial(self._build if isinstance(layer, Points) else self._draw_layer, layer))
        self._steps.append(self._last_frame)
        in_own_turn(self._next_step)

    def _next_step(self) -> None:
        if self._stop.is_set() or not self._steps:
            return
        step = self._steps.popleft()
        try:
            if step() is _LATER:  # the step goes on in turns of its own, then calls _continue
                return
        except Exception as exc:  # noqa: BLE001
            self._abandon("drawing the stand-in layers", exc)
            return
        if self._steps:
            in_own_turn(self._next_step)

    def _make_canvas(self) -> None:
        from napari._vispy import VispyCanvas, create_vispy_layer
        from napari._vispy.utils.qt_font import QtFontManager
        from napari.components import ViewerModel
        from napari.settings import get_settings
        from napari.utils.key_bindings import KeymapHandler
        from qtpy.QtGui import QGuiApplication

        self._model = ViewerModel(title="napari-cspt2d GL warm-up")
        samples = 4 if get_settings().advanced.multisampling else 0  # as napari's QtViewer asks for its canvas
        self._canvas = canvas = VispyCanvas(viewer=self._model, key_map_handler=KeymapHandler(),
                                            font_manager=QtFontManager(), font_family=QGuiApplication.font().family(),
                                            size=(STAND_IN_SHAPE[2], STAND_IN_SHAPE[1]), config={"samples": samples})
        self._recorder = canvas._scene_canvas.context.shared.parser = _recorder()

        def add_visual(event) -> None:  # as napari's QtViewer does for its canvas
            canvas.add_layer_visual_mapping(event.value, create_vispy_layer(event.value, font_info=canvas.font_info()))

        self._model.layers.events.inserted.connect(add_visual)
        self._start_thread(canvas.native.format())
        self._frame()  # the empty canvas's first paint

    def _add(self, layer, frame_first: bool) -> None:
        """Add ``layer`` (after the frame of the layer before)."""
        if frame_first:
            self._frame()
        self._model.add_layer(layer)

    def _show_label(self) -> None:
        """The canvas's text overlay shows the tilt label, as :func:`._tilt_overlay.connect_tilt_view` sets it when
        the first image comes."""
        overlay = self._model.canvas.overlays.text
        overlay.position, overlay.font_size, overlay.text, overlay.visible = "top_left", 12, STAND_IN_LABEL, True

    def _make_glyphs(self, characters: list[str]) -> None:
        font_info = self._canvas.font_info()
        font = font_info.font_manager.get_font(font_info.face)
        for character in characters:
            font[character]  # rendered once, kept by the font

    @property
    def canvas(self):
        """The off-screen ``VispyCanvas`` while the stages are drawn, else None (as a viewer's for
        :func:`._prebuild.build_in_turns`)."""
        return self._canvas

    def _build(self, layer):
        """Build ``layer``'s programs one per turn (:func:`._prebuild.build_in_turns`), then go on."""
        from ._prebuild import build_in_turns

        build_in_turns(self, layer, then=self._continue, first=False)
        return _LATER

    def _draw_layer(self, layer) -> None:
        """Draw ``layer``'s visual alone: its programs are built in this turn, not in its frame's."""
        scene_canvas = self._canvas._scene_canvas
        with _drawing(scene_canvas):
            scene_canvas.draw_visual(self._canvas.layer_to_visual[layer].node)

    def _continue(self) -> None:
        if self._canvas is not None:
            in_own_turn(self._next_step)

    def _frame(self) -> None:
        """A frame as the main canvas paints it (``SceneCanvas._draw_scene``, then ``QOpenGLWidget``'s alpha clear
        of vispy's Qt backend)."""
        scene_canvas = self._canvas._scene_canvas
        context = scene_canvas.context
        with _drawing(scene_canvas):
            context.clear(color=scene_canvas.bgcolor, depth=True)
            scene_canvas.draw_visual(scene_canvas.scene)
            context.set_color_mask(False, False, False, True)
            context.clear(color=True, depth=False, stencil=False)
            context.set_color_mask(True, True, True, True)
            context.flush_commands()
        self._batches.put(self._recorder.take())  # compiled while the next stages are drawn

    def _start_thread(self, surface_format) -> None:
        from qtpy.QtGui import QOffscreenSurface

        self._surface = QOffscreenSurface()
        self._surface.setFormat(surface_format)
        self._surface.create()
        self._thread = threading.Thread(target=self._compile, args=(surface_format,), name="napari-cspt2d GL warm-up",
                                        daemon=True)
        self._thread.start()

    def _last_frame(self) -> None:
        self._frame()
        self._batches.put(None)
        self._release_canvas()
        if self.state == "drawing":
            self.state = "compiling"

    def _release_canvas(self) -> None:
        if self._canvas is not None:
            self._canvas.native.deleteLater()
        self._canvas = self._model = self._recorder = None

    def _on_thread_ended(self, complete: bool) -> None:
        self._join()
        if self.state == "compiling":
            self.state = "done" if complete else "stopped"

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                _LOG.info("GL warm-up: the thread did not end within %.0f s", JOIN_TIMEOUT_S)
                return  # (its surface is left to the process's end)
            self._thread = None
        if self._surface is not None:
            self._surface.destroy()
            self._surface = None

    def stop(self) -> None:
        """Stop what is left (the thread ends after its current GL command) and free it all; again: nothing."""
        self._stop.set()
        self._batches.put(None)
        self._steps.clear()
        self._release_canvas()
        self._join()
        if self.running:
            self.state = "stopped"

    def _abandon(self, what: str, exc: BaseException) -> None:
        """A GUI-thread part failed: nothing more is drawn, the thread ends with what it has."""
        self._stop.set()
        self._batches.put(None)
        self._steps.clear()
        self._release_canvas()
        self._fail(what, exc)

    def _fail(self, what: str, exc: BaseException) -> None:
        self.state = "failed"
        _LOG.info("GL warm-up: %s failed (%s: %s); the shaders are compiled when first drawn", what,
                  type(exc).__name__, exc)

    # ------------------------------------------------------------------ the thread
    def _compile(self, surface_format) -> None:
        complete = False
        t0 = time.perf_counter()
        replayed: list[tuple] = []

        def batches() -> Iterator[list[tuple]]:
            for batch in iter(self._batches.get, None):
                replayed.extend(batch)
                yield batch

        try:
            complete = replay(batches(), self._surface, surface_format, self._stop)
            if complete:
                _WARMED.set()
                self.sources = program_sources(replayed)
                _write_marker()
        except Exception as exc:  # noqa: BLE001
            self._stop.set()  # (the stages left are not drawn)
            self._fail("compiling", exc)
        finally:
            self.compile_s = time.perf_counter() - t0
            with contextlib.suppress(RuntimeError):  # (the object is gone if the app quit meanwhile)
                self._thread_ended.emit(complete)
