"""Opening a series without freezing the window: its layers are added one per turn of the event loop (staged),
hidden layers later, the tilt label's glyphs ahead of time, the streamed sample redrawn only when the shown tilt is
made. Real shown napari viewers (Xvfb); no timing is asserted, only order and outcome."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.layers import Image, Points, Tracks, Vectors  # noqa: E402
from qtpy.QtCore import Qt, QTimer  # noqa: E402

from napari_cspt2d._qt import _stages  # noqa: E402
from napari_cspt2d._qt._sample_stream import fill_in_background  # noqa: E402
from napari_cspt2d._qt._tilt_overlay import LABEL_CHARACTERS, _label_font, connect_tilt_view  # noqa: E402
from napari_cspt2d._sample_data import SampleStream  # noqa: E402
from napari_cspt2d.sample import SamplePlan, first_tilt  # noqa: E402

SMALL = {"n_particles": 12, "n_tilts": 21, "shape_yx": (384, 384), "box": 48, "thickness_px": 60.0}


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def role(layer) -> str | None:
    return layer.metadata.get("cspt2d", {}).get("role")


def test_staged_steps_run_in_order_each_in_a_turn_of_its_own(qtbot):
    """Steps run in the order queued (``first`` ahead of the others), each after what the step before posted (its
    repaint), and a failing step does not stop the ones after it."""
    ran: list[str] = []

    def step(name: str, post: bool = False) -> None:
        ran.append(name)
        if post:  # what a step's repaint is: an event posted in its turn
            QTimer.singleShot(0, lambda: ran.append(f"{name} posted"))

    def fails() -> None:
        ran.append("fails")
        raise RuntimeError("a step's failure")

    _stages.in_own_turn(lambda: step("a", post=True))
    _stages.in_own_turn(fails)
    _stages.in_own_turn(lambda: step("c"))
    _stages.in_own_turn(lambda: step("urgent"), first=True)
    qtbot.waitUntil(lambda: "c" in ran and not _stages.pending(), timeout=5000)
    assert ran == ["urgent", "a", "a posted", "fails", "c"]


@pytest.mark.gui
def test_the_sample_opens_in_stages_image_first_and_all_layers_end_in_order(make_napari_viewer, qtbot, cache_home,
                                                                           staged_turns):
    """The Data tab's sample: the image is added alone and hidden, and shown in a later turn, before the next layer
    arrives; the trajectories and tracks layers likewise; the tracks layer is made the active one once shown; at the
    end the layers are in the reader's order (image, trajectories, tracks), the image and tracks shown, the
    active-trajectory and refined-shifts layers after them, the tracks layer still the one being picked in, and the
    tilt label shown."""
    viewer = make_napari_viewer(show=True)
    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    loader = cockpit.data
    loader.sample_kwargs = SMALL
    seen: list[tuple[str | None, bool, dict]] = []  # (inserted, shown when inserted, {role: shown} of the others)

    def inserted(event) -> None:
        others = {role(layer): layer.visible for layer in viewer.layers if layer is not event.value}
        seen.append((role(event.value), event.value.visible, others))

    viewer.layers.events.inserted.connect(inserted)
    events: list[str] = []  # the viewer's third dim (its slider) comes in a staged turn before the image's
    turns = staged_turns
    viewer.dims.events.ndim.connect(
        lambda event: events.append(f"ndim {viewer.dims.ndim} with {len(viewer.layers)} layers, turn {turns[0]}"))
    viewer.layers.events.inserted.connect(
        lambda event: events.append(f"inserted {role(event.value)}, turn {turns[0]}"))
    activated: list[tuple[str | None, bool]] = []  # (the layer made active, shown then)
    viewer.layers.selection.events.active.connect(
        lambda event: activated.append((role(event.value), event.value.visible)) if event.value is not None else None)
    qtbot.mouseClick(loader.sample_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: cockpit.state.document is not None and not loader.busy, timeout=60000)
    qtbot.waitUntil(lambda: "refined-shifts" in [role(layer) for layer in viewer.layers], timeout=10000)

    assert events[0].startswith("ndim 3 with 0 layers") and events[1].startswith("inserted tiltseries"), events
    assert int(events[1].rpartition(" ")[2]) > int(events[0].rpartition(" ")[2])  # in a later turn
    assert viewer.dims.axis_labels == ("tilt", "y", "x")
    assert viewer.dims.current_step[0] == len(viewer.layers[0].data) // 2
    order = [r for r, _, _ in seen]
    assert order[:3] == ["tiltseries", "trajectories", "tracks"]
    assert seen[0][1:] == (False, {})  # the image alone, hidden: its controls and slider come in this turn
    assert seen[1][2] == {"tiltseries": True}  # ... it was drawn in a turn of its own before the trajectories came
    assert seen[1][1] is False and seen[2][1] is False  # the trajectories and the tracks layer too
    assert seen[2][2] == {"tiltseries": True, "trajectories": True}
    active = order.index("active-track")
    assert active > 2 and seen[active][2]["tracks"] is True
    layers = list(viewer.layers)
    assert isinstance(layers[0], Image) and isinstance(layers[1], Tracks) and isinstance(layers[2], Points)
    assert [role(layer) for layer in layers[:3]] == ["tiltseries", "trajectories", "tracks"]
    assert layers[0].visible and layers[2].visible
    active = [layer for layer in layers if role(layer) == "active-track"]
    assert len(active) == 1 and isinstance(active[0], Vectors)
    assert active[0] is cockpit.curate.controller.active_track
    assert viewer.layers.selection.active is layers[2] is cockpit.curate.controller.points
    assert activated == [("tracks", True)]  # made active once, once shown (its controls in a stage of their own)
    assert viewer.canvas.overlays.text.visible and viewer.canvas.overlays.text.text.startswith("tilt ")
    assert "refined shifts" in viewer.layers and not viewer.layers["refined shifts"].visible


@pytest.mark.gui
def test_the_tilt_label_follows_the_series_visibility(make_napari_viewer, qtbot):
    """The label names the top *visible* tilt series: hidden, no label; shown again, the label is back."""
    viewer = make_napari_viewer(show=True)
    disconnect = connect_tilt_view(viewer)
    angles = [-10.0, 0.0, 10.0]
    layer = viewer.add_image(np.zeros((3, 16, 16), np.float32),
                             metadata={"cspt2d": {"role": "tiltseries", "tilt_angles_deg": angles}})
    overlay = viewer.canvas.overlays.text
    assert overlay.visible and overlay.text.startswith("tilt ")
    layer.visible = False
    assert not overlay.visible and overlay.text == ""
    layer.visible = True
    assert overlay.visible and overlay.text == f"tilt {viewer.dims.current_step[0]} of 0–2  +0.0°"
    disconnect()


@pytest.mark.gui
def test_the_tilt_label_glyphs_are_made_while_the_window_is_idle(make_napari_viewer, qtbot):
    """Watching an empty viewer makes the label's glyphs in the canvas font in the turns after (the first label
    then costs no glyph in the paint of the first image)."""
    viewer = make_napari_viewer(show=True)
    font = _label_font(viewer)
    assert font is not None
    assert not set(LABEL_CHARACTERS) <= set(font._glyphs)
    connect_tilt_view(viewer)
    assert not set(LABEL_CHARACTERS) <= set(font._glyphs)  # not in this turn
    qtbot.waitUntil(lambda: set(LABEL_CHARACTERS) <= set(font._glyphs), timeout=10000)


class _CountingLayer:
    def __init__(self) -> None:
        self.refreshes = 0

    def refresh(self) -> None:
        self.refreshes += 1


@pytest.mark.parametrize("shown", ["first", "last"])
def test_a_streamed_sample_is_redrawn_only_when_its_shown_tilt_is_made(qtbot, shown):
    """The tilt shown first is made before the layer is added: filling the others redraws nothing; a tilt made
    later (the user scrolled to it) is redrawn once, when it is made."""
    plan = SamplePlan(**SMALL)
    stream = SampleStream(plan)
    assert stream.claim()
    section = first_tilt(plan.n_tilts) if shown == "first" else stream.order[-1]
    layer, finished = _CountingLayer(), []
    fill_in_background(layer, stream, on_done=lambda: finished.append(True), shown=lambda: section)
    qtbot.waitUntil(lambda: bool(finished), timeout=60000)
    assert stream.complete
    assert layer.refreshes == (0 if shown == "first" else 1)


@pytest.mark.gui
def test_the_sample_s_child_process_stops_when_its_widget_is_destroyed(qtbot):
    """fill_in_background's tilts are made by a child process; destroying ``stop_with`` (the Data tab when the
    viewer closes) kills it, and the worker ends without finishing the stack."""
    from qtpy.QtWidgets import QWidget

    stream = SampleStream(SamplePlan(n_particles=4, n_tilts=41))
    assert stream.claim()
    owner, finished, children = QWidget(), [], []
    fill_in_background(_CountingLayer(), stream, on_done=lambda: finished.append(True),
                       on_progress=lambda *_: children.append(stream._child), stop_with=owner)
    qtbot.waitUntil(lambda: bool(children), timeout=60000)
    child = children[0]
    assert child is not None
    owner.deleteLater()
    qtbot.waitUntil(lambda: bool(finished), timeout=60000)
    assert child.returncode is not None and not stream.complete


def test_closing_the_viewer_stops_the_sample_s_child_process(make_napari_viewer, qtbot, cache_home):
    """The Data tab's streamed sample: its tilts are made by a child process, which the viewer's closing ends (the
    stack stays unfinished, nothing is cached, no process is left)."""
    viewer = make_napari_viewer(show=True)
    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    cockpit.data.sample_kwargs = {"n_particles": 4, "n_tilts": 41}
    qtbot.mouseClick(cockpit.data.sample_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: any(role(layer) == "tiltseries" for layer in viewer.layers), timeout=60000)
    stream = viewer.layers[0].metadata["cspt2d"]["stream"]
    qtbot.waitUntil(lambda: stream._child is not None, timeout=60000)
    child = stream._child
    assert child.poll() is None
    viewer.close()
    qtbot.waitUntil(lambda: child.poll() is not None and stream._child is None, timeout=60000)
    assert not stream.complete
