"""The cockpit: napari-cspt2d's one dock widget (``napari -w napari-cspt2d``), the workflow as tabs.

Data (open a stack and tracks, or the sample) → Curate (fix picks, undo) → Parameters (pyp's, with units; the
project) → Run (reconstruct, refine; the map, the history, the FSC curves) → Validate (refined shifts worst first,
accept/reject). Every tab is handed the viewer's :class:`~napari_cspt2d._qt._owner.CockpitState` (document,
parameters, project, history) and sits in a scroll area, so no tab makes the main window taller than the screen.

Opening the cockpit is light on the GUI thread: this module imports only Qt and light modules; the tabs' modules
(pandas, scipy, numba and the run's driver through them) are imported in a background thread (:data:`TAB_MODULES`),
and each tab is built in event-loop turns of its own once they are, the parameter form a few rows per turn
(``tabs_built`` says when; asking for a tab before that builds what is left of it at once). When the cockpit opens,
the numba kernels start warming in the background (:mod:`napari_cspt2d.recon.warmup`), and on a software OpenGL
renderer, once the modules are loaded, so does Mesa's shader cache for the sample's layers (:mod:`._gl_warmup`). While
it is open, the interpreter is tuned so that background threads do not freeze the GUI thread (shorter switch interval,
long-lived objects frozen out of full garbage collections: :mod:`._interpreter`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from napari.qt.threading import create_worker
from qtpy.QtCore import QEvent, QObject, QSize, Qt, QTimer
from qtpy.QtWidgets import (QDockWidget, QFrame, QLabel, QMainWindow, QScrollArea, QTabWidget, QVBoxLayout,
                            QWidget)

from . import _interpreter
from ._gl_warmup import ShaderCacheWarmer
from ._lifecycle import WindowCloseWatcher
from ._units import load_unit_registry
from ._warmup import warm_once

if TYPE_CHECKING:
    from ._curation import CurationWidget
    from ._loader import TiltSeriesLoader
    from ._owner import CockpitState
    from .params_widget import ParametersWidget
    from .run_widget import RunWidget
    from .validation import ShiftValidation

__all__ = ["MIN_WIDTH_PX", "PREFERRED_WIDTH_PX", "TABS", "Cockpit"]

TABS = ("Data", "Curate", "Parameters", "Run", "Validate")
#: The cockpit's narrowest width: beside napari's layer docks (320 px) it leaves half of a 1366 px window to the canvas.
MIN_WIDTH_PX = 320
#: The width it takes when the window has room (the canvas keeps at least half the window).
PREFERRED_WIDTH_PX = 480
_MARGIN_PX = 32  # dock separators and frames
FIT_DELAY_MS = 100  # the docks are laid out by then (else tried again)
#: napari's layer docks grow to this width once a Points layer's controls show.
LAYER_DOCKS_PX = 320
#: The tabs' modules start loading once the dock is shown, fitted and painted (a paint beside a thread running Python
#: waits for the GIL after each of its OpenGL calls: README "The cockpit's loop").
IMPORT_DELAY_MS = 300
#: The modules the tabs need, imported off the GUI thread when the cockpit opens (the heavy part of opening it).
TAB_MODULES = tuple(f"{__package__}.{name}" for name in
                    ("_owner", "_loader", "_curation", "params_widget", "run_widget", "validation"))


def _import_tab_modules() -> None:
    for name in TAB_MODULES:
        importlib.import_module(name)


def _scrolled(widget: QWidget) -> QScrollArea:
    """``widget`` in a vertical scroll area: its height never forces the window's."""
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setWidget(widget)
    return area


class Cockpit(QWidget):
    """The main dock widget (see the module docstring). Tabs: ``data``, ``curate``, ``parameters``, ``run``,
    ``validate``; ``state`` is the viewer's :class:`CockpitState`."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self._window: QMainWindow | None = None
        self.viewer = napari_viewer
        self._built: dict[str, QWidget] = {}
        self._building: dict[str, Iterator[None]] = {}  # tabs being built, piece by piece
        self._state: CockpitState | None = None
        self._closed = False
        self.tabs = QTabWidget()
        self.tabs.setUsesScrollButtons(False)
        self.tabs.setDocumentMode(True)
        self._pages: dict[str, QVBoxLayout] = {}
        for name in TABS:  # a page per tab, "Loading…" until the tab's widget is built into it
            page = QWidget()
            page_layout = QVBoxLayout(page)
            page_layout.setContentsMargins(0, 0, 0, 0)
            page_layout.addWidget(QLabel("Loading…"), alignment=Qt.AlignmentFlag.AlignTop)
            self._pages[name] = page_layout
            self.tabs.addTab(page, name)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.tabs)
        self.setMinimumWidth(MIN_WIDTH_PX)
        self._fit_attempts = 5
        self._fit_timer = QTimer(self)
        self._fit_timer.setSingleShot(True)
        self._fit_timer.timeout.connect(lambda: self.fit_width(self._fit_attempts))
        self._holds_interpreter = True
        _interpreter.hold()  # before the import thread starts: the GUI thread gets the GIL back within 1 ms
        self.warmer = warm_once()
        self.warmer.ready.connect(_interpreter.freeze_new)  # the kernels' objects live as long as the process
        self.warmer.defer_while(self._loading)  # their loading waits while a series opens
        self.shader_warmer = ShaderCacheWarmer(self)  # started once the tabs' modules are loaded
        self._close_watcher = WindowCloseWatcher(self, self.close_session)
        self._importer = create_worker(self._load_in_thread, _start_thread=False, _ignore_errors=True)
        self._importer.finished.connect(self._on_imported)
        QTimer.singleShot(IMPORT_DELAY_MS, self._importer.start)

    # ------------------------------------------------------------------ building the tabs
    @property
    def tabs_built(self) -> bool:
        """Whether every tab's widget exists (built in the background's wake, or on first use)."""
        return len(self._built) == len(TABS)

    def _load_in_thread(self) -> None:
        """The import thread's work: the tabs' modules, then the GL warm-up's stand-in layers if it may need them
        (:meth:`ShaderCacheWarmer.prepare`: made here, before the tabs are built, not in a thread beside them, where
        each GUI-thread call into Qt waited for the interpreter lock again: a tab's piece of ~10 ms took 15-104 ms).
        pint's units come first, whole (:mod:`._units`: those layers would otherwise fill pint's lazy registry
        here while a layer made on the GUI thread found it empty)."""
        load_unit_registry()
        _import_tab_modules()
        if not self._closed:
            self.shader_warmer.prepare()

    def _on_imported(self) -> None:
        if not self._closed:
            _interpreter.freeze_new()  # the modules' objects, out of full collections like the rest at opening
            self._build_later(0)
            # the GL warm-up's stages go between the tabs' pieces (its stand-in layers are made: no thread runs
            # Python beside them), and it is done sooner than when started after the tabs (before Open Sample)
            self.shader_warmer.start()

    def _build_later(self, index: int) -> None:
        """Build the next piece of tab ``TABS[index]`` in a later event-loop turn, then the next piece or tab (each
        in a turn of its own)."""
        if index < len(TABS):
            QTimer.singleShot(0, lambda: self._build_now(index))

    def _build_now(self, index: int) -> None:
        if self._closed:
            return
        name = TABS[index]
        if name not in self._built:
            next(self._pieces(name), None)
        self._build_later(index if name not in self._built else index + 1)

    def _tab(self, name: str) -> QWidget:
        """Tab ``name``'s widget, built now if it is not yet (what is left of it), after the tabs before it (in
        :data:`TABS` order, as they rely on: e.g. the Curate tab adopts the open tracks that the Parameters tab
        checks, and Validate is wired to Run)."""
        if name not in self._built:
            for before in TABS[:TABS.index(name)]:
                self._tab(before)
            for _ in self._pieces(name):
                pass
        return self._built[name]

    def _pieces(self, name: str) -> Iterator[None]:
        """Tab ``name``'s building, one piece per step (the same iterator until the tab is built)."""
        if name not in self._building:
            self._building[name] = self._build_steps(name)
        return self._building[name]

    def _build_steps(self, name: str) -> Iterator[None]:
        """Build tab ``name`` into its page: the widget, then (the parameter form) its rows a few per step."""
        from ._curation import CurationWidget
        from ._loader import TiltSeriesLoader
        from .params_widget import ParametersWidget
        from .run_widget import RunWidget
        from .validation import ShiftValidation

        viewer, state = self.viewer, self.state
        if name == "Data":
            widget = TiltSeriesLoader(viewer)
            widget.loaded.connect(self._on_loaded)
        elif name == "Curate":
            widget = CurationWidget(viewer, state)
        elif name == "Parameters":
            widget = ParametersWidget(viewer, state, in_steps=True)
        elif name == "Run":
            widget = RunWidget(viewer, state)
            widget.run_finished.connect(self._on_run_finished)
        else:
            widget = ShiftValidation(viewer, state)
            self._built["Run"].review_shown.connect(widget.show_entry)
        page = self._pages[name]
        while page.count():
            page.takeAt(0).widget().deleteLater()
        # the parameter form scrolls by itself (its project buttons and messages stay in view)
        page.addWidget(widget if name == "Parameters" else _scrolled(widget))
        if name == "Parameters":  # its rows join it in the window, a few per step
            yield
            yield from widget.building
        self._built[name] = widget
        del self._building[name]

    def _loading(self) -> bool:
        """Whether the Data tab is opening a series (its layers made, or the sample's tilts streaming in)."""
        data = self._built.get("Data")
        return data is not None and data.busy

    @property
    def state(self) -> CockpitState:
        """The viewer's :class:`CockpitState` (shared with every tab)."""
        if self._state is None:
            from ._owner import state_of

            self._state = state_of(self.viewer)
        return self._state

    @property
    def data(self) -> TiltSeriesLoader:
        return self._tab("Data")

    @property
    def curate(self) -> CurationWidget:
        return self._tab("Curate")

    @property
    def parameters(self) -> ParametersWidget:
        return self._tab("Parameters")

    @property
    def run(self) -> RunWidget:
        return self._tab("Run")

    @property
    def validate(self) -> ShiftValidation:
        return self._tab("Validate")

    def sizeHint(self) -> QSize:
        """The fitted width once docked in the main window (the window is laid out once, not once more by
        :meth:`fit_width`: each layout resizes and repaints the canvas), else :data:`PREFERRED_WIDTH_PX`."""
        window = self.window()
        fitted = self._fitted_width(window) if isinstance(window, QMainWindow) else None
        return QSize(fitted or PREFERRED_WIDTH_PX, super().sizeHint().height())

    # ------------------------------------------------------------------ fitting the window
    def _dock(self) -> QDockWidget | None:
        parent = self.parentWidget()
        while parent is not None and not isinstance(parent, QDockWidget):
            parent = parent.parentWidget()
        return parent

    def _fitted_width(self, window: QMainWindow | None = None) -> int | None:
        """The width that leaves the canvas at least half of ``window`` (between :data:`MIN_WIDTH_PX` and
        :data:`PREFERRED_WIDTH_PX`), when the cockpit is docked on its side; else None. (Qt asks the size hint at each
        layout, e.g. when a Run tab's label changes: the window's docks are its direct children, and searching its
        ~1250 descendants instead took ~0.9 ms of each call, holding the interpreter lock.)"""
        dock = self._dock()
        window = window if window is not None else self._window
        if dock is None or window is None or dock.isFloating():
            return None
        area = window.dockWidgetArea(dock)
        if area not in (Qt.DockWidgetArea.RightDockWidgetArea, Qt.DockWidgetArea.LeftDockWidgetArea):
            return None
        other = (Qt.DockWidgetArea.LeftDockWidgetArea if area == Qt.DockWidgetArea.RightDockWidgetArea
                 else Qt.DockWidgetArea.RightDockWidgetArea)
        docks = window.findChildren(QDockWidget, options=Qt.FindChildOption.FindDirectChildrenOnly)
        beside = max((max(d.width(), LAYER_DOCKS_PX) for d in docks
                      if d.isVisible() and not d.isFloating() and window.dockWidgetArea(d) == other), default=0)
        room = window.width() - window.width() // 2 - beside - _MARGIN_PX
        return max(MIN_WIDTH_PX, min(PREFERRED_WIDTH_PX, room))

    def fit_width(self, attempts: int = 5) -> None:
        """Give the cockpit the width that leaves the canvas at least half of the window (between
        :data:`MIN_WIDTH_PX` and :data:`PREFERRED_WIDTH_PX`), when it is docked on the side."""
        target = self._fitted_width()
        dock = self._dock()
        if target is not None and abs(dock.width() - target) > 2:
            self._window.resizeDocks([dock], [target], Qt.Orientation.Horizontal)
            if attempts > 1:  # a window still being laid out may ignore it: look again
                self._fit_later(attempts - 1)

    def _fit_later(self, attempts: int = 5) -> None:
        """:meth:`fit_width` after :data:`FIT_DELAY_MS` (the timer is the cockpit's child: it dies with it)."""
        self._fit_attempts = attempts
        self._fit_timer.start(FIT_DELAY_MS)

    def showEvent(self, event) -> None:
        super().showEvent(event)
        window = self.window()
        if isinstance(window, QMainWindow) and window is not self._window:
            self._window = window
            window.installEventFilter(self)
        self._fit_later()  # once the docks are laid out

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:
        window = getattr(self, "_window", None)  # None while the widget is being torn down
        if window is not None and obj is window and event.type() == QEvent.Type.Resize:
            self._fit_later()
        return False

    def show_tab(self, name: str) -> None:
        """Bring tab ``name`` (one of :data:`TABS`) to the front."""
        self.tabs.setCurrentIndex(TABS.index(name))

    def _on_loaded(self, layers) -> None:
        roles = {layer.metadata.get("cspt2d", {}).get("role"): layer for layer in layers}
        if "tracks" in roles:
            self.show_tab("Curate")
        if "tiltseries" in roles:  # the layers results need, empty and hidden, each in turns of their own
            from ._stages import in_own_turn

            pixel_A = float(roles["tiltseries"].metadata["cspt2d"]["pixel_A"])
            in_own_turn(lambda: self.validate.prepare_layer(pixel_A))  # the refined shifts
            in_own_turn(self.run.map_panel.prepare)  # the map, in the docked viewer

    def _on_run_finished(self, state: str) -> None:
        if state == "done" and self.run.results and self.run.results[-1].review is not None:
            self.show_tab("Validate")

    def close_session(self) -> None:
        """The window closes: every tab stops (a run, the preview, autosave flushed, the map viewer freed)."""
        self._closed = True
        for name in ("Curate", "Run", "Validate"):
            if name in self._built:
                self._built[name].close_session()
        self._fit_timer.stop()
        if self._window is not None:
            self._window.removeEventFilter(self)
            self._window = None
        self.warmer.stop_deferring(self._loading)
        self.warmer.stop()
        self.shader_warmer.stop()
        if self._holds_interpreter:
            self._holds_interpreter = False
            _interpreter.release()
