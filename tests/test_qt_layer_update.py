"""napari_cspt2d._qt._layer_update.one_refresh in a real, shown napari viewer (Xvfb): a layer's properties assigned in
one go tell the viewer's layer list once (not once per setter), the ``data`` event comes once, after the refresh, and
the viewer's dims follow the new extent; each setter's own event still reaches what listens on the layer."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = [pytest.mark.gui]

from napari.layers import Vectors  # noqa: E402

from napari_cspt2d._qt._layer_update import one_refresh  # noqa: E402


def _vectors(n: int, span: float, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    data = np.zeros((n, 2, 3))
    data[:, 0, 0] = rng.integers(0, 5, n)
    data[:, 0, 1:] = rng.uniform(0, span, (n, 2))
    data[:, 1, 1:] = rng.normal(0, 2, (n, 2))
    return data, {"score": rng.uniform(0, 1, n)}


def test_one_refresh_tells_the_layer_list_once_and_the_dims_follow(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    data, features = _vectors(200, 100.0, 0)
    layer = viewer.add_layer(Vectors(data, features=features, edge_color="score", edge_colormap="RdYlGn",
                                     edge_contrast_limits=(0.0, 1.0), name="shifts"))
    qtbot.wait(50)
    heard: list[str] = []  # what the layer list heard of the layer (each is a dataChanged of its row)
    row = viewer.layers.index(layer)
    viewer.layers.events.connect(lambda event: heard.append(event.type) if getattr(event, "index", None) == row
                                 else None)
    data_events, width_events, inside = [], [], []
    layer.events.data.connect(lambda event: data_events.append(len(layer.data)))
    layer.events.edge_width.connect(lambda event: width_events.append(layer.edge_width))
    new_data, new_features = _vectors(300, 400.0, 1)  # more vectors, over a larger extent
    with one_refresh(layer):
        layer.edge_contrast_limits = (0.2, 0.8)
        layer.data = new_data
        layer.features = new_features
        layer.edge_width = 3.0
        layer.length = 2.0
        inside.extend(heard)
    assert inside == []  # nothing reached the layer list while the properties were assigned
    # after it: the refresh's events (extent, slice, thumbnail), then the same again from the viewer re-slicing its
    # layers for the larger extent; nothing per setter
    assert set(heard) <= {"_extent_augmented", "set_data", "thumbnail", "data", "extent"}, heard
    assert heard.count("thumbnail") <= 2
    assert data_events == [300]  # once, after the refresh
    assert width_events == [3.0]  # the setter's own event still reaches the layer's listeners (its controls)
    # the viewer's dims follow the new extent (the y and x sliders' ranges, in world units)
    assert viewer.dims.range[1].stop >= new_data[:, 0, 1].max() - 1e-6
    assert viewer.dims.range[2].stop >= new_data[:, 0, 2].max() - 1e-6
    # the layer shows the new vectors with the new settings
    assert len(layer.data) == 300 and layer.edge_width == 3.0 and layer.length == 2.0
    np.testing.assert_allclose(layer.features["score"], new_features["score"])
    assert "_update_thumbnail" not in vars(layer)


def test_one_refresh_without_new_data_emits_no_data_event(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    data, features = _vectors(50, 100.0, 2)
    layer = viewer.add_layer(Vectors(data, features=features, name="shifts"))
    data_events = []
    layer.events.data.connect(lambda event: data_events.append(event))
    with one_refresh(layer):
        layer.edge_width = 2.5
    assert data_events == [] and layer.edge_width == 2.5


def test_a_dims_step_inside_layer_list_told_once_tells_the_list_one_thumbnail_per_layer(make_napari_viewer, qtbot):
    from napari_cspt2d._qt._layer_update import layer_list_told_once

    viewer = make_napari_viewer(show=True)
    rng = np.random.default_rng(3)
    image = viewer.add_image(rng.normal(size=(5, 64, 64)).astype(np.float32), name="stack")
    points = viewer.add_points(np.column_stack([np.arange(5), rng.uniform(0, 64, (5, 2))]), name="picks")
    data, features = _vectors(40, 60.0, 4)
    vectors = viewer.add_layer(Vectors(data, features=features, name="shifts"))
    qtbot.wait(50)
    viewer.dims.set_point(0, 0)
    heard, sliced = [], []
    viewer.layers.events.connect(lambda event: heard.append((event.type, getattr(event, "index", None))))
    for layer in (image, points, vectors):
        layer.events.set_data.connect(lambda event, name=layer.name: sliced.append(name))
    with layer_list_told_once(viewer.layers):
        viewer.dims.set_point(0, 3)
        inside = list(heard)
    assert inside == []
    # each layer was re-sliced (its own listeners, e.g. its visual, heard it at once) ...
    assert {"stack", "picks", "shifts"} <= set(sliced)
    # ... and the layer list heard one thumbnail event per layer
    assert sorted(heard) == sorted(("thumbnail", viewer.layers.index(layer)) for layer in (image, points, vectors))
    assert int(round(viewer.dims.point[0])) == 3
