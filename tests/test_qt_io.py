"""Loader widget, npe2 readers/writers and sample data, in a real shown napari viewer (Xvfb) where a viewer is needed.

The layer-data conversions at the top need no display."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.utils.notifications import notification_manager  # noqa: E402

from napari_cspt2d._reader import (  # noqa: E402
    get_stack_reader,
    get_tracks_reader,
    points_data,
    read_trackset,
    tracks_layer_data,
)
from napari_cspt2d._writer import tracks_from_layer, write_tracks_cistem, write_tracks_json  # noqa: E402
from napari_cspt2d.errors import CsptInputError  # noqa: E402
from napari_cspt2d.io.imod import write_fiducial_model  # noqa: E402
from napari_cspt2d.io.trackdata import write_track_data  # noqa: E402
from napari_cspt2d.model.tiltseries import TiltSeries  # noqa: E402
from napari_cspt2d.sample import make_sample, write_sample  # noqa: E402

SMALL = {"n_particles": 12, "n_tilts": 21, "shape_yx": (384, 384), "box": 48, "thickness_px": 60.0}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A pyp project of the small sample: sample_stack.mrc, sample.pkl, frealign/maps/sample_r01.cistem pair."""
    sample = make_sample(**SMALL)
    root = tmp_path_factory.mktemp("project")
    paths = write_sample(sample, root)
    return sample, root, paths


def positions_by_pair(ts):
    return {(int(p), int(t)): xy for p, t, xy in zip(ts.particle, ts.tilt, ts.positions_px())}


# ---------------------------------------------------------------------------------------------- no display
def test_layer_round_trip_is_exact_and_follows_layer_edits(project):
    sample, _, _ = project
    tracks = sample.tracks
    data, kwargs, kind = tracks_layer_data(tracks, pixel_A=sample.pixel_A)
    assert kind == "points" and data.shape == (len(tracks), 3)
    assert tracks_from_layer(data, kwargs["features"], kwargs["metadata"]) is tracks
    # a moved and a deleted point, as a user would leave the layer
    edited = np.delete(data, 4, axis=0)
    edited[0, 1:] += (2.0, -1.0)
    features = kwargs["features"].drop(index=4).reset_index(drop=True)
    back = tracks_from_layer(edited, features, kwargs["metadata"])
    assert len(back) == len(tracks) - 1 and back.row_of(int(tracks.particle[4]), int(tracks.tilt[4])) is None
    np.testing.assert_allclose(back.positions_px()[0], tracks.positions_px()[0] + (-1.0, 2.0), atol=1e-9)
    np.testing.assert_array_equal(back.score, np.delete(tracks.score, 4))
    with pytest.raises(CsptInputError, match="particle id"):
        features.loc[2, "particle"] = -1
        tracks_from_layer(edited, features, kwargs["metadata"])
    with pytest.raises(CsptInputError, match="metadata"):
        tracks_from_layer(data, kwargs["features"], {})


def test_reader_hooks_claim_their_files(project, tmp_path):
    _, root, paths = project
    assert get_stack_reader(str(paths["stack"])) is not None
    assert get_stack_reader(str(tmp_path / "x.tif")) is None
    assert get_tracks_reader(str(paths["cistem"])) is not None
    other = tmp_path / "other.json"
    other.write_text('{"name": "not tracks"}')
    assert get_tracks_reader(str(other)) is None
    assert get_tracks_reader(str(paths["metadata"])) is None  # {name}.pkl is metadata, not tracks
    write_track_data(tmp_path / "picks.pkl", project[0].tracks)
    assert read_trackset(tmp_path / "picks.pkl").equals(project[0].tracks)
    assert get_tracks_reader(str(tmp_path / "picks.pkl")) is not None
    # a .cistem pair finds its image size and tilt table in {name}.pkl two folders up
    tracks = read_trackset(paths["cistem"])
    assert tracks.image_shape_yx == SMALL["shape_yx"]
    lonely = tmp_path / "lonely.json"
    write_track_data(lonely, project[0].tracks.replace(image_shape_yx=None))
    with pytest.raises(CsptInputError, match="image size is unknown"):
        read_trackset(lonely)


def test_writers_round_trip(project, tmp_path):
    sample, _, _ = project
    data, kwargs, _ = tracks_layer_data(sample.tracks, pixel_A=sample.pixel_A)
    attributes = {"features": kwargs["features"], "metadata": kwargs["metadata"]}
    (json_path,) = write_tracks_json(str(tmp_path / "t.json"), data, attributes)
    assert read_trackset(json_path).equals(sample.tracks)
    main, extended = write_tracks_cistem(str(tmp_path / "t_r01.cistem"), data, attributes)
    assert extended.endswith("t_r01_extended.cistem")
    back = read_trackset(main, sample.tracks.image_shape_yx)
    np.testing.assert_array_equal(back.particle, sample.tracks.particle)
    np.testing.assert_allclose(back.positions_px(), sample.tracks.positions_px(), atol=1e-3)  # float32 in Å


# ---------------------------------------------------------------------------------------------- viewer
@pytest.mark.gui
@pytest.mark.slow
def test_loader_opens_project_with_binning_and_tracks(make_napari_viewer, project, qtbot, monkeypatch, tmp_path):
    from napari_cspt2d._qt import CurationWidget

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    sample, root, paths = project
    viewer = make_napari_viewer(show=True)
    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    loader = cockpit.data
    loader.stack.setText(str(paths["stack"]))
    loader.tracks.setText(str(paths["cistem"]))
    loader.bin_spin.setValue(2)
    loader.open_button.click()
    qtbot.waitUntil(lambda: not loader.busy, timeout=20000)

    image = viewer.layers["sample"]
    pixel = sample.pixel_A
    assert image.data.shape == (21, 192, 192)
    assert tuple(image.scale) == (1.0, 2 * pixel, 2 * pixel)
    assert tuple(image.translate) == (0.0, pixel / 2, pixel / 2)
    np.testing.assert_allclose(np.asarray(image.data[3]), sample.stack[3].reshape(192, 2, 192, 2).mean((1, 3)),
                               rtol=1e-5, atol=1e-5)
    series = TiltSeries.open(paths["stack"])
    np.testing.assert_allclose(image.contrast_limits, series.contrast_limits())
    assert viewer.dims.axis_labels == ("tilt", "y", "x")
    viewer.dims.set_current_step(0, 10)
    assert viewer.canvas.overlays.text.text == "tilt 10 of 0–20  +0.0°"
    # the tracks sit on the (binned) image in world coordinates and are curated at once
    points = viewer.layers["sample tracks"]
    assert tuple(points.scale) == (1.0, pixel, pixel)
    np.testing.assert_allclose(points.data, points_data(sample.tracks.replace(
        tilts=points.metadata["cspt2d"]["tracks"].tilts)), atol=1e-3)
    curation = cockpit.curate
    assert isinstance(curation, CurationWidget) and curation.controller.points is points
    assert cockpit.tabs.tabText(cockpit.tabs.currentIndex()) == "Curate"  # the next step is in front
    assert "21 sections" in loader.info.text()

    # unbinned: the layer is the memory map itself
    loader.tracks.setText("")
    loader.bin_spin.setValue(1)
    loader.open_button.click()
    qtbot.waitUntil(lambda: not loader.busy, timeout=20000)
    assert isinstance(viewer.layers[-1].data, np.memmap) and viewer.layers[-1].data.shape == (21, 384, 384)

    # picking from scratch: an empty tracks layer for this stack, then clicks in add mode start particles
    curation.new_tracks()
    new_layer = curation.controller.points
    assert new_layer is not points and len(new_layer.data) == 0 and len(curation.document.tracks) == 0
    assert not curation.controller.trajectories.visible  # napari has no empty Tracks layer: hidden placeholder
    curation.new_particle()
    new_layer.add([4.0, 100.0, 120.0])
    qtbot.waitUntil(lambda: len(curation.document.tracks) == 1, timeout=5000)
    assert curation.document.tracks.particles.id.tolist() == [1]
    viewer.dims.set_current_step(0, 5)
    new_layer.add([5.0, 101.0, 121.0])
    qtbot.waitUntil(lambda: len(curation.document.tracks) == 2, timeout=5000)
    curation.controller.flush()
    assert curation.controller.trajectories.visible and len(curation.controller.trajectories.data) == 2

    # bad input: a notification naming the file, napari keeps running
    bad = tmp_path / "broken.mrc"
    bad.write_bytes(b"definitely not an MRC file" * 10)
    n = len(notification_manager.records)
    loader.stack.setText(str(bad))
    loader.open_button.click()
    qtbot.waitUntil(lambda: not loader.busy, timeout=20000)
    loader.stack.setText("")
    loader.open_button.click()
    messages = [r.message for r in notification_manager.records[n:]]
    assert any("broken.mrc" in m for m in messages), messages
    assert any("no stack chosen" in m for m in messages), messages
    assert loader.open_button.isEnabled() and viewer.layers


@pytest.mark.gui
def test_viewer_open_and_layer_save_round_trip(make_napari_viewer, project, tmp_path, monkeypatch):
    from napari.layers import Image, Points, Tracks

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    sample, root, paths = project
    viewer = make_napari_viewer(show=True)
    viewer.open(str(paths["stack"]), plugin="napari-cspt2d")
    assert isinstance(viewer.layers[-1], Image) and viewer.layers[-1].scale[-1] == pytest.approx(sample.pixel_A)
    json_in = tmp_path / "picks.json"
    write_track_data(json_in, sample.tracks)
    layers = viewer.open(str(json_in), plugin="napari-cspt2d")
    assert [type(layer) for layer in layers] == [Tracks, Points]
    points = layers[-1]
    assert points.metadata["cspt2d"]["source"] == str(json_in)

    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    curation = cockpit.curate
    doc = curation.document
    doc.move_points([2], [[150.5, 160.25]])
    doc.delete_particles([7])
    out = tmp_path / "curated.json"
    points.save(str(out), plugin="napari-cspt2d")
    assert read_trackset(out).equals(doc.tracks)
    out_cistem = tmp_path / "curated_r01.cistem"
    points.save(str(out_cistem), plugin="napari-cspt2d")
    back = read_trackset(out_cistem, doc.tracks.image_shape_yx)
    np.testing.assert_allclose(back.positions_px(), doc.tracks.positions_px(), atol=1e-3)

    # IMOD fiducial model (contours renumbered from 0, angles from a .tlt beside it)
    from napari_cspt2d.io.imod import write_tlt

    fid = tmp_path / "beads.fid"
    write_fiducial_model(fid, doc.tracks)
    write_tlt(tmp_path / "beads.tlt", doc.tracks.tilts.angle_deg)
    imod_points = viewer.open(str(fid), plugin="napari-cspt2d")[-1]
    imod_tracks = imod_points.metadata["cspt2d"]["tracks"]
    np.testing.assert_allclose(imod_tracks.tilts.angle_deg, doc.tracks.tilts.angle_deg, atol=1e-6)
    np.testing.assert_allclose(imod_tracks.positions_px(), doc.tracks.positions_px(), atol=1e-3)

    # a broken track file: the reader names the file
    broken = tmp_path / "broken.json"
    broken.write_text('{"particles": {"1": {"x_3d": 0}}, "tilts": {}, "projections": []}')
    n_layers = len(viewer.layers)
    with pytest.raises(Exception, match="broken.json"):
        viewer.open(str(broken), plugin="napari-cspt2d")
    assert len(viewer.layers) == n_layers


@pytest.mark.gui
def test_sample_data_contribution(make_napari_viewer, monkeypatch, tmp_path, qtbot):
    """File > Open Sample streams: the tracks and the tilt on the slider come at once (with the tilt label), the
    other tilts are made in the background into the layer; the finished sample is make_sample's, and is cached."""
    from napari_cspt2d._sample_data import sample_cache_folder

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    viewer = make_napari_viewer(show=True)
    layers = viewer.open_sample("napari-cspt2d", "synthetic")
    kinds = [layer.metadata["cspt2d"]["role"] for layer in layers]
    assert kinds == ["tiltseries", "trajectories", "tracks"]
    tracks = layers[-1].metadata["cspt2d"]["tracks"]
    assert tracks.n_particles == 40 and tracks.n_tilts == 41
    assert layers[-1].size[0] == pytest.approx(2 * 0.4 * 64)  # particle_rad = 0.4 box
    image, stream = layers[0], layers[0].metadata["cspt2d"]["stream"]
    assert viewer.dims.current_step[0] == 20 and stream.order[0] == 20 and np.asarray(image.data[20]).any()
    assert viewer.canvas.overlays.text.text == "tilt 20 of 0–40  +0.0°"
    qtbot.waitUntil(lambda: stream.complete, timeout=120000)
    assert image.data is stream.stack and np.array_equal(image.data, make_sample().stack)
    qtbot.waitUntil(lambda: len(list(sample_cache_folder().glob("*.npz"))) == 1, timeout=20000)
    again = viewer.open_sample("napari-cspt2d", "synthetic")  # from the cache: whole at once
    assert again[0].metadata["cspt2d"]["stream"] is None and np.array_equal(again[0].data, image.data)


@pytest.mark.gui
def test_the_data_tab_streams_the_sample_and_is_busy_until_it_is_made(make_napari_viewer, monkeypatch, tmp_path,
                                                                      qtbot):
    """The Data tab's Synthetic sample: the first tilt and the tracks are shown, the other tilts are made in the
    background into the same layer, and the tab stays busy (buttons off, progress shown) until the sample is whole."""
    from qtpy.QtCore import Qt

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    viewer = make_napari_viewer(show=True)
    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    loader = cockpit.data
    loader.sample_kwargs = SMALL
    qtbot.mouseClick(loader.sample_button, Qt.MouseButton.LeftButton)
    def roles() -> list[str]:
        return [layer.metadata.get("cspt2d", {}).get("role") for layer in viewer.layers]

    qtbot.waitUntil(lambda: "tracks" in roles(), timeout=60000)
    image = viewer.layers[roles().index("tiltseries")]
    stream = image.metadata["cspt2d"]["stream"]
    assert stream is not None and stream.claimed and image.data is stream.stack
    assert loader.busy or stream.complete
    qtbot.waitUntil(lambda: not loader.busy, timeout=60000)
    assert stream.complete and np.array_equal(image.data, make_sample(**SMALL).stack)
    assert loader.sample_button.isEnabled() and not loader.progress.isVisible()
    assert "12 particles" in loader.info.text()


@pytest.mark.gui
def test_the_tilt_angle_shows_when_a_stack_opens_without_the_cockpit(make_napari_viewer, project, tmp_path,
                                                                    monkeypatch):
    """File > Open of a stack (the plugin's reader, no widget docked): the canvas names the section the slider
    shows, numbered as the slider counts, with its tilt angle, and follows the slider."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    sample, _, paths = project
    viewer = make_napari_viewer(show=True)
    viewer.open(str(paths["stack"]), plugin="napari-cspt2d")
    assert not viewer.window.dock_widgets  # no cockpit
    angles = sample.tracks.tilts.angle_deg
    overlay = viewer.canvas.overlays.text
    step = viewer.dims.current_step[0]
    assert overlay.visible and overlay.text == f"tilt {step} of 0–20  {angles[step]:+.1f}°"
    viewer.dims.set_current_step(0, 3)
    assert overlay.text == f"tilt 3 of 0–20  {angles[3]:+.1f}°" == "tilt 3 of 0–20  -42.0°"
    slider = viewer.window._qt_viewer.dims.slider_widgets[0].slider
    slider.setValue(17)  # the slider's number is the overlay's
    assert viewer.dims.current_step[0] == 17 and overlay.text == f"tilt 17 of 0–20  {angles[17]:+.1f}°"
