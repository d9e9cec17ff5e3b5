"""GUI speed goals, in a real shown napari viewer (starts a virtual X display when $DISPLAY is unset).

1. Open a 4 GB tilt stack (61 × 4096 × 4096 float32, a sparse file: MRC header + truncate) through the loader's code
   path: goal < 1 s to the first drawn frame, RSS growth < 200 MB (in a running session; the very first layer of a
   napari session also pays one-time imports, reported as ``open_4GB_cold_session_first_frame_ms``). Scrolling maps
   sections into memory; the idle page release (0.5 s after the last step) gives it back.
2. One point moved in a 100k-point tracks layer (2,500 particles × 41 tilts): the layer edit event -> model action
   -> layers refreshed; goal < 50 ms. Also: undo (model -> layers), the deferred trajectory / table refresh, the
   autosave, adding and deleting a point (full Points rebuild).
3. Scrolling tilts with the stack and the 100k tracks shown (one dims step + redraw).
4. The cockpit's loop on the sample (``--part cockpit``): Open Sample (no cache, then cached), Reconstruct on a cold
   numba cache (an empty ``NUMBA_CACHE_DIR``; the cockpit's background warm-up starts when it opens), Refine with 3
   iterations, Cancel during a Refine, and the Refine again. The shown viewer's own first show and paint (napari's,
   no plugin yet: ~90 ms late in a first session) is a phase of its own ("napari window shown"), before "open
   cockpit" (the dock added to the settled window, its tabs built, then 1 s). Per phase, the lateness of a 10 ms
   QTimer (how long the user feels the window frozen: max and 99th percentile), the time to the first image, the
   time to the first progress and to the map of the first Reconstruct, and the cancel latency (button to the run's
   end). Goals: max lateness <= 100 ms in every phase, first image <= 2 s, cancel <= 0.5 s.
   The loop runs twice, each time in a napari session of its own (a child process), because Mesa keeps the shader
   programs it compiled (glLinkProgram: 100s of ms each in llvmpipe, on the GUI thread) in an on-disk cache: the
   **first session** starts with an empty shader cache (``MESA_SHADER_CACHE_DIR`` a new temp folder: a user's first
   napari session on the machine), the **later session** reuses the folder the first one filled (every later session).
   Only the shader cache differs: both start with an empty napari-cspt2d cache (``XDG_CACHE_HOME``: "open sample (not
   cached)") and an empty numba cache ("reconstruct (cold kernels)"). Per phase and session, the GL programs vispy
   made are counted and timed (their shaders' compiles, link and first draw: :class:`GLProgramTimer`), and the
   slowest GUI-thread calls are listed (opening the cockpit: each piece of a tab, the docked map viewer's QtViewer).
   Each stall (the timer > 50 ms late) is split into the GUI thread's time on a core, waiting for one and blocked
   (the interpreter lock, I/O), with the other threads that ran meanwhile (:class:`ThreadClocks`). Two references
   come from the same run: the machine's speed at pure Python (``python_loop_ms``: a GUI thread's work scales with
   it), and the **peer** of Open Sample, napari itself adding the same layers at once, as it does a reader plugin's
   (the last phase, :func:`peer_adds_layers`).

Prints a table and writes benchmarks/results/gui.json (the cockpit's part under ``"cockpit"``, one entry per session).
Run: ``.venv/bin/python benchmarks/gui.py [--part files|cockpit|all] [--stacks [--session first|later]]``. The
machine is shared: the load average at the start and end is recorded with the numbers. ``--stacks`` says what froze
the window (in the ``--session`` chosen, the first by default): every stall of the cockpit's loop (the timer > 50 ms
late) is printed with the GUI thread's frames sampled during it, the garbage collections inside it and the other
threads' frames (:class:`StackSampler`); the sampler competes for the GIL, so time the phases without it.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "gui.json"
STACK_SHAPE = (61, 4096, 4096)
N_PARTICLES, N_TILTS = 2500, 41


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def make_sparse_stack(folder: Path) -> Path:
    """A 4 GB float32 MRC stack that takes no disk space (header written by mrcfile, data by truncate)."""
    import mrcfile

    from napari_cspt2d.io.imod import write_tlt

    path = folder / "big_stack.mrc"
    n, ny, nx = STACK_SHAPE
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.header.nx, mrc.header.ny, mrc.header.nz = nx, ny, n
        mrc.header.mode = 2
        mrc.header.mx, mrc.header.my, mrc.header.mz = nx, ny, n
        mrc.header.ispg = 0
        mrc.voxel_size = 1.35
    header_bytes = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(header_bytes + n * ny * nx * 4)
    write_tlt(folder / "big_stack.tlt", np.linspace(-60, 60, n))
    return path


def make_tracks(shape_yx: tuple[int, int], seed: int = 0):
    """2,500 particles × 41 tilts with small jitter, on the stack's image size."""
    from napari_cspt2d.model.tracks import TiltTable, TrackSet

    rng = np.random.default_rng(seed)
    tilts = TiltTable.from_angles(np.linspace(-60, 60, N_TILTS))
    ids = np.arange(1, N_PARTICLES + 1)
    pid, tid = (a.ravel() for a in np.meshgrid(ids, tilts.id, indexing="ij"))
    ny, nx = shape_yx
    base = rng.uniform([50, 50], [nx - 50, ny - 50], (N_PARTICLES, 2))
    xy = base[pid - 1] + rng.normal(0, 2.0, (pid.size, 2))
    return TrackSet.from_positions(pid, tid, xy, tilts, shape_yx, score=rng.uniform(0, 1, pid.size))


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)


def _timed(func, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        func()
        out.append(time.perf_counter() - t0)
    return out


def run() -> dict:
    import napari
    from napari.layers.base import ActionType
    from qtpy.QtWidgets import QApplication

    from napari_cspt2d._qt import CurationWidget
    from napari_cspt2d._qt._loader import add_layers, load_series_layers
    from napari_cspt2d._reader import series_layer_data
    from napari_cspt2d.model.tiltseries import TiltSeries

    app_events = QApplication.processEvents
    results: dict = {"python": platform.python_version(), "napari": napari.__version__,
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores", "stack_shape": list(STACK_SHAPE),
                     "n_points": N_PARTICLES * N_TILTS, "load_average_start": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")  # autosave snapshots go to the temp folder
        stack = make_sparse_stack(Path(tmp))
        results["stack_GB"] = round(stack.stat().st_size / 1e9, 2)
        viewer = napari.Viewer(show=True)
        viewer.window._qt_window.resize(1400, 900)
        _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")  # as a user would open it
        for _ in range(5):
            app_events()
            time.sleep(0.05)

        # 1. open the 4 GB stack: first in the session (one-time imports: pint, dask...), then again (warm session)
        def open_stack() -> tuple[float, float, float]:
            rss0 = _rss_mb()
            t0 = time.perf_counter()
            add_layers(viewer, load_series_layers(stack))
            t_added = time.perf_counter() - t0
            viewer.window._qt_viewer.canvas.native.repaint()
            app_events()
            return t_added, time.perf_counter() - t0, _rss_mb() - rss0

        cold = open_stack()
        viewer.layers.clear()
        app_events()
        added, drawn, grown = open_stack()
        results["open_4GB_cold_session_first_frame_ms"] = _ms(cold[1])
        results["open_4GB_layer_added_ms"] = _ms(added)
        results["open_4GB_first_frame_ms"] = _ms(drawn)
        results["open_4GB_rss_growth_MB"] = round(grown, 1)
        rss0 = _rss_mb()
        for _ in range(10):  # scroll 10 tilts, then let the idle page release run
            viewer.dims.set_current_step(0, viewer.dims.current_step[0] + 1)
            viewer.window._qt_viewer.canvas.native.repaint()
            app_events()
        results["scroll_10_tilts_rss_growth_MB"] = round(_rss_mb() - rss0, 1)
        time.sleep(0.6)
        app_events()
        results["after_idle_page_release_rss_growth_MB"] = round(_rss_mb() - rss0, 1)

        # 2. 100k-point tracks layer on that stack, curated
        series = TiltSeries.open(stack)
        tracks = make_tracks(series.shape_yx)
        t0 = time.perf_counter()
        added = add_layers(viewer, series_layer_data(series, tracks)[1:])
        app_events()
        results["tracks_100k_layers_added_ms"] = _ms(time.perf_counter() - t0)
        layer = added[-1]
        viewer.dims.set_current_step(0, 20)
        app_events()
        rng = np.random.default_rng(1)
        rows = rng.choice(len(tracks), 15, replace=False)

        def drag(row: int) -> None:  # what napari's select-mode drag does on release (it moves, then emits)
            layer.events.data(value=layer.data, action=ActionType.CHANGING, data_indices=(row,),
                              vertex_indices=((),))
            layer.data[row, 1:] += rng.normal(0, 3, 2)
            layer.refresh(extent=False, thumbnail=False)
            layer.events.data(value=layer.data, action=ActionType.CHANGED, data_indices=(row,),
                              vertex_indices=((),))

        # napari alone (nothing listening): a drag, a deletion and an addition, for reference
        baseline = _timed(lambda: drag(int(rng.integers(len(tracks)))), 15)
        results["move_point_100k_napari_alone_ms"] = _ms(statistics.median(baseline))
        layer.selected_data = {5}
        results["delete_point_100k_napari_alone_ms"] = _ms(_timed(layer.remove_selected, 1)[0])
        results["add_point_100k_napari_alone_ms"] = _ms(_timed(lambda: layer.add([20.0, 100.0, 100.0]), 1)[0])
        fresh = series_layer_data(series, tracks)[-1]
        layer.data, layer.features, layer.border_color = fresh[0], fresh[1]["features"], fresh[1]["border_color"]
        layer.selected_data = set()
        widget = cockpit.curate
        t0 = time.perf_counter()
        widget.bind_layer(layer)
        app_events()
        results["curation_bind_100k_ms"] = _ms(time.perf_counter() - t0)
        assert isinstance(widget, CurationWidget)
        ctl, doc = widget.controller, widget.document
        assert ctl.points is layer

        move, paint, undo = [], [], []
        for row in rows:
            t0 = time.perf_counter()
            drag(int(row))
            move.append(time.perf_counter() - t0)
            assert np.allclose(doc.tracks.positions_px()[row], layer.data[row, [2, 1]])
            t0 = time.perf_counter()
            viewer.window._qt_viewer.canvas.native.repaint()
            app_events()
            paint.append(time.perf_counter() - t0)
        for _ in rows:
            undo += _timed(doc.undo, 1)
        for _ in rows:
            doc.redo()
        results["move_point_100k_event_to_model_and_layer_ms"] = _ms(statistics.median(move))
        results["move_point_100k_max_ms"] = _ms(max(move))
        results["move_point_100k_redraw_ms"] = _ms(statistics.median(paint))
        results["undo_move_100k_ms"] = _ms(statistics.median(undo))
        results["trajectories_refresh_100k_ms"] = _ms(statistics.median(_timed(ctl.refresh_trajectories, 3)))
        results["particle_table_refresh_ms"] = _ms(statistics.median(_timed(widget.refresh_table, 3)))
        results["autosave_100k_ms"] = _ms(statistics.median(_timed(widget.autosaver.save_now, 3)))

        def add_and_delete() -> tuple[float, float]:
            pid = int(doc.tracks.particle[0])
            row = doc.tracks.row_of(pid, 20)
            t0 = time.perf_counter()
            layer.selected_data = {row}
            layer.remove_selected()
            t_del = time.perf_counter() - t0
            ctl.set_active_particle(pid)
            t0 = time.perf_counter()
            layer.add([20.0, 100.0, 100.0])
            ctl.flush(trajectories=False)  # the addition is applied right after napari's add() returns
            return t_del, time.perf_counter() - t0

        timings = [add_and_delete() for _ in range(3)]
        results["delete_point_100k_ms"] = _ms(statistics.median(t[0] for t in timings))
        results["add_point_100k_ms"] = _ms(statistics.median(t[1] for t in timings))

        # 3. scrolling tilts (4 GB stack + 100k tracks): one dims step and the redraw
        ctl.flush()
        app_events()

        def step() -> None:
            viewer.dims.set_current_step(0, (viewer.dims.current_step[0] + 1) % STACK_SHAPE[0])
            viewer.window._qt_viewer.canvas.native.repaint()
            app_events()

        steps = _timed(step, 20)
        results["scroll_tilt_step_ms"] = _ms(statistics.median(steps))
        results["scroll_tilt_step_max_ms"] = _ms(max(steps))
        results["rss_end_MB"] = round(_rss_mb(), 1)
        results["load_average_end"] = round(os.getloadavg()[0], 2)  # other processes competing for the 2 cores
        widget.close_session()
        viewer.close()
    return results


GOALS = {
    "open_4GB_first_frame_ms": ("<", 1000.0),
    "open_4GB_rss_growth_MB": ("<", 200.0),
    "move_point_100k_event_to_model_and_layer_ms": ("<", 50.0),
}


# ---------------------------------------------------------------------------------------------------- the cockpit
TIMER_MS = 10
STALL_MS = 50.0  # a tick later than this is a stall (its GUI-thread stacks are reported with --stacks)
COCKPIT_GOALS = {"max_lateness_ms": 100.0, "first_image_s": 2.0, "cancel_s": 0.5}
#: The last phase: napari alone adds the layers Open Sample made (:func:`peer_adds_layers`).
PEER_PHASE = "peer: napari adds the sample's layers"


class ThreadClocks:
    """The CPU time of each thread of this process and the time each waited for a core (Linux's
    ``/proc/self/task/<id>/schedstat``, ns), read at every tick of the probe: a stall's time is split into the GUI
    thread running, waiting for a core and blocked (the interpreter lock, a Qt or GL lock, I/O), and the other threads
    that ran during it are named. Reading them costs ~10 µs per thread and tick."""

    #: The key of the threads that ended since the last read (the process's CPU time not in any live thread's).
    ENDED = -1
    _PROCESS = 0  # (no thread has id 0) the process's CPU time, in :meth:`read`

    def __init__(self) -> None:
        self.gui = threading.get_native_id()
        self._files: dict[int, int] = {}  # thread id -> open schedstat file
        self.last = self.read()

    def read(self) -> dict[int, tuple[int, int]]:
        """Thread id -> (ns on a core, ns waiting for one), for the threads alive now; and the process's CPU time,
        ns (the key ``_PROCESS``)."""
        out = {}
        for name in os.listdir("/proc/self/task"):
            tid = int(name)
            try:
                if tid not in self._files:
                    self._files[tid] = os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY)
                on_cpu, waiting, _ = os.pread(self._files[tid], 64, 0).split()
            except OSError:  # (the thread ended)
                if (fd := self._files.pop(tid, None)) is not None:
                    os.close(fd)
                continue
            out[tid] = (int(on_cpu), int(waiting))
        for tid in set(self._files) - set(out):  # ended threads' files
            os.close(self._files.pop(tid))
        out[self._PROCESS] = (time.process_time_ns(), 0)
        return out

    def since_last(self) -> dict[int, tuple[float, float]]:
        """Per thread, (ms on a core, ms waiting for one) since the last read (this read becomes the last)."""
        now = self.read()
        spent = {tid: ((c - self.last.get(tid, (0, 0))[0]) / 1e6, (w - self.last.get(tid, (0, 0))[1]) / 1e6)
                 for tid, (c, w) in now.items()}
        self.last = now
        process_ms = spent.pop(self._PROCESS)[0]
        spent[self.ENDED] = (max(0.0, process_ms - sum(c for c, _ in spent.values())), 0.0)
        return spent

    @staticmethod
    def name(tid: int) -> str:
        """A thread's name: Python's, else the kernel's (Qt's and llvmpipe's threads name themselves)."""
        if tid == ThreadClocks.ENDED:
            return "threads that ended"
        for thread in threading.enumerate():
            if thread.native_id == tid:
                return thread.name
        try:
            return Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except OSError:
            return f"thread {tid} (ended)"


class LatenessProbe:
    """A 10 ms QTimer; ``phase(name)`` starts recording how late each tick comes (ms beyond the 10 ms). Each stall
    (a tick more than ``STALL_MS`` late) is kept with where the GUI thread's time went (:class:`ThreadClocks`)."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.timer = QTimer()
        self.timer.setInterval(TIMER_MS)
        self.timer.timeout.connect(self._tick)
        self.samples: dict[str, list[float]] = {}
        self.stalls: list[tuple[str, float, float]] = []  # (phase, last tick, late tick), lateness > STALL_MS
        self.stall_rows: list[dict] = []  # the same stalls, with the threads' times (gui.json's "stalls")
        self._clocks = ThreadClocks()
        self._name: str | None = None
        self._last = time.perf_counter()
        self.timer.start()

    def _tick(self) -> None:
        now = time.perf_counter()
        spent = self._clocks.since_last()
        if self._name is not None:
            late = max(0.0, (now - self._last) * 1000.0 - TIMER_MS)
            self.samples[self._name].append(late)
            if late > STALL_MS:
                self.stalls.append((self._name, self._last, now))
                self._keep_stall(late, (now - self._last) * 1000.0, spent)
        self._last = now

    def _keep_stall(self, late_ms: float, wall_ms: float, spent: dict[int, tuple[float, float]]) -> None:
        gui_cpu, gui_wait = spent.get(self._clocks.gui, (0.0, 0.0))
        others = sorted(((cpu, tid) for tid, (cpu, _) in spent.items() if tid != self._clocks.gui), reverse=True)
        self.stall_rows.append({
            "phase": self._name, "late_ms": round(late_ms), "gui_on_cpu_ms": round(gui_cpu),
            "gui_waiting_for_core_ms": round(gui_wait), "gui_blocked_ms": round(max(0.0, wall_ms - gui_cpu - gui_wait)),
            "others_on_cpu_ms": {self._clocks.name(tid): round(cpu) for cpu, tid in others[:3] if cpu >= 5}})

    @property
    def current(self) -> str | None:
        """The phase being recorded."""
        return self._name

    def phase(self, name: str) -> None:
        self._name = name
        self.samples.setdefault(name, [])
        self._clocks.since_last()  # (what ran between the phases is in neither)
        self._last = time.perf_counter()

    def pause(self) -> None:
        """Record nothing until the next ``phase``."""
        self._name = None

    def summary(self) -> dict[str, dict[str, float]]:
        return {name: {"max_lateness_ms": round(max(v, default=0.0), 1),
                       "p99_lateness_ms": round(float(np.percentile(v, 99)) if v else 0.0, 1),
                       "ticks": len(v)} for name, v in self.samples.items()}


class GLProgramTimer:
    """The OpenGL programs vispy makes on the GUI thread, per phase of ``probe``: how many, how many distinct
    sources, and the time of their shaders' compiles, their link and their first draw (where Mesa compiles them:
    its on-disk shader cache, keyed on the source, makes them cheap in a later session)."""

    def __init__(self, probe: LatenessProbe) -> None:
        import hashlib

        import vispy.gloo.glir as glir

        self.by_phase: dict[str, dict] = {}
        shader_data, link, draw = glir.GlirShader.set_data, glir.GlirProgram.link_program, glir.GlirProgram.draw
        timer = self

        def add(phase: str | None, ms: float, source: str | None = None) -> None:
            row = timer.by_phase.setdefault(phase or "(no phase)", {"programs": 0, "sources": set(), "ms": 0.0})
            row["ms"] += ms
            if source is not None:
                row["programs"] += 1
                row["sources"].add(source)

        def on_gui_thread() -> bool:  # (the cockpit's GL warm-up replays programs in a thread of its own)
            return threading.current_thread() is threading.main_thread()

        def set_data(self, offset, code):
            if not on_gui_thread():
                return shader_data(self, offset, code)
            t0 = time.perf_counter()
            shader_data(self, offset, code)
            self._benchmark_code, self._benchmark_ms = code, (time.perf_counter() - t0) * 1000.0

        def link_program(self):
            if not on_gui_thread():
                return link(self)
            shaders = list(self._attached_shaders)
            t0 = time.perf_counter()
            link(self)
            source = hashlib.sha1("\0".join(getattr(s, "_benchmark_code", "") for s in shaders).encode()).hexdigest()
            ms = (time.perf_counter() - t0) * 1000.0 + sum(getattr(s, "_benchmark_ms", 0.0) for s in shaders)
            add(probe.current, ms, source)
            self._benchmark_first_draw = True

        def first_draw(self, *args, **kwargs):
            if not getattr(self, "_benchmark_first_draw", False) or not on_gui_thread():
                return draw(self, *args, **kwargs)
            self._benchmark_first_draw = False
            t0 = time.perf_counter()
            try:
                return draw(self, *args, **kwargs)
            finally:
                add(probe.current, (time.perf_counter() - t0) * 1000.0)

        glir.GlirShader.set_data, glir.GlirProgram.link_program, glir.GlirProgram.draw = set_data, link_program, \
            first_draw

    def summary(self) -> dict[str, dict]:
        return {phase: {"programs": row["programs"], "distinct_sources": len(row["sources"]), "ms": round(row["ms"])}
                for phase, row in self.by_phase.items()}


class StackSampler:
    """A thread sampling every thread's Python stack every ``interval_s`` (``faulthandler.dump_traceback``: C code
    that makes no frame objects, so no GUI object is ever freed in this thread), to say what the GUI thread was doing
    while the probe's timer was late (``--stacks``). The sampler needs the interpreter lock itself: a gap between its
    samples much longer than ``interval_s`` says some thread held the lock."""

    def __init__(self, interval_s: float = 0.004) -> None:
        self.interval_s = interval_s
        self.main_tag = f"0x{threading.main_thread().ident:016x}"
        self.samples: list[tuple[float, float, str]] = []  # (time, process CPU time, every thread's traceback text)
        self.collections: list[tuple[float, float, int]] = []  # garbage collections: (start, end, generation)
        self._gc_start = 0.0
        gc.callbacks.append(self._on_gc)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import faulthandler

        with tempfile.TemporaryFile("w+") as fh:
            while not self._stop.is_set():
                fh.seek(0)
                fh.truncate()
                faulthandler.dump_traceback(fh, all_threads=True)
                fh.seek(0)
                self.samples.append((time.perf_counter(), time.process_time(), fh.read()))
                time.sleep(self.interval_s)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.collections.append((self._gc_start, time.perf_counter(), info["generation"]))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        gc.callbacks.remove(self._on_gc)

    def _threads(self, text: str) -> tuple[list[str], list[str]]:
        """The GUI thread's frames (outer -> inner) and the other threads' four innermost frames."""
        main: list[str] = []
        others: list[str] = []
        for block in text.split("\n\n"):
            head, *frames = block.strip().splitlines() or [""]
            names = []
            for line in frames:
                file, _, rest = line.strip().partition('", line ')
                parts = Path(file.removeprefix('File "')).parts
                short = "/".join(parts[parts.index("site-packages") + 1:] if "site-packages" in parts else parts[-2:])
                number, _, func = rest.partition(" in ")
                names.append(f"{short}:{number} {func}")
            if self.main_tag in head:
                main = names[::-1]
            elif names and "stack-sampler" not in block and "_run" not in names[0]:
                others.append(" < ".join(names[:4]))
        return main, others

    def report(self, stalls: list[tuple[str, float, float]]) -> list[str]:
        """Per stall: the GUI thread's frames present in at least half of its samples (outer -> inner, the last 14),
        its most frequent innermost frames, the longest gap between samples and the other threads' innermost
        frames."""
        lines = []
        times = np.array([t for t, _, _ in self.samples])
        cpu = np.array([c for _, c, _ in self.samples])
        for phase, start, end in stalls:
            i0, i1 = np.searchsorted(times, start), np.searchsorted(times, end)
            window = [self._threads(text) for _, _, text in self.samples[i0:i1]]
            gaps = np.diff(times[max(i0 - 1, 0):i1 + 1])
            at = int(np.argmax(gaps)) + max(i0 - 1, 0) if len(gaps) else 0
            gap = gaps.max(initial=0.0) * 1000.0
            gap_cpu = (cpu[at + 1] - cpu[at]) * 1000.0 if len(gaps) else 0.0
            collected = [(min(e, end) - max(s, start), g) for s, e, g in self.collections if s < end and e > start]
            lines.append(f"--- stall in {phase!r}: {(end - start) * 1000 - TIMER_MS:.0f} ms late, "
                         f"{len(window)} samples, longest sampler gap {gap:.0f} ms (process CPU in it "
                         f"{gap_cpu:.0f} ms), "
                         f"garbage collection "
                         f"{sum(t for t, _ in collected) * 1000:.0f} ms (generations "
                         f"{sorted({g for _, g in collected})})")
            if not window:
                continue
            counts: Counter = Counter()
            for main, _ in window:
                counts.update(set(main))
            common = [f for f in window[len(window) // 2][0] if counts[f] >= len(window) / 2]
            lines += [f"    {counts[f] * 100 // len(window):3d}% {f}" for f in common[-14:]]
            leaves = Counter(main[-1] for main, _ in window if main)
            lines.append("    innermost: " + "; ".join(f"{n}x {f}" for f, n in leaves.most_common(4)))
            tops = Counter(f.split(" < ")[0] for _, others in window for f in others)
            lines.append("    other threads: " + "; ".join(f"{n}x {f}" for f, n in tops.most_common(5)))
            if gap > STALL_MS and at + 1 < len(self.samples):  # who held the interpreter lock: where they are after
                lines.append("    after the longest gap: " + " | ".join(self._threads(self.samples[at + 1][2])[1]))
        return lines


def _wait(predicate, timeout_s: float) -> float:
    """Run the event loop until ``predicate()``; returns the seconds it took (raises after ``timeout_s``)."""
    from qtpy.QtWidgets import QApplication

    t0 = time.perf_counter()
    while not predicate():
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError(f"not done after {timeout_s} s")
        QApplication.processEvents()
        time.sleep(0.002)
    return time.perf_counter() - t0


def _settle(seconds: float) -> None:
    """Run the event loop for ``seconds``."""
    end = time.perf_counter() + seconds
    _wait(lambda: time.perf_counter() >= end, seconds + 1)


def run_cockpit(tmp: Path, stacks: bool = False) -> dict:
    """Part 4 of the module docstring, on a shown 1366 × 768 window; ``stacks``: sample the GUI thread's stack and
    report it for every stall (``"stall_stacks"``)."""
    import napari

    os.environ["XDG_CACHE_HOME"] = str(tmp / "cache")  # no sample in the cache yet
    os.environ["NUMBA_CACHE_DIR"] = str(tmp / "numba")  # cold kernels: nothing compiled yet
    results: dict = {"load_average_start": round(os.getloadavg()[0], 2), "window": "1366x768",
                     "python_loop_ms": python_loop_ms()}
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1366, 768)
    probe = LatenessProbe()  # (a QTimer needs the application napari made)
    programs = GLProgramTimer(probe)
    sampler = StackSampler() if stacks else None
    slowest: dict[str, float] = {}
    by_phase: dict[str, dict[str, float]] = {}  # the same, per phase

    def timed(owner, name: str, label: str) -> None:  # how long a GUI-thread callback takes (its worst call)
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                ms = round((time.perf_counter() - t0) * 1000.0, 1)
                slowest[label] = max(slowest.get(label, 0.0), ms)
                in_phase = by_phase.setdefault(probe.current or "", {})
                in_phase[label] = max(in_phase.get(label, 0.0), ms)

        setattr(owner, name, wrapper)

    from napari.qt import QtViewer

    from napari_cspt2d._qt import _stages
    from napari_cspt2d._qt.cockpit import Cockpit  # (the light module napari imports to open the cockpit)

    from napari_cspt2d._qt._gl_warmup import ShaderCacheWarmer

    timed(Cockpit, "_build_now", "cockpit: a piece of a tab built")
    timed(ShaderCacheWarmer, "_next_step", "GL warm-up: a stage (off-screen canvas)")
    timed(QtViewer, "__init__", "a QtViewer made (the docked map viewer)")
    probe.phase("napari window shown")  # napari's own first show, resize and paint, apart from the cockpit's
    _settle(1.0)
    probe.phase("open cockpit")
    opened = time.perf_counter()
    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    _wait(lambda: cockpit.tabs_built, 60)  # the tabs' modules load in a thread, then each tab is built in turns
    results["cockpit_tabs_shown_s"] = round(time.perf_counter() - opened, 2)
    _settle(1.0)
    state, run = cockpit.state, cockpit.run

    timed(run, "_on_iteration", "Run tab: a step arrives (first piece)")
    timed(run.map_panel, "show_map", "map layer updated")
    timed(run.fsc_plot, "add_curve", "FSC curve added")
    timed(run.fsc_plot, "_show", "FSC plot image shown")
    run.review_shown.disconnect(cockpit.validate.show_entry)  # connected when the tab was built: wrapped, then
    timed(cockpit.validate, "show_entry", "Validate tab: review shown")  # connected again (else never timed)
    run.review_shown.connect(cockpit.validate.show_entry)
    timed(cockpit.validate, "_show_vectors", "vectors layer updated")
    timed(cockpit.data, "_add", "first image layer added")
    timed(cockpit.data, "_add_rest", "tracks layers added")
    canvas = viewer.window._qt_viewer.canvas.native
    timed(canvas, "paintGL", "main canvas painted")
    timed(run.map_panel.qt_viewer.canvas.native, "paintGL", "map canvas painted")

    def image_shown() -> bool:
        return any(layer.metadata.get("cspt2d", {}).get("role") == "tiltseries" and layer.visible
                   for layer in viewer.layers)  # (it is added hidden and shown a stage later)

    warmer = cockpit.shader_warmer  # Mesa's shader cache warmed from a thread (a first session on llvmpipe)
    results["gl_warm_up_at_open_sample"] = warmer.state
    for label in ("open sample (not cached)", "open sample (cached)"):
        viewer.layers.clear()
        probe.phase(label)
        t0 = time.perf_counter()
        cockpit.data.sample_button.click()
        _wait(image_shown, 300)
        viewer.window._qt_viewer.canvas.native.repaint()
        results[f"first_image_s, {label}"] = round(time.perf_counter() - t0, 2)
        # the phase ends when the cockpit's steps for the new series are done too (the refined-shifts layer and the
        # map layer prepared in turns of their own, _stages); they ran in the next phase's first turns before
        _wait(lambda: state.document is not None and not cockpit.data.busy and not _stages.pending(), 60)
    layers_opened = [layer.as_layer_data_tuple() for layer in viewer.layers]  # (for the peer, below)
    _wait(lambda: not warmer.running, 60)
    results["gl_warm_up_end"] = warmer.state
    results["gl_warm_up_programs"] = len(warmer.sources)
    results["gl_warm_up_thread_s"] = round(warmer.compile_s, 2)
    params = cockpit.parameters
    params.set_value("refine_iter", 2)
    params.set_value("refine_maxiter", 4)  # 3 refinement iterations
    params.create_project(tmp / "project")
    cockpit.show_tab("Run")

    progress: list[float] = []
    run._relay.progress.connect(lambda *_: progress.append(time.perf_counter()))
    probe.phase("reconstruct (cold kernels)")
    results["kernels_loaded_at_first_reconstruct_press"] = cockpit.warmer.is_ready  # else the run waits for them
    results["cockpit_steps_pending_at_first_reconstruct_press"] = _stages.pending()  # (create_project queues none)
    t0 = time.perf_counter()
    run.reconstruct_button.click()
    _wait(lambda: bool(progress), 600)
    results["first_reconstruct_first_progress_s"] = round(progress[0] - t0, 2)
    _wait(lambda: not run.busy, 900)
    results["first_reconstruct_s"] = round(time.perf_counter() - t0, 2)
    results["kernels_warm_at_first_reconstruct_end"] = cockpit.warmer.is_ready

    probe.phase("refine 3 iterations")
    t0 = time.perf_counter()
    run.refine_button.click()
    _wait(lambda: not run.busy, 3600)
    results["refine_3_iterations_s"] = round(time.perf_counter() - t0, 1)
    results["refine_state"] = run.state

    for when, word in (("while refining particles", "refining"), ("while a map is finished", "reconstructing")):
        probe.phase(f"cancel {when}")
        run.refine_button.click()
        # a refinement iteration's stage ("Step 2/4: iteration 2: ..."), not the first map's
        _wait(lambda w=word: "iteration" in run.stage_label.text() and w in run.stage_label.text(), 900)
        run.cancel_button.click()
        _wait(lambda: not run.busy, 120)
        results[f"cancel_s, {when}"] = round(run.cancel_latency_s, 3) if run.cancel_latency_s else None
    probe.phase("re-run (reconstruct)")
    t0 = time.perf_counter()
    run.reconstruct_button.click()
    _wait(lambda: not run.busy, 900)
    results["rerun_reconstruct_s"] = round(time.perf_counter() - t0, 2)
    results["peer_layer_added_ms"] = peer_adds_layers(viewer, probe, layers_opened)
    results["phases"] = probe.summary()
    results["slowest_gui_callbacks_ms"] = slowest
    results["slowest_gui_callbacks_ms_by_phase"] = by_phase
    results["stalls"] = probe.stall_rows
    results["gl_programs_by_phase"] = programs.summary()
    results["history"] = [[e.run, e.iteration, round(e.resolution_A, 2)] for e in state.history]
    results["load_average_end"] = round(os.getloadavg()[0], 2)
    if sampler is not None:
        sampler.stop()
        results["stall_stacks"] = sampler.report(probe.stalls)
    probe.timer.stop()
    viewer.close()
    return results


def peer_adds_layers(viewer, probe: LatenessProbe, layers: list[tuple]) -> dict[str, float]:
    """The peer of "open sample": napari itself adds the layers Open Sample made (their data tuples, as a reader
    plugin returns them, without the cockpit's metadata) all at once, as it does for a reader's layers; the phase ends
    1 s after the window is painted. Its lateness is napari's own floor for these layers on this machine. Returns
    how long napari took to add each layer, ms ("<kind> <name>": no step that adds one can be shorter)."""
    probe.pause()
    viewer.layers.clear()
    _settle(1.0)
    probe.phase(PEER_PHASE)
    added_ms = {}
    for data, meta, kind in layers:
        t0 = time.perf_counter()
        viewer._add_layer_from_data(data, {**meta, "metadata": {}}, kind)  # (as napari adds a reader's layers)
        added_ms[f"{kind} {meta.get('name', '')}"] = round((time.perf_counter() - t0) * 1000.0, 1)
    viewer.window._qt_viewer.canvas.native.repaint()
    _settle(1.0)
    return added_ms


def python_loop_ms() -> float:
    """This machine's speed at pure Python: ms for a million additions in a loop (the median of three; a GUI
    thread's work scales with it)."""
    def once() -> float:
        t0 = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i
        return (time.perf_counter() - t0) * 1000.0
    return round(statistics.median(once() for _ in range(3)), 1)


#: The two napari sessions the cockpit's loop runs in: their key in gui.json and the column's title.
SESSIONS = {"first": "first session (empty GL shader cache)", "later": "later session (warm GL shader cache)"}


def _folder_MB(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20, 1)


def run_cockpit_sessions(stacks_session: str | None = None) -> dict[str, dict]:
    """The cockpit's loop in a first and a later napari session, each a child process (``--child``) with its own
    empty napari-cspt2d and numba caches, sharing one GL shader cache folder (empty for the first);
    ``stacks_session``: the session whose stalls are sampled (``--stacks``)."""
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as shader_cache:
        env = dict(os.environ, MESA_SHADER_CACHE_DIR=shader_cache)
        for session, title in SESSIONS.items():
            print(f"cockpit's loop: {title}", flush=True)
            cached = _folder_MB(Path(shader_cache))
            with tempfile.TemporaryDirectory() as tmp:
                result_file = Path(tmp) / "result.json"
                command = [sys.executable, __file__, "--child", str(result_file)]
                subprocess.run(command + (["--stacks"] if session == stacks_session else []), env=env, check=True)
                out[session] = {"gl_shader_cache_MB_at_start": cached, **json.loads(result_file.read_text())}
            if session == stacks_session:  # printed, not kept
                print(f"=== stalls of the {title}\n" + "\n".join(out[session].pop("stall_stacks")), flush=True)
    return out


def print_cockpit(sessions: dict[str, dict]) -> None:
    """One column per session: the phases' lateness, the slowest GUI-thread calls and the other measures."""
    names = list(sessions)
    goal = COCKPIT_GOALS["max_lateness_ms"]
    print(f"\ncockpit's loop, lateness of a 10 ms timer (ms), goal max <= {goal:g}")
    print(f"{'phase':<34}" + "".join(f" | {n + ' session: max':>20} {'p99':>7} {'goal':>6}" for n in names))
    phases = list(dict.fromkeys(p for r in sessions.values() for p in r.get("phases", {})))
    for phase in phases:
        cells = ""
        for n in names:
            row = sessions[n].get("phases", {}).get(phase)
            if row is None:
                cells += f" | {'-':>20} {'-':>7} {'':>6}"
                continue
            ok = "ok" if row["max_lateness_ms"] <= goal else "MISSED"
            cells += f" | {row['max_lateness_ms']:>20} {row['p99_lateness_ms']:>7} {ok:>6}"
        print(f"{phase:<34}{cells}")
    print(f"\n{'slowest GUI-thread call (ms)':<78}" + "".join(f" {n:>8}" for n in names))
    calls = list(dict.fromkeys((phase, name) for r in sessions.values()
                               for phase, by_name in r.get("slowest_gui_callbacks_ms_by_phase", {}).items()
                               for name in by_name))
    for phase, name in calls:
        values = [sessions[n].get("slowest_gui_callbacks_ms_by_phase", {}).get(phase, {}).get(name, "-")
                  for n in names]
        print(f"{phase[:34]:<34} {name:<43}" + "".join(f" {v!s:>8}" for v in values))
    print(f"\n{'GL programs made: how many (distinct sources), compile + link + first draw ms':<78}"
          + "".join(f" {n:>18}" for n in names))
    for phase in phases:
        cells = [sessions[n].get("gl_programs_by_phase", {}).get(phase) for n in names]
        texts = ["-" if c is None else f"{c['programs']} ({c['distinct_sources']}) {c['ms']} ms" for c in cells]
        if any(cells):
            print(f"{phase:<78}" + "".join(f" {t:>18}" for t in texts))
    for n in names:
        rows = sessions[n].get("stalls", [])
        print(f"\n{n} session: stalls over {STALL_MS:g} ms late (the GUI thread's time: on a core / waiting for one"
              f" / blocked; the busiest other threads, ms on a core)" if rows else f"\n{n} session: no stall")
        for row in rows:
            others = ", ".join(f"{name} {ms}" for name, ms in row["others_on_cpu_ms"].items())
            print(f"  {row['phase'][:34]:<34} {row['late_ms']:>5} ms late: {row['gui_on_cpu_ms']:>4} / "
                  f"{row['gui_waiting_for_core_ms']:>4} / {row['gui_blocked_ms']:>4}   {others}")
    print(f"\n{'the peer: napari adds one of the layers (ms)':<52}" + "".join(f" {n:>10}" for n in names))
    for layer in dict.fromkeys(k for r in sessions.values() for k in r.get("peer_layer_added_ms", {})):
        print(f"{layer:<52}" + "".join(f" {sessions[n].get('peer_layer_added_ms', {}).get(layer, '-')!s:>10}"
                                        for n in names))
    skip = ("phases", "history", "slowest_gui_callbacks_ms", "slowest_gui_callbacks_ms_by_phase",
            "gl_programs_by_phase", "stalls", "peer_layer_added_ms")
    keys = list(dict.fromkeys(k for r in sessions.values() for k in r if k not in skip))
    print(f"\n{'measure':<52}" + "".join(f" {n:>10}" for n in names))
    for key in keys:
        print(f"{key:<52}" + "".join(f" {sessions[n].get(key, '-')!s:>10}" for n in names))


def _child(result_file: Path, stacks: bool) -> int:
    """One session of the cockpit's loop (``run_cockpit_sessions`` starts it), its results written to
    ``result_file``."""
    with tempfile.TemporaryDirectory() as tmp:
        results = run_cockpit(Path(tmp), stacks=stacks)
    result_file.write_text(json.dumps(results))
    return 0


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("files", "cockpit", "all"), default="all")
    parser.add_argument("--stacks", action="store_true",
                        help="sample the GUI thread's stack and print it for every stall of the cockpit's loop")
    parser.add_argument("--session", choices=tuple(SESSIONS), default="first",
                        help="the cockpit's session whose stalls --stacks prints (default: first)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # one session, its results to this file
    args = parser.parse_args()
    if args.child is not None:
        return _child(args.child, args.stacks)
    display = None
    if not os.environ.get("DISPLAY"):
        from pyvirtualdisplay import Display

        display = Display(visible=False, size=(1600, 1000))
        display.start()
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    try:
        results = run() if args.part in ("files", "all") else {k: v for k, v in previous.items() if k != "cockpit"}
        if args.part in ("cockpit", "all"):
            results["cockpit"] = run_cockpit_sessions(args.session if args.stacks else None)
        elif "cockpit" in previous:
            results["cockpit"] = previous["cockpit"]
    finally:
        if display is not None:
            display.stop()
    width = max(len(k) for k in results)
    print(f"{'measure':<{width}}  {'value':>12}  goal")
    for key, value in results.items():
        if key == "cockpit":
            continue
        goal = GOALS.get(key)
        verdict = "" if goal is None else f"{goal[0]} {goal[1]:g}  {'ok' if value < goal[1] else 'MISSED'}"
        print(f"{key:<{width}}  {value!s:>12}  {verdict}")
    cockpit = results.get("cockpit", {})
    if cockpit and set(cockpit) <= set(SESSIONS):  # (an older gui.json holds one session's results)
        print_cockpit(cockpit)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(main())
