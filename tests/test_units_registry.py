"""pint's application registry made whole off the GUI thread (``_qt/_units.py``): a layer made on one thread while
another fills pint's lazy registry raised ``UndefinedUnitError: 'pixel'``."""

from __future__ import annotations

import threading

import numpy as np
import pint
import pytest
from pint.registry import LazyRegistry

from napari_cspt2d._qt._units import load_unit_registry


@pytest.fixture
def lazy_registry(monkeypatch) -> LazyRegistry:
    """A fresh, untouched lazy application registry, as in a new process (the session's own comes back after)."""
    lazy = LazyRegistry()
    monkeypatch.setattr(pint.get_application_registry(), "_registry", lazy)
    return lazy


def test_a_whole_registry_is_installed_and_the_lazy_one_is_never_filled(lazy_registry):
    assert load_unit_registry()
    installed = pint.get_application_registry().get()
    assert installed is not lazy_registry
    assert isinstance(installed, pint.UnitRegistry)
    assert str(pint.get_application_registry().pixel) == "pixel"
    assert type(lazy_registry) is LazyRegistry  # (filling it is what raced)
    assert not load_unit_registry()  # now in use: left alone


def test_a_registry_in_use_is_kept():
    registry = pint.get_application_registry()
    registry.pixel  # noqa: B018 - in use from now on
    before = registry.get()
    assert not load_unit_registry()
    assert pint.get_application_registry().get() is before


def test_layers_made_on_this_thread_while_another_loads_the_registry(lazy_registry):
    """The cockpit's case: its import thread loads the units while the GUI thread makes layers."""
    from napari.layers import Image

    errors: list[BaseException] = []
    done = threading.Event()

    def load() -> None:
        try:
            load_unit_registry()
        finally:
            done.set()

    thread = threading.Thread(target=load)
    thread.start()
    made = 0
    while not done.is_set() or made == 0:
        try:
            Image(np.zeros((2, 4, 4), np.float32))
        except Exception as exc:  # noqa: BLE001 - collected, asserted below
            errors.append(exc)
        made += 1
    thread.join()
    assert not errors, errors[:1]
    assert made > 0
