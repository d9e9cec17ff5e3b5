"""A layer's shader programs are built in turns of their own before it is first drawn (:mod:`._prebuild`), and what
is drawn is the same. Real shown napari viewers (Xvfb); no timing is asserted."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from qtpy.QtCore import Qt  # noqa: E402

from napari_cspt2d._qt import _stages  # noqa: E402
from napari_cspt2d._qt._prebuild import _nodes, build_in_turns, programs_to_build  # noqa: E402
from napari_cspt2d._qt._tilt_overlay import PLACEHOLDER_TEXT, connect_tilt_view  # noqa: E402

pytestmark = pytest.mark.gui

SMALL = {"n_particles": 12, "n_tilts": 21, "shape_yx": (384, 384), "box": 48, "thickness_px": 60.0}


def _scene(viewer, qtbot):
    """An image and a points layer (hidden) with text, as a tracks layer is shown over a tilt, in a window of a
    fixed size."""
    viewer.window._qt_window.resize(1000, 700)
    qtbot.wait(50)
    rng = np.random.default_rng(3)
    viewer.add_image(rng.random((3, 64, 64)).astype(np.float32))
    points = viewer.add_points(np.column_stack([np.ones(8), rng.random((8, 2)) * 60]), size=6, border_color="red",
                               features={"id": np.arange(8)}, text="{id}", visible=False)
    viewer.reset_view()
    return points


def test_a_hidden_layer_is_built_in_turns_then_drawn_the_same(make_napari_viewer, qtbot, monkeypatch, staged_turns):
    """The hidden layer's programs (markers, text) need building; ``build_in_turns`` builds them one per turn, then
    calls ``then`` (which shows it); the canvas then shows exactly what a viewer drawing it the usual way shows."""
    viewer = make_napari_viewer(show=True)
    points = _scene(viewer, qtbot)
    qtbot.wait(50)
    todo = programs_to_build(viewer, points)
    assert len(todo) >= 3  # two marker programs (points, highlight) and the text
    turns = staged_turns
    built_in_turn: list[int] = []
    for visual in todo:  # the turn each program is built in (a draw's later calls build nothing)
        program = visual._program
        build = program.build_if_needed
        monkeypatch.setattr(program, "build_if_needed", lambda program=program, build=build: (
            built_in_turn.append(turns[0]) if program._need_build else None, build()))
    shown: list[int] = []
    build_in_turns(viewer, points, lambda: (shown.append(turns[0]), setattr(points, "visible", True)))
    assert programs_to_build(viewer, points) == todo  # nothing in this turn
    qtbot.waitUntil(lambda: bool(shown), timeout=10000)
    assert programs_to_build(viewer, points) == []
    assert len(built_in_turn) == len(todo) and len(set(built_in_turn)) == len(todo)  # one per turn
    assert shown[0] > max(built_in_turn)  # shown in a turn after
    qtbot.wait(100)
    built = viewer.screenshot(canvas_only=True, flash=False)

    usual = make_napari_viewer(show=True)
    same = _scene(usual, qtbot)
    qtbot.wait(50)
    same.visible = True
    qtbot.wait(100)
    np.testing.assert_array_equal(built, usual.screenshot(canvas_only=True, flash=False))


def test_the_sample_s_layers_and_tilt_label_are_shown_with_their_programs_built(make_napari_viewer, qtbot,
                                                                                cache_home):
    """Opening the sample: when the tracks layer and the tilt label are first shown, their programs are built (the
    paint that shows them only sends them to OpenGL); the label's placeholder text is gone."""
    viewer = make_napari_viewer(show=True)
    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    loader = cockpit.data
    overlay = viewer.canvas.overlays.text
    qtbot.waitUntil(lambda: bool(_nodes(viewer, overlay)) and not programs_to_build(viewer, overlay)
                    and overlay.text == "", timeout=20000)  # (the label's program is built as the cockpit opens)
    loader.sample_kwargs = SMALL
    when_shown: dict[str, list] = {}

    def watch(event) -> None:
        layer = event.value
        role = layer.metadata.get("cspt2d", {}).get("role")

        def shown(_=None) -> None:
            if layer.visible and role not in when_shown:
                when_shown[role] = programs_to_build(viewer, layer)
                if role == "tiltseries":
                    when_shown["label"] = programs_to_build(viewer, overlay)

        layer.events.visible.connect(shown)

    viewer.layers.events.inserted.connect(watch)
    qtbot.mouseClick(loader.sample_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: cockpit.state.document is not None and not loader.busy and not _stages.pending(),
                    timeout=60000)
    assert when_shown["tracks"] == []  # its markers, its highlight and its text
    assert when_shown["label"] == []
    assert overlay.visible and overlay.text.startswith("tilt ") and overlay.text != PLACEHOLDER_TEXT


def test_the_label_s_program_is_built_while_hidden_and_its_text_given_back(make_napari_viewer, qtbot):
    """Watching an empty viewer builds the text overlay's program while it stays hidden; its text is empty again
    after (no label shows)."""
    viewer = make_napari_viewer(show=True)
    overlay = viewer.canvas.overlays.text
    connect_tilt_view(viewer)
    qtbot.waitUntil(lambda: overlay.text == PLACEHOLDER_TEXT, timeout=10000)
    assert not overlay.visible
    qtbot.waitUntil(lambda: overlay.text == "", timeout=10000)
    assert not overlay.visible and programs_to_build(viewer, overlay) == []
    assert [node._program._need_build for node in _nodes(viewer, overlay)] == [False]
