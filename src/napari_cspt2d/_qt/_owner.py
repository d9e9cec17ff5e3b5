"""The one owner per viewer: the tracks document being curated, the parameters, the project and the run history.

Every tab of the cockpit (and each widget used on its own from Python) is handed the :class:`CockpitState` of its
viewer (:func:`state_of`) instead of finding the other widgets: the Curate tab publishes the document it curates, the
Parameters tab the parameters whenever the form is valid (or what is wrong with it) and the project folder, the Run
tab takes a :class:`~napari_cspt2d.runs.Session` from here and adds its results to the history.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtpy.QtCore import QObject, Signal

from ..errors import CsptInputError
from ..io.mrc import open_stack
from ..model.editing import TrackDocument
from ..model.params import PypParameters
from ..runs import Session
from ._tilt_overlay import tiltseries_layer

__all__ = ["CockpitState", "HistoryEntry", "state_of"]

_STATES: dict[int, CockpitState] = {}


@dataclass(frozen=True, eq=False)
class HistoryEntry:
    """One finished step of a run: ``run`` (1, 2, ... in this session), ``iteration`` (1 = map of the curated tracks),
    ``resolution_A`` at FSC 0.143, the run's ``mode``, the prepared ``result`` (a
    :class:`~napari_cspt2d.runs.PreparedIteration`) that shows it again and the run's ``session``."""

    run: int
    iteration: int
    resolution_A: float
    mode: str
    result: Any
    session: Session

    @property
    def label(self) -> str:
        return f"run {self.run} · iteration {self.iteration}"


class CockpitState(QObject):
    """What the tabs share for one viewer (see the module docstring).

    Signals: ``document_changed(object)`` (a :class:`TrackDocument` or None), ``parameters_changed(object)``
    (:class:`PypParameters` or None when the form is invalid), ``project_changed(object)`` (``Path``),
    ``history_changed()``."""

    document_changed = Signal(object)
    parameters_changed = Signal(object)
    project_changed = Signal(object)
    history_changed = Signal()

    def __init__(self, viewer) -> None:
        super().__init__()
        self._viewer = weakref.ref(viewer)
        self.document: TrackDocument | None = None
        self.controller = None  # the TracksLayerController of the curated layer (Curate tab)
        self.parameters: PypParameters | None = None
        self.parameters_problem = "the Parameters tab has not been filled"
        self.project_dir: Path | None = None
        self.history: list[HistoryEntry] = []
        self.runs = 0

    @property
    def viewer(self):
        """The viewer (held weakly: the state never keeps a closed viewer alive)."""
        return self._viewer()

    # ------------------------------------------------------------------ published by the tabs
    def set_document(self, document: TrackDocument | None, controller=None) -> None:
        self.document, self.controller = document, controller
        self.document_changed.emit(document)

    def set_parameters(self, parameters: PypParameters | None, problem: str = "") -> None:
        self.parameters, self.parameters_problem = parameters, problem
        self.parameters_changed.emit(parameters)

    def set_project(self, root: Path | None) -> None:
        self.project_dir = None if root is None else Path(root)
        self.project_changed.emit(self.project_dir)

    def add_history(self, entry: HistoryEntry) -> None:
        self.history.append(entry)
        self.history_changed.emit()

    def next_run(self) -> int:
        self.runs += 1
        return self.runs

    # ------------------------------------------------------------------ the run's snapshot
    def session(self, *, parameters: PypParameters | None = None) -> Session:
        """A :class:`Session` of this moment: the tilt series shown, the tracks being curated, the parameters
        (``parameters``, else the Parameters tab's, which must be valid) and the project folder."""
        layer = tiltseries_layer(self.viewer)
        if layer is None:
            raise CsptInputError("no tilt series is shown", field="tilt series",
                                 expected="a stack opened in the Data tab, File > Open or the sample")
        meta = layer.metadata["cspt2d"]
        stream = meta.get("stream")
        if stream is not None and not stream.complete:
            raise CsptInputError(f"is still being made ({stream.done} of {len(stream.order)} tilts)",
                                 field="tilt series", expected="the sample's tilts made (progress in the Data tab)")
        path = Path(meta["path"]) if meta.get("path") else None
        stack = layer.data if meta.get("bin", 1) == 1 else open_stack(path)[0]
        document = self.document
        if document is None:
            raise CsptInputError("no tracks are being curated", field="tracks",
                                 expected="tracks opened with the stack (Data tab, File > Open or the sample)")
        tracks = document.tracks
        if tracks.image_shape_yx != tuple(stack.shape[1:]):
            raise CsptInputError(f"are for images of {tracks.image_shape_yx}, the stack has {tuple(stack.shape[1:])}",
                                 field="tracks", expected="tracks of the tilt series shown")
        if parameters is None:
            if self.parameters is None:
                raise CsptInputError(self.parameters_problem, field="parameters",
                                     expected="the values marked in the Parameters tab fixed")
            parameters = self.parameters
        return Session(stack, path, meta.get("tilts"), document, tracks, parameters, self.project_dir,
                       str(meta.get("name", "tiltseries")))


def state_of(viewer) -> CockpitState:
    """The :class:`CockpitState` of ``viewer`` (made on first use, forgotten with the viewer). napari hands plugin
    widgets a proxy of the viewer: the state belongs to the viewer behind it."""
    viewer = getattr(viewer, "__wrapped__", viewer)
    key = id(viewer)
    state = _STATES.get(key)
    if state is None or state.viewer is not viewer:
        state = _STATES[key] = CockpitState(viewer)
        weakref.finalize(viewer, _forget, key, state)
    return state


def _forget(key: int, state: CockpitState) -> None:
    if _STATES.get(key) is state:  # the id may already belong to a newer viewer
        del _STATES[key]
