"""Update a napari layer's data and display settings with one refresh and one thumbnail.

napari recomputes a layer's thumbnail in every display setter (``contrast_limits``, ``iso_threshold``, and
``contrast_limits_range`` through ``contrast_limits``), and ``data`` and ``contrast_limits_range`` each refresh the
layer (slice it, hand the slice to the visual, thumbnail again). For a 3D map the thumbnail is a maximum projection of
the whole volume on the GUI thread: a new map assigned setter by setter paid four thumbnails. Inside
:func:`one_refresh` the layer's refreshes are held and its thumbnail is not recomputed; on leaving, the layer is
refreshed once (slice, visual, extent, one thumbnail of the final state); when the extent changed (another shape or
scale), the ``data`` event is emitted again so that the viewer's dims (slider ranges) follow. napari (0.5–0.9) has no
public batch update; this uses ``Layer._block_refresh`` and shadows ``_update_thumbnail`` on the instance only, for
the block.

Inside :func:`one_refresh` the layer's events also stop at the layer: each setter's event still reaches what listens
to it on the layer (its controls, its visual), but not the viewer's layer list, which otherwise answers every event of
the layer (data, features, edge width, length, colours…) with a ``dataChanged`` of its row (a repaint of the row, its
thumbnail). Its ``data`` event is held too and emitted once, after the refresh, when data was assigned (the viewer's
dims and extent follow it: one recomputation instead of one per assignment, and with the new extent). On leaving, the
layer list sees the refresh's events (one repaint of the row, with the new thumbnail).

:func:`layer_list_told_once` does the same for every layer of a viewer while a change reaches many of them (a step of
the dims re-slices every layer: each then emits its extent, data and thumbnail events, and the picking layer its
selection's current settings): the layer list hears, on leaving, one ``thumbnail`` event per layer that emitted
anything (its row repainted once, with the new thumbnail) instead of a ``dataChanged`` per event.

:func:`add_unselected` adds a layer made beforehand without making it the active one: napari selects every layer
inserted, which switches the layer controls and the viewer buttons' styles to it (and back when the caller re-selects
its own layer) — half of the GUI-thread time of adding a layer. It turns off ``LayerList._activate_on_insert`` for
the insertion only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import numpy as np
from napari.components import LayerList
from napari.layers import Layer

__all__ = ["add_unselected", "layer_list_told_once", "one_refresh"]


def _no_thumbnail() -> None:
    """Stands in for the layer's ``_update_thumbnail`` inside :func:`one_refresh`."""


@contextmanager
def one_refresh(layer: Layer) -> Iterator[Layer]:
    """Assign any of ``layer``'s properties inside; the layer is refreshed once, with its thumbnail, on leaving
    (events other than the refresh's are emitted as usual, so controls and visuals follow each setter)."""
    extent = layer.extent.world
    layer._update_thumbnail = _no_thumbnail  # the instance attribute shadows the method for this block only
    data_events = layer.events.data.blocker()  # (counts the events it held)
    try:
        with layer._block_refresh(), layer.events.blocker(), data_events:  # the group: the layer list's relay
            yield layer
    finally:
        del layer._update_thumbnail
        layer.refresh()
        if data_events.count or not np.array_equal(layer.extent.world, extent):
            # once, now that the extent is the new one (the viewer's dims follow a layer's ``data`` event)
            layer.events.data(value=layer.data)


@contextmanager
def layer_list_told_once(layers: LayerList) -> Iterator[LayerList]:
    """Inside, the events of ``layers``' layers reach what listens on each layer (its visual, its controls, the
    viewer) but not the layer list (the relay of each layer's events is held); on leaving, each layer that emitted
    anything emits one ``thumbnail`` event (its row of the layer list is repainted once)."""
    held = [(layer, layer.events.blocker()) for layer in list(layers)]
    with ExitStack() as stack:
        for _, blocker in held:
            stack.enter_context(blocker)
        yield layers
    for layer, blocker in held:
        if blocker.count and layer in layers:
            layer.events.thumbnail()


def add_unselected(layers: LayerList, layer: Layer) -> Layer:
    """Append ``layer`` (made beforehand, e.g. in an earlier event-loop turn) to ``layers`` leaving the selection and
    the active layer as they are."""
    try:
        before = layers._activate_on_insert
    except AttributeError:  # (a napari that hides it from plugins: add, then give the selection back)
        active, selected = layers.selection.active, set(layers.selection)
        layers.append(layer)
        layers.selection.update(selected)
        layers.selection.difference_update({layer})
        layers.selection.active = active
        return layer
    layers._activate_on_insert = False
    try:
        layers.append(layer)
    finally:
        layers._activate_on_insert = before
    return layer
