"""The cockpit's Run tab in a real, shown napari viewer (Xvfb): runs in a worker, the map in the docked viewer, the
history and FSC curves, cancel, errors, live preview.

Run under pytest-xvfb (``QT_QPA_PLATFORM=offscreen`` does not work for a napari Viewer)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("cache_home")]

from napari.utils.notifications import notification_manager  # noqa: E402
from qtpy.QtCore import Qt  # noqa: E402

from napari_cspt2d import runs as run_module  # noqa: E402
from napari_cspt2d._qt._loader import add_layers  # noqa: E402
from napari_cspt2d._qt._owner import state_of  # noqa: E402
from napari_cspt2d._qt.params_widget import ParametersWidget  # noqa: E402
from napari_cspt2d._qt.run_widget import RunWidget  # noqa: E402
from napari_cspt2d.runs import preview_bin  # noqa: E402
from conftest import GUI_SAMPLE as SMALL  # noqa: E402
from napari_cspt2d.errors import CsptInputError  # noqa: E402
from napari_cspt2d.io.mrc import read_image  # noqa: E402



def open_run(make_napari_viewer, layers):
    viewer = make_napari_viewer(show=True)
    add_layers(viewer, layers)
    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    params, run = cockpit.parameters, cockpit.run
    assert isinstance(params, ParametersWidget) and isinstance(run, RunWidget)
    cockpit.show_tab("Run")
    return viewer, params, run


def wait_done(qtbot, run: RunWidget, timeout_s: float = 120) -> None:
    qtbot.waitUntil(lambda: not run.busy, timeout=int(timeout_s * 1000))


def test_reconstruct_runs_in_a_worker_and_shows_map_and_fsc(make_napari_viewer, sample_layers, qtbot, cache_home):
    viewer, params, run = open_run(make_napari_viewer, sample_layers)
    assert params.is_valid  # filled from the sample's layers ("From data")
    p = params.parameters()
    stages: list[str] = []
    run._relay.progress.connect(lambda stage, done, total: stages.append(stage))
    run.reconstruct_button.click()
    assert run.busy and not run.reconstruct_button.isEnabled() and run.cancel_button.isEnabled()
    wait_done(qtbot, run)
    assert run.state == "done", run.log_view.toPlainText()
    assert {"backproject", "reconstruct"} <= set(stages)
    # the map in the viewer docked in the Run tab (never a floating window), the tilt series' viewer untouched
    panel = run.map_panel
    assert [layer.name for layer in panel.model.layers] == ["map"] and panel.layer.rendering == "iso"
    assert panel.isVisible() and panel.window() is viewer.window._qt_window
    box = p["extract_box"]
    result = run.results[-1]
    assert panel.layer.data.shape == (box, box, box)
    np.testing.assert_allclose(panel.layer.scale, [p.particle_pixel_A] * 3)
    assert panel.layer.iso_threshold == pytest.approx(result.map.iso_level)  # prepared in the worker
    assert tuple(panel.layer.contrast_limits) == pytest.approx(result.map.contrast_limits)
    assert viewer.dims.axis_labels == ("tilt", "y", "x") and viewer.dims.ndisplay == 2
    assert viewer.dims.nsteps[0] == SMALL["n_tilts"]
    # the history lists it; the FSC plot has its curve with the resolution at 0.143
    rec = result.item.reconstruction
    assert [(e.run, e.iteration) for e in state_of(viewer).history] == [(1, 1)]
    assert run.history.rowCount() == 1 and run.history.item(0, 3).text() == "finished"
    assert run.history.item(0, 2).text() == f"{rec.fsc.resolution_A(0.143):.2f}"
    assert len(run.fsc_plot.curves) == 1
    assert run.fsc_plot.resolution_A == pytest.approx(rec.fsc.resolution_A(0.143))
    assert f"{rec.resolution_A:.2f} Å" in run.fsc_plot.label.text()
    assert "curated tracks" in run.log_view.toPlainText()
    assert run.log_path.is_file() and run.log_path.is_relative_to(cache_home)
    assert run.reconstruct_button.isEnabled() and not run.cancel_button.isEnabled()
    # a second run: the map layer is updated in place, the FSC curves accumulate with a legend
    layer = panel.layer
    run.reconstruct_button.click()
    wait_done(qtbot, run)
    assert panel.layer is layer and len(panel.model.layers) == 1
    assert [c.label for c in run.fsc_plot.curves] == ["run 1 · it 1", "run 2 · it 1"]
    qtbot.waitUntil(lambda: run.fsc_plot.legend_labels == ["run 1 · it 1", "run 2 · it 1"], timeout=20000)
    assert not run.fsc_plot.image.pixmap().isNull()  # drawn in a worker, shown as an image
    # a history row shows its map again
    rect = run.history.visualItemRect(run.history.item(0, 0))
    qtbot.mouseClick(run.history.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    assert panel.shown is state_of(viewer).history[0].result.map and "run 1" in panel.title.text()


def test_run_works_on_a_snapshot_while_the_user_edits(make_napari_viewer, sample_layers, qtbot):
    viewer, params, run = open_run(make_napari_viewer, sample_layers)
    doc = state_of(viewer).session().document
    before = doc.tracks
    run.start("reconstruct")
    doc.move_points([0], [[100.0, 90.0]])  # the GUI is not blocked: edits go on during the run
    assert doc.tracks is not before
    wait_done(qtbot, run)
    assert run.state == "done"
    assert run.results[0].item.tracks is before  # the run used the tracks of the moment it started


def test_cancel_stops_quickly_and_keeps_earlier_outputs(make_napari_viewer, sample_layers, qtbot, tmp_path,
                                                         monkeypatch):
    viewer, params, run = open_run(make_napari_viewer, sample_layers)
    params.create_project(tmp_path / "project")
    run.start("reconstruct")
    wait_done(qtbot, run)
    first_map = tmp_path / "project" / "frealign" / "maps" / "sample_r01_01.mrc"
    kept = read_image(first_map)
    stamp = first_map.stat().st_mtime_ns

    real = run_module.reconstruct_tracks

    def slow_reconstruct(*args, progress, **kwargs):  # the real core, made slow enough to be caught running
        def slow_progress(*report):
            progress(*report)
            time.sleep(0.05)

        return real(*args, progress=slow_progress, **kwargs)

    monkeypatch.setattr(run_module, "BATCH_SIZE", 4)  # a cancel check every 4 boxes
    monkeypatch.setattr(run_module, "reconstruct_tracks", slow_reconstruct)
    events: list[tuple[str, float]] = []
    run._relay.progress.connect(lambda stage, done, total: events.append((stage, time.perf_counter())))
    run.start("reconstruct")
    qtbot.waitUntil(lambda: any(s == "backproject" for s, _ in events), timeout=30000)
    asked = time.perf_counter()
    run.cancel_button.click()
    assert run.stage_label.text() == "Cancelling…" and not run.cancel_button.isEnabled()
    wait_done(qtbot, run, 30)
    stopped = time.perf_counter() - asked
    assert run.state == "cancelled"
    assert stopped < 3.0, f"cancel took {stopped:.2f} s"
    assert first_map.stat().st_mtime_ns == stamp  # the earlier map was not touched
    np.testing.assert_array_equal(read_image(first_map), kept)
    assert run.reconstruct_button.isEnabled() and run.refine_button.isEnabled() and not run.cancel_button.isEnabled()
    assert run.progress_bar.value() == 0 and "Cancelled" in run.stage_label.text()
    assert "cancelled after" in run.log_view.toPlainText()
    run.start("reconstruct")  # a new run works after a cancel
    wait_done(qtbot, run)
    assert run.state == "done"


def test_worker_error_becomes_a_notification_with_the_log(make_napari_viewer, sample_layers, qtbot, monkeypatch):
    viewer, params, run = open_run(make_napari_viewer, sample_layers)

    def broken(*args, **kwargs):
        raise RuntimeError("insertion exploded")

    monkeypatch.setattr(run_module, "reconstruct_tracks", broken)
    n = len(notification_manager.records)
    run.start("reconstruct")
    wait_done(qtbot, run)
    assert run.state == "failed"
    messages = [r.message for r in notification_manager.records[n:]]
    assert any("Reconstruction failed: RuntimeError: insertion exploded" in m and str(run.log_path) in m
               for m in messages), messages
    log = run.log_path.read_text()
    assert "Traceback" in log and "insertion exploded" in log
    assert run.reconstruct_button.isEnabled()

    # an input problem found in the worker is reported the same way
    monkeypatch.setattr(run_module, "reconstruct_tracks", lambda *a, **k: (_ for _ in ()).throw(
        CsptInputError("is 3", field="extract_box", expected="an integer >= 8")))
    n = len(notification_manager.records)
    run.start("reconstruct")
    wait_done(qtbot, run)
    messages = [r.message for r in notification_manager.records[n:]]
    assert any(m.startswith("Reconstruction failed: field 'extract_box': is 3") for m in messages), messages


def test_invalid_parameters_or_no_project_stop_the_run_before_it_starts(make_napari_viewer, sample_layers):
    viewer, params, run = open_run(make_napari_viewer, sample_layers)
    n = len(notification_manager.records)
    run.refine_button.click()  # refinement needs a project
    assert not run.busy and run.worker is None
    params.set_value("scope_pixel", "-2")
    run.reconstruct_button.click()
    assert not run.busy and run.worker is None
    messages = [r.message for r in notification_manager.records[n:]]
    assert messages[0].startswith("Run:") and "no project folder" in messages[0]
    assert messages[1].startswith("Run:") and "scope_pixel" in messages[1]


def test_live_preview_follows_edits(make_napari_viewer, sample_layers, qtbot):
    viewer, params, run = open_run(make_napari_viewer, sample_layers)
    run.preview.delay_ms = 200
    run.preview._timer.setInterval(200)
    shown = []
    run.preview.refreshed.connect(shown.append)
    run.preview_check.setChecked(True)
    qtbot.waitUntil(lambda: len(shown) == 1, timeout=60000)
    layer = run.map_panel.layer
    n = params.parameters().box_unbinned_px // preview_bin(params.parameters())
    assert layer.data.shape == (n, n, n) and "preview" in run.map_panel.title.text()
    doc = state_of(viewer).session().document
    doc.move_points([1], [[120.0, 100.0]])
    assert run.preview.pending
    qtbot.waitUntil(lambda: len(shown) == 2, timeout=60000)
    assert not np.array_equal(shown[0].volume, shown[1].volume)  # the edit changed the preview
    run.preview_check.setChecked(False)
    doc.move_points([1], [[121.0, 100.0]])
    assert not run.preview.pending


def test_outputs_use_pyp_names_in_a_project(make_napari_viewer, sample_layers, qtbot, tmp_path):
    viewer, params, run = open_run(make_napari_viewer, sample_layers)
    root = tmp_path / "project"
    params.create_project(root)
    run.start("reconstruct")
    wait_done(qtbot, run)
    maps = root / "frealign" / "maps"
    for name in ("sample_r01_01.mrc", "sample_r01_01_half1.mrc", "sample_r01_01_half2.mrc", "sample_r01_01_fsc.csv",
                 "sample_r01.cistem", "sample_r01_extended.cistem"):
        assert (maps / name).is_file(), name
    assert run.log_path.parent == root / "log"
    assert Path(run.results[0].item.written[0]).name == ".pyp_config.toml"
