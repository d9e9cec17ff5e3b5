"""The cockpit as a user meets it, in a real, shown napari viewer (Xvfb): the whole loop with real mouse and key
events, and the window at laptop and desktop screen sizes (fits, canvas at least half, no elided button, a readable
parameter form).

Screenshots of both sizes are written to docs/ when ``CSPT2D_SAVE_SCREENSHOT`` is set (see the README)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

from conftest import GUI_SAMPLE as SMALL  # noqa: E402
from qtpy.QtCore import QPoint, Qt  # noqa: E402
from qtpy.QtWidgets import QAbstractButton, QApplication, QPushButton  # noqa: E402

from napari_cspt2d._qt._stages import pending  # noqa: E402
from napari_cspt2d.model.params import PARAMS  # noqa: E402
from napari_cspt2d.review import ACCEPTED, REJECTED  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
SCREENS = [(1366, 768), (1920, 1080)]
SAVE_SCREENSHOTS = bool(os.environ.get("CSPT2D_SAVE_SCREENSHOT"))


@pytest.fixture
def cache_for_screens(request):
    """A private cache folder, except when screenshots are saved: napari keeps its theme's icons in the user cache
    folder, and a screenshot without them shows empty buttons."""
    if not SAVE_SCREENSHOTS:
        request.getfixturevalue("cache_home")


def open_cockpit(make_napari_viewer, qtbot, size=(1366, 768)):
    """A shown viewer of ``size`` with the cockpit docked and the small sample opened by its button."""
    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(*size)
    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    cockpit.data.sample_kwargs = SMALL
    qtbot.mouseClick(cockpit.data.sample_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: cockpit.state.document is not None and not cockpit.data.busy, timeout=60000)
    qtbot.wait(1000)  # the cockpit has taken its width: the canvas no longer moves
    return viewer, cockpit


def canvas_point(viewer, world_yx) -> QPoint:
    """Canvas pixel of a world (y, x) position in the 2D view."""
    canvas = viewer.window._qt_viewer.canvas
    transform = canvas.view.transform * canvas.view.scene.transform
    x, y = transform.map([world_yx[1], world_yx[0]])[:2]
    return QPoint(int(round(x)), int(round(y)))


def drag(qtbot, widget, start: QPoint, end: QPoint) -> None:
    """Press, move in steps with the button held, release: a mouse drag."""
    qtbot.mousePress(widget, Qt.MouseButton.LeftButton, pos=start)
    for f in np.linspace(0.2, 1.0, 5):
        qtbot.mouseMove(widget, QPoint(int(start.x() + f * (end.x() - start.x())),
                                       int(start.y() + f * (end.y() - start.y()))))
        qtbot.wait(20)
    qtbot.mouseRelease(widget, Qt.MouseButton.LeftButton, pos=end)


def wait_run(qtbot, cockpit, timeout_s: float = 240) -> None:
    qtbot.waitUntil(lambda: not cockpit.run.busy, timeout=int(timeout_s * 1000))


def test_the_whole_loop_with_real_input(make_napari_viewer, qtbot, tmp_path, cache_home):
    viewer, cockpit = open_cockpit(make_napari_viewer, qtbot)
    state, curate = cockpit.state, cockpit.curate
    doc, ctl = state.document, curate.controller
    assert cockpit.tabs.tabText(cockpit.tabs.currentIndex()) == "Curate"
    assert viewer.canvas.overlays.text.text.startswith(f"tilt {viewer.dims.current_step[0]} of 0–")  # angle shown
    native = viewer.window._qt_viewer.canvas.native
    pixel = ctl.pixel_A
    # the refined-shifts layer is made with the tilt series, empty and hidden; picking stays in the tracks layer
    qtbot.waitUntil(lambda: "refined shifts" in viewer.layers, timeout=5000)
    shifts = viewer.layers["refined shifts"]
    assert not shifts.visible and len(shifts.data) == 0
    assert viewer.layers.selection.active is ctl.points
    # and so is the docked viewer's map layer, hidden until the first map
    map_layers = cockpit.run.map_panel.model.layers
    qtbot.waitUntil(lambda: [layer.name for layer in map_layers] == ["map"], timeout=5000)
    assert not map_layers["map"].visible

    # move a point: drag it on the canvas (select mode)
    viewer.layers.selection.active = ctl.points
    ctl.points.mode = "select"
    tilt = int(viewer.dims.current_step[0])
    row = int(doc.tracks.row_of(int(doc.tracks.particle[0]), tilt))
    x, y = doc.tracks.positions_px()[row]
    drag(qtbot, native, canvas_point(viewer, (y * pixel, x * pixel)),
         canvas_point(viewer, ((y + 6) * pixel, (x + 5) * pixel)))
    qtbot.waitUntil(lambda: doc.undo_name is not None and doc.undo_name.startswith("Move point"), timeout=5000)
    moved = doc.tracks.positions_px()[row]
    assert np.hypot(*(moved - [x + 5, y + 6])) < 2.0
    # delete it: click to select, Delete key
    n = len(doc.tracks)
    qtbot.mouseClick(native, Qt.MouseButton.LeftButton, pos=canvas_point(viewer, (moved[1] * pixel, moved[0] * pixel)))
    qtbot.waitUntil(lambda: len(ctl.points.selected_data) == 1, timeout=5000)
    qtbot.keyClick(native, Qt.Key.Key_Delete)
    qtbot.waitUntil(lambda: len(doc.tracks) == n - 1, timeout=5000)
    # add a particle: "New particle", then a click on the canvas
    qtbot.mouseClick(curate.new_button, Qt.MouseButton.LeftButton)
    qtbot.mouseClick(native, Qt.MouseButton.LeftButton, pos=canvas_point(viewer, (40 * pixel, 40 * pixel)))
    qtbot.waitUntil(lambda: len(doc.tracks) == n, timeout=5000)
    assert doc.tracks.n_particles == SMALL["n_particles"] + 1
    # undo the addition, redo it (keys on the canvas)
    qtbot.keyClick(native, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    qtbot.waitUntil(lambda: len(doc.tracks) == n - 1, timeout=5000)
    qtbot.keyClick(native, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier)
    qtbot.waitUntil(lambda: len(doc.tracks) == n, timeout=5000)
    ctl.points.mode = "pan_zoom"

    # set a parameter by typing, create the project by clicking
    cockpit.show_tab("Parameters")
    form = cockpit.parameters
    spin = form.fields["refine_maxiter"].editor
    spin.selectAll()
    qtbot.keyClicks(spin, "3")
    qtbot.keyClick(spin, Qt.Key.Key_Enter)
    assert state.parameters is not None and state.parameters["refine_maxiter"] == 3
    form.folder.setText(str(tmp_path / "project"))
    qtbot.mouseClick(form.create_button, Qt.MouseButton.LeftButton)
    assert state.project_dir == tmp_path / "project"

    # Reconstruct
    cockpit.show_tab("Run")
    run = cockpit.run
    qtbot.mouseClick(run.reconstruct_button, Qt.MouseButton.LeftButton)
    wait_run(qtbot, cockpit)
    assert run.state == "done", run.log_view.toPlainText()
    finished_map = run.map_panel.shown
    # Cancel a Refine once its first map is shown: the finished map comes back on screen
    qtbot.mouseClick(run.refine_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: len(state.history) == 2, timeout=120000)
    qtbot.mouseClick(run.cancel_button, Qt.MouseButton.LeftButton)
    wait_run(qtbot, cockpit)
    assert run.state == "cancelled" and run.cancel_latency_s is not None
    assert run.map_panel.shown is finished_map
    assert run.history.item(1, 3).text() == "cancelled run"
    # Refine to the end
    qtbot.mouseClick(run.refine_button, Qt.MouseButton.LeftButton)
    wait_run(qtbot, cockpit)
    assert run.state == "done", run.log_view.toPlainText()
    assert [(e.run, e.iteration) for e in state.history][-3:] == [(3, 1), (3, 2), (3, 3)]
    assert run.history.rowCount() == len(state.history)
    assert run.history.item(len(state.history) - 1, 3).text() == "finished"
    assert len(run.fsc_plot.curves) == len(state.history)
    assert run.map_panel.shown is state.history[-1].result.map and run.map_panel.layer.visible

    # Validate: jump to the worst shift, accept it, reject it (undoable edits of the curated tracks)
    assert cockpit.tabs.tabText(cockpit.tabs.currentIndex()) == "Validate"
    qtbot.waitUntil(lambda: pending() == 0, timeout=10000)  # the last step's vectors and jump, in turns of their own
    validate = cockpit.validate
    review = validate.review
    assert viewer.layers["refined shifts"] is shifts and shifts.visible and len(shifts.data) == len(review)
    qtbot.mouseClick(validate.worst_button, Qt.MouseButton.LeftButton)
    worst = validate.table.selected_rows()[0]
    assert review.score[worst] == np.nanmin(review.score)
    assert int(round(viewer.dims.point[0])) == int(review.before.tilt[worst])
    qtbot.mouseClick(validate.accept_button, Qt.MouseButton.LeftButton)
    assert review.status(doc.tracks)[worst] == ACCEPTED
    qtbot.mouseClick(validate.reject_button, Qt.MouseButton.LeftButton)
    assert review.status(doc.tracks)[worst] == REJECTED
    qtbot.waitUntil(lambda: validate.gallery.images is not None, timeout=30000)
    # the map and the history show; a history row brings its map back
    cockpit.show_tab("Run")
    rect = run.history.visualItemRect(run.history.item(0, 0))
    qtbot.mouseClick(run.history.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    assert run.map_panel.shown is state.history[0].result.map and run.map_panel.isVisible()


def _elided_buttons(root) -> list[str]:
    """Text of the visible buttons under ``root`` narrower than their text needs."""
    return [b.text() for b in root.findChildren(QAbstractButton)
            if isinstance(b, QPushButton) and b.isVisible() and b.text()
            and b.width() < b.minimumSizeHint().width()]


def _check_fits(qtbot, viewer, cockpit, size) -> dict:
    width, height = size
    window = viewer.window._qt_window
    qtbot.wait(1000)  # the docks are laid out
    hint = window.minimumSizeHint().expandedTo(window.minimumSize())
    assert hint.width() <= width and hint.height() <= height, (hint, size)
    assert (window.width(), window.height()) == size
    canvas = viewer.window._qt_viewer.canvas.native
    assert canvas.width() >= width / 2, (canvas.width(), width)
    for i in range(cockpit.tabs.count()):
        cockpit.tabs.setCurrentIndex(i)
        QApplication.processEvents()
        assert not _elided_buttons(cockpit), (cockpit.tabs.tabText(i), _elided_buttons(cockpit))
        bar = cockpit.tabs.tabBar()
        assert bar.tabRect(i).width() >= bar.fontMetrics().horizontalAdvance(bar.tabText(i))
    cockpit.show_tab("Parameters")
    QApplication.processEvents()
    form = cockpit.parameters
    viewport = form.scroll.viewport()
    shown = [name for name, field in form.fields.items() if field.isVisible()
             and viewport.rect().contains(field.editor.mapTo(viewport, field.editor.rect().bottomRight()))
             and viewport.rect().contains(field.editor.mapTo(viewport, field.editor.rect().topLeft()))]
    assert len(shown) >= 8, shown
    with_units = [n for n in shown if PARAMS[n].unit]
    assert with_units
    return {"canvas_px": canvas.width(), "fields_shown": len(shown)}


def test_docking_the_cockpit_lays_the_window_out_once(make_napari_viewer, qtbot):
    """In a 1366×768 window the cockpit is docked at its fitted width at once (the canvas keeps half the window):
    the canvas is resized, and repainted, once, not once more when the width is fitted."""
    from qtpy.QtCore import QEvent, QObject

    from napari_cspt2d._qt.cockpit import MIN_WIDTH_PX, PREFERRED_WIDTH_PX

    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1366, 768)
    qtbot.waitExposed(window)
    qtbot.wait(200)
    canvas = viewer.window._qt_viewer.canvas.native
    widths: list[int] = []

    class Resizes(QObject):
        def eventFilter(self, obj, event) -> bool:
            if obj is canvas and event.type() == QEvent.Type.Resize:
                widths.append(event.size().width())
            return False

    watcher = Resizes()
    canvas.installEventFilter(watcher)
    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    qtbot.wait(1500)  # (the cockpit fits its width 100 ms after it is shown, and looks again)
    canvas.removeEventFilter(watcher)
    dock = cockpit._dock()
    assert MIN_WIDTH_PX <= dock.width() < PREFERRED_WIDTH_PX and canvas.width() >= window.width() // 2
    assert widths == [canvas.width()]


def test_the_fitted_width_leaves_room_for_the_docks_on_the_other_side(make_napari_viewer, qtbot):
    """The cockpit's fitted width (its size hint, asked at each layout) counts the docks shown on the other side of
    the window (napari's layer list and controls): hiding them widens it; a dock of its own side does not count."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QDockWidget

    from napari_cspt2d._qt.cockpit import LAYER_DOCKS_PX, PREFERRED_WIDTH_PX

    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1366, 768)
    qtbot.waitExposed(window)
    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    qtbot.wait(300)
    dock = cockpit._dock()
    left = [d for d in window.findChildren(QDockWidget)
            if d.isVisible() and window.dockWidgetArea(d) == Qt.DockWidgetArea.LeftDockWidgetArea]
    assert left and window.dockWidgetArea(dock) == Qt.DockWidgetArea.RightDockWidgetArea
    with_left = cockpit._fitted_width(window)
    assert cockpit.sizeHint().width() == with_left
    beside = max(max(d.width(), LAYER_DOCKS_PX) for d in left)
    for d in left:
        d.hide()
    without_left = cockpit._fitted_width(window)
    assert with_left < without_left == min(PREFERRED_WIDTH_PX, with_left + beside)
    for d in left:
        d.show()
    assert cockpit._fitted_width(window) == with_left


@pytest.mark.slow
@pytest.mark.parametrize("size", SCREENS, ids=[f"{w}x{h}" for w, h in SCREENS])
def test_fits_the_screen_with_the_sample_and_after_a_refine(make_napari_viewer, qtbot, tmp_path, size,
                                                            cache_for_screens):
    screen = QApplication.primaryScreen().availableGeometry()
    if screen.width() < size[0] or screen.height() < size[1]:
        pytest.skip(f"the display is {screen.width()}×{screen.height()}, smaller than {size}")
    viewer, cockpit = open_cockpit(make_napari_viewer, qtbot, size)
    _check_fits(qtbot, viewer, cockpit, size)
    cockpit.parameters.create_project(tmp_path / "project")
    cockpit.show_tab("Run")
    cockpit.run.start("refine")
    wait_run(qtbot, cockpit)
    assert cockpit.run.state == "done", cockpit.run.log_view.toPlainText()
    _check_fits(qtbot, viewer, cockpit, size)
    # the Run tab is no wider than its dock: its buttons (Cancel, the map's 3D) are in view, none cut at the right
    cockpit.show_tab("Run")
    qtbot.wait(50)
    viewport = cockpit.run.parentWidget()  # the scroll area's viewport
    for button in (cockpit.run.cancel_button, cockpit.run.map_panel.view_3d_button):
        right = button.mapTo(viewport, button.rect().topRight()).x()
        assert button.isVisible() and right < viewport.width(), (button.text(), right, viewport.width())
    if SAVE_SCREENSHOTS:
        from imageio.v3 import imwrite

        DOCS.mkdir(exist_ok=True)

        for tab in ("Validate", "Run"):
            cockpit.show_tab(tab)
            qtbot.wait(400)
            shot = viewer.screenshot(canvas_only=False, flash=False)
            assert shot[..., :3].std() > 10
            imwrite(DOCS / f"cockpit_{tab.lower()}_{size[0]}x{size[1]}.png", shot)


def test_the_parameter_form_is_built_over_several_turns_and_finished_when_asked(make_napari_viewer, qtbot):
    """Opening the cockpit builds the parameter form a few rows per event-loop turn; asking for the Parameters tab
    while it is half built finishes that same form at once (every field, checked and published), and the turns still
    pending then build nothing twice."""
    from napari_cspt2d._qt.cockpit import TABS
    from napari_cspt2d._qt.params_widget import ParametersWidget
    from napari_cspt2d.model.params import GROUPS

    viewer = make_napari_viewer(show=True)
    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    page = cockpit.tabs.widget(TABS.index("Parameters"))
    seen: list[int] = []  # the form's number of fields after each turn
    asked = None
    deadline = time.monotonic() + 60
    while not cockpit.tabs_built:
        assert time.monotonic() < deadline, "the tabs were not built"
        QApplication.processEvents()  # one turn: the zero-delay timers due now
        time.sleep(0.001)
        form = page.findChild(ParametersWidget)
        if form is not None and 0 < len(form.fields) < len(PARAMS):
            seen.append(len(form.fields))
            if len(seen) == 2:  # half built: the tab is asked for
                asked = cockpit.parameters
                assert asked is form and set(asked.fields) == set(PARAMS) and list(asked.groups) == list(GROUPS)
                assert asked.is_valid and cockpit.state.parameters is not None
    assert len(seen) == 2 and seen[0] < seen[1], seen  # the rows came over turns of their own
    assert page.findChildren(ParametersWidget) == [asked] and len(asked.groups) == len(GROUPS)
    assert asked.scroll.widget().layout().count() == len(GROUPS) + 1  # the groups once each, and the stretch
