"""The "Parameters" dock widget: every key of :data:`~napari_cspt2d.model.params.PARAMS` as a form, and the project.

The form is generated from the PARAMS table: one collapsible group per :data:`GROUPS` entry (data, extraction,
refinement, reconstruction, cluster), each key with its label, unit and help text (tooltip). Values are checked as
they are typed, by the same rules as :class:`PypParameters` (range, choices, pattern, colon lists): a bad value turns
its field red with the reason under it; inconsistent combinations (box smaller than the particle, last iteration
before the first, ...) and the 2D-CSPT mode conditions are listed at the bottom. Keys of a loaded
``.pyp_config.toml`` that napari-cspt2d does not use are kept and written back.

The project row is a pyp project folder (:func:`napari_cspt2d.pyp.create_project` layout): *Open* reads its
parameters and, when the viewer has no tilt series yet, its stack and tracks; *Create* writes a project from the
tilt series shown and the tracks being curated. Runs write their outputs into the project.

The form publishes to the viewer's :class:`~napari_cspt2d._qt._owner.CockpitState`: the parameters whenever they are
valid (or what is wrong), and the project folder; a run takes its session from there.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from .. import pyp
from .._reader import series_layer_data
from ..errors import CsptInputError, CsptInputWarning
from ..io.toml import CONFIG_NAME, load_params, save_params
from ..model.params import GROUPS, PARAMS, ParamSpec, PypParameters, check_cspt_mode
from ..model.tiltseries import TiltSeries
from ._guard import report_errors
from ._loader import _PathRow, add_layers
from ._owner import CockpitState, state_of
from ._tilt_overlay import tiltseries_layer

__all__ = ["ParametersWidget", "suggested_box"]

EXPANDED_GROUPS = ("data", "extraction", "refinement")
_ERROR_STYLE = "color: #e0524f"
_WARNING_STYLE = "color: #d9a400"
_INT_LIMIT = 2**31 - 1
#: Rows of the form built in one step (:attr:`ParametersWidget.building`): about 5 ms on the GUI thread.
ROWS_PER_STEP = 8


#: Box sizes suggested by "From data" (even, FFT-friendly).
GOOD_BOXES = (32, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024)


def suggested_box(radius_px: float) -> int:
    """Smallest :data:`GOOD_BOXES` size of at least 2.5 particle radii (``radius_px`` in extracted pixels)."""
    return next((b for b in GOOD_BOXES if b >= 2.5 * radius_px), GOOD_BOXES[-1])


def _format(value: Any) -> str:
    """Text of a value in a line edit: ``1.35``, ``100``, ``8:7:6``."""
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def _tooltip(spec: ParamSpec) -> str:
    unit = f" [{spec.unit}]" if spec.unit else ""
    rng = "" if spec.type in (bool, str) and not spec.per_iteration else f"<br>Range: {spec.describe_range()}"
    if spec.choices:
        rng = "<br>Choices: " + ", ".join(spec.choices)
    origin = "" if spec.pyp else "<br><i>napari-cspt2d setting (pyp does not read it)</i>"
    return f"<b>{spec.name}</b>{unit}<br>{spec.help}{rng}<br>Default: {_format(spec.default)!s}{origin}"


_PROBLEM_STYLE = "border: 1px solid #e0524f"


class _Field(QWidget):
    """Editor of one parameter: the input widget and an inline message under it."""

    def __init__(self, spec: ParamSpec, on_edit) -> None:
        super().__init__()
        self.spec = spec
        self.editor = self._make_editor(spec, on_edit)
        self.editor.setToolTip(_tooltip(spec))
        self.message = QLabel()
        self.message.setWordWrap(True)
        self.message.setStyleSheet(_ERROR_STYLE)
        self.message.hide()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(1)
        layout.addWidget(self.editor)
        layout.addWidget(self.message)

    @staticmethod
    def _make_editor(spec: ParamSpec, on_edit) -> QWidget:
        if spec.type is bool:
            editor = QCheckBox()
            editor.toggled.connect(on_edit)
        elif spec.choices:
            editor = QComboBox()
            editor.addItems(list(spec.choices))
            editor.currentTextChanged.connect(on_edit)
        elif spec.type is int and not spec.fraction:  # a fraction-taking key is typed, like floats
            editor = QSpinBox()
            low = -_INT_LIMIT if spec.minimum is None else int(math.ceil(spec.minimum)) + int(spec.min_exclusive)
            editor.setRange(low, _INT_LIMIT if spec.maximum is None else int(spec.maximum))
            if spec.unit:
                editor.setSuffix(f" {spec.unit}")
            editor.valueChanged.connect(on_edit)
        else:  # float, str and fraction-taking ints: typed freely, checked by the PypParameters rules
            editor = QLineEdit()
            editor.setPlaceholderText(_format(spec.default) or "(empty)")
            editor.textChanged.connect(on_edit)
        return editor

    def value(self) -> Any:
        e = self.editor
        if isinstance(e, QCheckBox):
            return e.isChecked()
        if isinstance(e, QComboBox):
            return e.currentText()
        if isinstance(e, QSpinBox):
            return e.value()
        text = e.text().strip()
        return text if self.spec.type is str else (text or None)

    def set_value(self, value: Any) -> None:
        e = self.editor
        e.blockSignals(True)
        try:
            if isinstance(e, QCheckBox):
                e.setChecked(bool(value))
            elif isinstance(e, QComboBox):
                e.setCurrentText(str(value))
            elif isinstance(e, QSpinBox):
                e.setValue(int(value))
            else:
                e.setText(_format(value))
        finally:
            e.blockSignals(False)

    def set_problem(self, text: str | None, *, inline: bool = True) -> None:
        """Mark the field as wrong (red frame) with ``text`` under it (``inline=False``: frame only). Only what
        changes is touched: a style sheet set, even to the same text, re-polishes the editor under napari's style
        sheet (~1 ms each; the whole form was re-polished after every check, ~100 ms when the tracks came)."""
        style = "" if text is None else _PROBLEM_STYLE
        if self.editor.styleSheet() != style:
            self.editor.setStyleSheet(style)
        if self.message.text() != (text or ""):
            self.message.setText(text or "")
        shown = bool(text) and inline
        if self.message.isHidden() == shown:
            self.message.setVisible(shown)


class _FolderRow(_PathRow):
    """A folder path with a browse button."""

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, self.caption, self.text())
        if path:
            self.edit.setText(path)


class ParametersWidget(QWidget):
    """Dock widget with the parameter form and the project folder (see the module docstring).

    Signals: ``parameters_changed(object)`` with the new :class:`PypParameters` after every edit that leaves the form
    valid; ``project_changed(object)`` with the project folder (``Path``) when a project is opened or created.

    ``in_steps``: the form's fields are not built yet; ``building`` builds them a few rows per step (the cockpit runs
    one step per event-loop turn), and the widget is usable once every step has run."""

    parameters_changed = Signal(object)
    project_changed = Signal(object)

    def __init__(self, napari_viewer=None, state: CockpitState | None = None, *, in_steps: bool = False) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state_owner = state if state is not None or napari_viewer is None else state_of(napari_viewer)
        self.fields: dict[str, _Field] = {}
        self.groups: dict[str, QCollapsible] = {}
        self._extra: dict[str, Any] = {}
        self._source: str | None = None
        self._valid: PypParameters | None = None
        self.project_dir: Path | None = None
        self.touched = False  # edited, loaded or opened: "From data" is then only done on request
        self._build_frame()
        self.building = self._build_steps()
        if not in_steps:
            for _ in self.building:
                pass

    # ------------------------------------------------------------------ UI
    def _build_steps(self) -> Iterator[None]:
        """The form's groups, :data:`ROWS_PER_STEP` rows per step, each joining the form once whole (a step of its
        own: the form may already be in the window); then the values checked and published."""
        for group in GROUPS:
            content = QWidget()
            form = QFormLayout(content)
            form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
            form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
            specs = [s for s in PARAMS.values() if s.group == group]
            for start in range(0, len(specs), ROWS_PER_STEP):
                for spec in specs[start:start + ROWS_PER_STEP]:
                    field = _Field(spec, lambda *_, n=spec.name: self._on_edit(n))
                    label = QLabel(f"{spec.label} ({spec.unit})" if spec.unit else spec.label)
                    label.setWordWrap(True)
                    label.setToolTip(_tooltip(spec))
                    form.addRow(label, field)
                    self.fields[spec.name] = field
                yield
            box = QCollapsible(group.capitalize())
            box.addWidget(content)
            if group in EXPANDED_GROUPS:
                box.expand(animate=False)
            else:
                box.collapse(animate=False)
            self.groups[group] = box
            self._body_layout.insertWidget(len(self.groups) - 1, box)
            yield
        self.scroll.setWidgetResizable(True)  # the form sized and laid out now, not in a later turn: a field
        self._body_layout.activate()  # can be scrolled to at once
        self.set_parameters({})
        if self.viewer is not None:
            self.viewer.layers.events.inserted.connect(self._on_layer_inserted)
            if tiltseries_layer(self.viewer) is not None:
                self.fill_from_viewer()

    def _build_frame(self) -> None:
        """The project row, its buttons, the scroll area of the form (its groups come in :meth:`_build_steps`) and the
        summary."""
        outer = QVBoxLayout(self)
        project = QFormLayout()
        self.folder = _FolderRow("Project folder", "", "pyp project folder")
        project.addRow("Project", self.folder)
        outer.addLayout(project)
        buttons = QGridLayout()
        for i, (attr, text, slot, tip) in enumerate((
            ("open_button", "Open project", self.open_project_dialog,
             "Read .pyp_config.toml (and the stack and tracks when none are shown) from the project folder"),
            ("create_button", "Create project", self.create_project_dialog,
             "Write a pyp project (stack, {name}.pkl, .cistem pair, parameters) from the tilt series and tracks shown"),
            ("load_button", "Load…", self.load_dialog, "Read parameters from a .pyp_config.toml"),
            ("save_button", "Save…", self.save_dialog, "Write the parameters as .pyp_config.toml"),
            ("from_data_button", "From data", self.fill_from_viewer,
             "Pixel size, optics, particle radius, box and name from the tilt series and tracks shown"),
            ("defaults_button", "Defaults", self.reset_defaults, "Every parameter back to its default"),
        )):
            button = QPushButton(text)
            button.setToolTip(tip)
            button.clicked.connect(lambda _=False, s=slot: s())
            setattr(self, attr, button)
            buttons.addWidget(button, i // 2, i % 2)
        outer.addLayout(buttons)
        self.project_label = QLabel("No project folder: runs keep their results in the viewer only.")
        self.project_label.setWordWrap(True)
        outer.addWidget(self.project_label)

        body = QWidget()
        self._body_layout = QVBoxLayout(body)
        self._body_layout.setContentsMargins(0, 0, 0, 0)
        self._body_layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(body)
        self.scroll = scroll
        outer.addWidget(scroll, 1)
        self.summary = QLabel()
        self.summary.setWordWrap(True)
        outer.addWidget(self.summary)

    # ------------------------------------------------------------------ values
    def form_values(self) -> dict[str, Any]:
        """The raw values of the form (not validated), by key."""
        return {name: field.value() for name, field in self.fields.items()}

    def set_parameters(self, values: Mapping[str, Any], *, source: str | os.PathLike[str] | None = None) -> None:
        """Fill the form from ``values`` (missing keys get their defaults; other pyp keys are kept) and check it."""
        params = values if isinstance(values, PypParameters) else PypParameters(values, strict=False)
        for name, field in self.fields.items():
            field.set_value(params[name])
        self._extra = dict(params.extra)
        self._source = None if source is None else os.fspath(source)
        self._validate()

    def reset_defaults(self) -> None:
        self.set_parameters({})

    @report_errors("Parameters from the data")
    def fill_from_viewer(self) -> None:
        """Take the parameters from the layers shown: the data's own settings when it carries them (the sample, a
        project's tracks); otherwise the data set name and pixel size (tilt series), the particle radius and optics
        (tracks layer), and a box of about 2.5 particle radii (at least the extraction minimum)."""
        layer = tiltseries_layer(self.viewer)
        if layer is None:
            raise CsptInputError("no tilt series is shown", field="tilt series", expected="a tilt series layer")
        meta = layer.metadata["cspt2d"]
        pixel_A = float(meta["pixel_A"])
        tracks = next((lyr.metadata["cspt2d"] for lyr in self.viewer.layers
                       if lyr.metadata.get("cspt2d", {}).get("role") == "tracks"), None)
        values: dict[str, Any] = {"scope_pixel": pixel_A / self.fields["data_bin"].value()}
        if meta.get("name"):
            values["data_set"] = meta["name"]
        if tracks is not None and tracks.get("params"):
            values = dict(tracks["params"])
        elif tracks is not None:
            radius_A = float(tracks["radius_px"]) * pixel_A
            values["particle_rad"] = radius_A
            values["extract_box"] = suggested_box(radius_A / (pixel_A * self.fields["extract_bin"].value()))
            optics = tracks.get("microscope") or {}
            for key, name in (("voltage_kV", "scope_voltage"), ("cs_mm", "scope_cs"), ("amp_contrast", "scope_wgh")):
                if key in optics:
                    values[name] = float(optics[key])
        if tracks is not None and tracks.get("params"):
            self.set_parameters(values)
        else:
            for name, value in values.items():
                self.fields[name].set_value(value)
        if self._validate() is not None:
            self.parameters_changed.emit(self._copy())

    def set_value(self, name: str, value: Any) -> None:
        """Set one field as if typed (``value`` as the editor shows it); the form is checked again."""
        if name not in self.fields:
            raise CsptInputError("is not a parameter", field=name, expected="a key of PARAMS")
        self.fields[name].set_value(value)
        self._on_edit(name)

    @property
    def is_valid(self) -> bool:
        return self._valid is not None

    def parameters(self) -> PypParameters:
        """The parameters of the form, validated; raises :class:`CsptInputError` naming every field that is wrong."""
        if self._valid is None:
            raise CsptInputError(self.summary.text() or "invalid parameters", file=self._source,
                                 field=", ".join(n for n, f in self.fields.items() if f.message.text()) or None,
                                 expected="the values marked in the Parameters widget fixed")
        return self._copy()

    def _copy(self) -> PypParameters:
        """A copy of the valid parameters; the warnings copying repeats are already shown in the summary."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CsptInputWarning)
            return self._valid.copy()

    def _on_layer_inserted(self, event) -> None:
        role = event.value.metadata.get("cspt2d", {}).get("role")
        if role in ("tiltseries", "tracks") and not self.touched and tiltseries_layer(self.viewer) is not None:
            self.fill_from_viewer()

    def _on_edit(self, name: str) -> None:
        self.touched = True
        if self._validate() is not None:
            self.parameters_changed.emit(self._copy())

    def _validate(self) -> PypParameters | None:
        """Check every field, then the combination; show the messages; returns the parameters when valid."""
        params = PypParameters(strict=False, source=self._source)
        params.extra.update(self._extra)
        problems: dict[str, str] = {}
        for name, field in self.fields.items():
            try:
                value = field.value()
                params[name] = PARAMS[name].default if value is None else value
            except CsptInputError as exc:
                problems[name] = exc.reason + (f" (expected {exc.expected})" if exc.expected else "")
        messages: list[str] = []
        warned: list[str] = []
        marked: set[str] = set()
        if not problems:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    params.validate()
                    check_cspt_mode(params)
                except CsptInputError as exc:
                    messages.append(exc.reason)
                    marked = {f.strip() for part in (exc.field or "").split(",") for f in part.split("/")}
            warned = [str(w.message).split(": ", 2)[-1] for w in caught]
        for name, field in self.fields.items():
            if name in problems:
                field.set_problem(problems[name])
            else:
                field.set_problem(messages[0] if name in marked and messages else None)
        if problems:
            messages.insert(0, f"{len(problems)} field(s) to fix: {', '.join(problems)}")
        self._valid = None if messages else params
        text = "\n".join(messages) if messages else "\n".join(warned)
        style = _ERROR_STYLE if messages else _WARNING_STYLE
        if self.summary.styleSheet() != style:  # only when it changes (a style sheet set re-polishes)
            self.summary.setStyleSheet(style)
        self.summary.setText(text)
        self.summary.setVisible(bool(text))
        for name in sorted(set(problems) | marked):  # the first field to fix is scrolled into view
            if name in self.fields and self.fields[name].isVisibleTo(self):
                self.scroll.ensureWidgetVisible(self.fields[name])
                break
        if self.state_owner is not None:
            self.state_owner.set_parameters(None if self._valid is None else self._copy(), text)
        return self._valid

    # ------------------------------------------------------------------ files
    def load(self, path: str | os.PathLike[str]) -> PypParameters:
        """Read ``.pyp_config.toml`` (the file or a folder holding it) into the form."""
        params = load_params(path, strict=False)
        self.set_parameters(params, source=params.source)
        self.touched = True
        return params

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the parameters to ``path`` (file or folder; default: the project folder), atomically."""
        target = path if path is not None else self.project_dir
        if target is None:
            raise CsptInputError("no file chosen and no project open", field="path",
                                 expected="a .pyp_config.toml path or an open project")
        return save_params(self.parameters(), target)

    @report_errors("Load parameters")
    def load_dialog(self) -> None:
        start = str(self.project_dir or "")
        path, _ = QFileDialog.getOpenFileName(self, "Load parameters", start, "pyp parameters (*.toml);;All files (*)")
        if path:
            self.load(path)

    @report_errors("Save parameters")
    def save_dialog(self) -> None:
        start = str((self.project_dir or Path.cwd()) / CONFIG_NAME)
        path, _ = QFileDialog.getSaveFileName(self, "Save parameters", start, "pyp parameters (*.toml)")
        if path:
            self.save(path)

    # ------------------------------------------------------------------ projects
    def _project_name(self, folder: Path) -> str:
        name = self.fields["data_set"].value()
        config = folder / CONFIG_NAME
        if config.is_file():
            name = load_params(config, strict=False)["data_set"] or name
        if not name:
            stacks = sorted(folder.glob("*_stack.mrc"))
            if len(stacks) != 1:
                raise CsptInputError(f"holds {len(stacks)} *_stack.mrc files and data_set is empty", file=folder,
                                     field="data_set", expected="the project name in data_set")
            name = stacks[0].name[: -len("_stack.mrc")]
        return name

    def open_project(self, folder: str | os.PathLike[str]) -> Path:
        """Read a project's parameters; when the viewer shows no tilt series, also open its stack and tracks."""
        root = Path(folder)
        name = self._project_name(root)
        params, tracks, _ = pyp.load_project(root, name)
        if self.viewer is not None and tiltseries_layer(self.viewer) is None:
            series = TiltSeries.open(root / f"{name}_stack.mrc", root / f"{name}.pkl")
            cistem = root / "frealign" / "maps" / f"{name}_r01.cistem"
            add_layers(self.viewer, series_layer_data(series, tracks, radius_px=params["particle_rad"] / series.pixel_A,
                                                      source=str(cistem)))
        if not params["data_set"]:
            params["data_set"] = name
        self.set_parameters(params, source=params.source)
        self.touched = True
        self._set_project(root)
        return root

    def create_project(self, folder: str | os.PathLike[str]) -> dict[str, Path]:
        """Write a pyp project into ``folder`` from the viewer's tilt series and curated tracks and the form."""
        s = self._state().session(parameters=self.parameters())
        name = s.params["data_set"] or s.series_name
        stack = s.stack_path if s.stack_path is not None else np.asarray(s.stack)
        paths = pyp.create_project(folder, name, stack, s.tracks, s.params, angles=s.tilts)
        if not self.fields["data_set"].value():
            self.set_value("data_set", name)
        self._set_project(Path(folder))
        return paths

    def _set_project(self, root: Path) -> None:
        self.project_dir = root
        self.folder.setText(str(root))
        self.project_label.setText(f"Project: {root} ({self.fields['data_set'].value()})")
        if self.state_owner is not None:
            self.state_owner.set_project(root)
        self.project_changed.emit(root)

    def _state(self) -> CockpitState:
        if self.state_owner is None:
            raise CsptInputError("is not in a viewer", field="parameters", expected="the form docked in napari")
        return self.state_owner

    def _chosen_folder(self) -> Path:
        text = self.folder.text()
        if not text:
            raise CsptInputError("no folder chosen", field="project", expected="a project folder (…)")
        return Path(text)

    @report_errors("Open project")
    def open_project_dialog(self) -> None:
        self.open_project(self._chosen_folder())

    @report_errors("Create project")
    def create_project_dialog(self) -> None:
        self.create_project(self._chosen_folder())
