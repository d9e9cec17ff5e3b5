"""The Parameters widget in a real, shown napari viewer (Xvfb): the form generated from PARAMS, inline validation,
load/save of .pyp_config.toml, values from the data, and pyp projects.

Run under pytest-xvfb (``QT_QPA_PLATFORM=offscreen`` does not work for a napari Viewer)."""

from __future__ import annotations

import pytest

pytest.importorskip("napari")
pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("cache_home")]

from qtpy.QtCore import QEvent, QObject, Qt  # noqa: E402
from qtpy.QtWidgets import QCheckBox, QComboBox, QLineEdit, QSpinBox  # noqa: E402

from napari_cspt2d import pyp  # noqa: E402
from napari_cspt2d._qt._loader import add_layers  # noqa: E402
from napari_cspt2d._qt._tilt_overlay import tiltseries_layer  # noqa: E402
from napari_cspt2d._qt._owner import state_of  # noqa: E402
from napari_cspt2d._qt.params_widget import ParametersWidget, suggested_box  # noqa: E402
from conftest import GUI_SAMPLE as SMALL  # noqa: E402
from napari_cspt2d.errors import CsptInputError  # noqa: E402
from napari_cspt2d.io.toml import load_params  # noqa: E402
from napari_cspt2d.model.params import GROUPS, PARAMS, PypParameters, interpretations  # noqa: E402
from napari_cspt2d.sample import make_sample  # noqa: E402



@pytest.fixture(scope="module")
def sample():
    return make_sample(**SMALL)


def open_params(make_napari_viewer, layers=None):
    viewer = make_napari_viewer(show=True)
    if layers is not None:
        add_layers(viewer, layers)
    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    widget = cockpit.parameters
    cockpit.show_tab("Parameters")
    assert isinstance(widget, ParametersWidget)
    return viewer, widget


def test_form_is_generated_from_the_params_table(make_napari_viewer):
    viewer, widget = open_params(make_napari_viewer)
    assert list(widget.groups) == list(GROUPS)
    assert set(widget.fields) == set(PARAMS)
    kinds = {bool: QCheckBox, int: QSpinBox, float: QLineEdit, str: QLineEdit}
    for name, spec in PARAMS.items():
        editor = widget.fields[name].editor
        expected = QComboBox if spec.choices else QLineEdit if spec.fraction else kinds[spec.type]
        assert isinstance(editor, expected), name
        assert spec.help[:30] in editor.toolTip() and name in editor.toolTip()
        if spec.unit:
            assert f"[{spec.unit}]" in editor.toolTip()
        # the field sits in its group's collapsible box
        assert widget.groups[spec.group].isAncestorOf(editor)
    assert widget.fields["extract_box"].editor.suffix() == " px"
    assert widget.fields["extract_box"].editor.minimum() == PARAMS["extract_box"].minimum
    assert widget.parameters().to_dict() == PypParameters().to_dict()  # defaults


def test_set_parameters_through_the_widget(make_napari_viewer, qtbot):
    viewer, widget = open_params(make_napari_viewer)
    changes = []
    widget.parameters_changed.connect(changes.append)
    pixel = widget.fields["scope_pixel"].editor
    pixel.clear()
    qtbot.keyClicks(pixel, "2.1")
    widget.fields["extract_box"].editor.setValue(128)
    widget.fields["extract_bin"].editor.setValue(2)
    widget.fields["reconstruct_dose_weighting_enable"].editor.setChecked(True)
    widget.fields["cluster_backend"].editor.setCurrentText("slurm")
    rhref = widget.fields["refine_rhref"].editor
    rhref.clear()
    qtbot.keyClicks(rhref, "12:10:8")
    widget.fields["refine_maxiter"].editor.setValue(4)
    p = widget.parameters()
    assert p["scope_pixel"] == 2.1 and p["extract_box"] == 128 and p["extract_bin"] == 2
    assert p["reconstruct_dose_weighting_enable"] is True and p["cluster_backend"] == "slurm"
    assert p["refine_rhref"] == "12:10:8" and p["refine_maxiter"] == 4
    assert p.particle_pixel_A == pytest.approx(4.2)
    assert changes and changes[-1].to_dict() == p.to_dict()


def test_inline_validation_messages(make_napari_viewer, qtbot):
    viewer, widget = open_params(make_napari_viewer)
    field = widget.fields["scope_pixel"]
    field.editor.clear()
    qtbot.keyClicks(field.editor, "-1")
    assert not field.message.isHidden() and "expected a number, > 0" in field.message.text()
    assert "border" in field.editor.styleSheet()
    assert not widget.is_valid and "scope_pixel" in widget.summary.text()
    with pytest.raises(CsptInputError, match="scope_pixel"):
        widget.parameters()
    field.editor.clear()
    qtbot.keyClicks(field.editor, "1.35")
    assert field.message.isHidden() and widget.is_valid and field.editor.styleSheet() == ""

    widget.set_value("refine_rhref", "8:x")  # a colon list with a bad item
    assert "colon list" in widget.fields["refine_rhref"].message.text()
    widget.set_value("refine_rhref", "10")

    # inconsistent combinations: the message under each field concerned (readable, not clipped), and at the bottom
    widget.set_value("particle_rad", "500")
    assert not widget.is_valid and "smaller than the particle diameter" in widget.summary.text()
    box = widget.fields["extract_box"]
    assert "border" in box.editor.styleSheet()
    assert not box.message.isHidden() and "smaller than the particle diameter" in box.message.text()
    qtbot.waitUntil(lambda: box.message.visibleRegion().boundingRect().height() >= box.message.sizeHint().height(),
                    timeout=2000)
    widget.set_value("particle_rad", "100")
    widget.set_value("refine_iter", 3)
    widget.set_value("refine_maxiter", 2)
    assert "is before refine_iter" in widget.summary.text()
    widget.set_value("refine_maxiter", 3)
    assert widget.is_valid

    # the 2D-CSPT mode conditions (the seed's error) are checked too
    widget.fields["csp_no_3d_points"].editor.setChecked(False)
    assert "No output parameter file is generated" in widget.summary.text() and not widget.is_valid
    widget.fields["csp_no_3d_points"].editor.setChecked(True)
    # warnings (beyond Nyquist) are shown without blocking
    widget.set_value("refine_rhref", "2")
    assert widget.is_valid and "Nyquist" in widget.summary.text()


def test_load_and_save_pyp_config_keeps_other_pyp_keys(make_napari_viewer, tmp_path):
    viewer, widget = open_params(make_napari_viewer)
    config = tmp_path / ".pyp_config.toml"
    config.write_text('data_set = "tomo1"\nscope_pixel = 1.08\nextract_box = 192\nparticle_rad = 80.0\n'
                      'refine_rhref = "8:6"\nslurm_queue = "gpu"\ntomo_vir_rad = 150.0\n', encoding="utf-8")
    widget.load(tmp_path)
    assert widget.fields["scope_pixel"].value() == "1.08" and widget.fields["extract_box"].value() == 192
    assert widget.fields["refine_rhref"].value() == "8:6" and widget.fields["slurm_queue"].value() == "gpu"
    widget.set_value("extract_bin", 2)
    out = widget.save(tmp_path / "saved.toml")
    saved = load_params(out, strict=False)
    assert saved["extract_bin"] == 2 and saved["data_set"] == "tomo1" and saved.extra == {"tomo_vir_rad": 150.0}
    with pytest.raises(CsptInputError, match="no file chosen"):
        widget.save()  # no project open


def test_values_from_the_data_shown(make_napari_viewer, sample_layers, sample):
    viewer, widget = open_params(make_napari_viewer, sample_layers)
    p = widget.parameters()
    assert p["data_set"] == "sample" and p["scope_pixel"] == sample.pixel_A
    assert p["particle_rad"] == pytest.approx(sample.params["particle_rad"])
    assert p["extract_box"] == suggested_box(sample.params["particle_rad"] / sample.pixel_A) == SMALL["box"]
    assert (p["scope_voltage"], p["scope_cs"], p["scope_wgh"]) == (sample.params["scope_voltage"],
                                                                  sample.params["scope_cs"],
                                                                  sample.params["scope_wgh"])
    # the sample's own settings, not the form's defaults
    assert p["refine_rhref"] == "20:16:12" and p["refine_rhref"] != PARAMS["refine_rhref"].default
    selection = (p["csp_UseImagesForRefinementMin"], p["csp_UseImagesForRefinementMax"])
    assert selection == (sample.params["csp_UseImagesForRefinementMin"], sample.params["csp_UseImagesForRefinementMax"])
    assert selection == (0, -1) and selection[1] != PARAMS["csp_UseImagesForRefinementMax"].default
    assert interpretations(p) == []  # pyp's meanings: the sample opens without a notice
    assert state_of(viewer).parameters is not None, state_of(viewer).parameters_problem
    assert state_of(viewer).parameters.to_dict() == p.to_dict()  # published to the cockpit's state
    assert not widget.touched


def test_filled_when_the_data_arrives_after_the_widget(make_napari_viewer, sample_layers, sample):
    viewer, widget = open_params(make_napari_viewer)
    assert widget.parameters()["scope_pixel"] == PARAMS["scope_pixel"].default
    add_layers(viewer, sample_layers)
    assert widget.parameters()["scope_pixel"] == sample.pixel_A


def test_create_then_open_a_pyp_project(make_napari_viewer, sample_layers, tmp_path):
    viewer, widget = open_params(make_napari_viewer, sample_layers)
    widget.set_value("refine_maxiter", 3)
    projects = []
    widget.project_changed.connect(projects.append)
    widget.folder.setText(str(tmp_path / "project"))
    widget.create_button.click()
    root = tmp_path / "project"
    assert projects == [root] and widget.project_dir == root
    for name in (".pyp_config.toml", "sample.pkl", "sample_stack.mrc", "frealign/maps/sample_r01.cistem",
                 "frealign/maps/sample_r01_extended.cistem"):
        assert (root / name).exists(), name
    curated = state_of(viewer).session().tracks
    params, tracks, _ = pyp.load_project(root, "sample")
    assert params["refine_maxiter"] == 3
    assert tracks.image_shape_yx == curated.image_shape_yx and len(tracks) == len(curated)

    viewer.layers.clear()  # without data shown, opening the project loads its stack and tracks
    widget.reset_defaults()
    widget.open_button.click()
    assert widget.project_dir == root and widget.parameters()["refine_maxiter"] == 3
    layer = tiltseries_layer(viewer)
    assert layer is not None and layer.data.shape == (SMALL["n_tilts"], *SMALL["shape_yx"])
    assert layer.metadata["cspt2d"]["path"] == str(root / "sample_stack.mrc")
    opened = state_of(viewer).session().tracks
    assert len(opened) == len(curated) and opened.n_particles == curated.n_particles
    assert "Project:" in widget.project_label.text()


def test_project_errors_are_notifications(make_napari_viewer, tmp_path):
    from napari.utils.notifications import notification_manager

    viewer, widget = open_params(make_napari_viewer)
    n = len(notification_manager.records)
    widget.open_button.click()  # no folder chosen
    widget.folder.setText(str(tmp_path))
    widget.open_button.click()  # an empty folder
    widget.create_button.click()  # nothing shown to create a project from
    messages = [r.message for r in notification_manager.records[n:]]
    assert messages[0].startswith("Open project:") and "no folder chosen" in messages[0]
    assert messages[1].startswith("Open project:") and "data_set" in messages[1]
    assert messages[2].startswith("Create project:") and "no tilt series is shown" in messages[2]


def test_collapsed_groups_expand(make_napari_viewer, qtbot):
    viewer, widget = open_params(make_napari_viewer)
    cluster = widget.groups["cluster"]
    assert not cluster.isExpanded() and widget.groups["data"].isExpanded()
    qtbot.mouseClick(cluster._toggle_btn, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(cluster.isExpanded, timeout=2000)


class _StyleChanges(QObject):
    """Counts the StyleChange events of the widgets it watches (a style sheet set re-polishes the widget)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def eventFilter(self, obj, event):  # noqa: N802 - Qt API
        if event.type() == QEvent.Type.StyleChange:
            self.count += 1
        return False


def test_a_check_that_changes_nothing_restyles_no_field(make_napari_viewer, sample_layers):
    """The form is checked after every edit and when data arrives: only the fields whose mark changes are restyled
    (setting a style sheet, even the same, re-polished every editor: ~100 ms when the tracks came)."""
    viewer, widget = open_params(make_napari_viewer)
    watcher = _StyleChanges()
    for field in widget.fields.values():
        field.editor.installEventFilter(watcher)
    widget._validate()
    add_layers(viewer, sample_layers)  # the form fills itself from the data
    assert watcher.count == 0 and widget.is_valid
    radius = widget.fields["particle_rad"].value()
    widget.set_value("particle_rad", "5000")  # marks the fields concerned, and only them
    assert 0 < watcher.count <= 4
    assert "border" in widget.fields["extract_box"].editor.styleSheet()
    widget.set_value("particle_rad", radius)
    assert widget.is_valid
    assert widget.fields["extract_box"].editor.styleSheet() == "" and widget.fields["extract_box"].message.isHidden()
