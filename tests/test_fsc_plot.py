"""The FSC plot drawn without Qt (in the cockpit's plot process)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from napari_cspt2d import fsc_plot
from napari_cspt2d.fsc_plot import FscEntry, render_fsc_plot, render_fsc_plot_apart


def test_render_fsc_plot_marks_the_highlighted_curve():
    freq = np.linspace(0.0, 0.125, 33)
    entries = [FscEntry(f"run 1 · it {i}", freq, np.exp(-freq * (60 - 20 * i)), 20.0 - 3 * i) for i in (1, 2)]
    image = render_fsc_plot(entries, 1, (360, 240))
    assert image.shape == (240, 360, 4) and image.dtype == np.uint8
    rgb = image[..., :3].astype(int)
    blue = (rgb[..., 2] > 200) & (rgb[..., 0] < 120)  # the highlighted curve (#4fc3f7)
    orange = (rgb[..., 0] > 150) & (rgb[..., 0] - rgb[..., 2] > 80)  # its 0.143 marker (#ff8a65)
    assert blue.sum() > 100 and orange.sum() > 50
    empty = render_fsc_plot([], 0, (360, 240))[..., :3].astype(int)
    assert not ((empty[..., 0] > 150) & (empty[..., 0] - empty[..., 2] > 80)).any()  # nothing marked


def test_render_fsc_plot_apart_draws_the_same_pixels_in_another_process():
    freq = np.linspace(0.0, 0.125, 33)
    entries = [FscEntry("run 1 · it 1", freq, np.exp(-freq * 40), 14.0)]
    apart = render_fsc_plot_apart(entries, 0, (360, 240))
    np.testing.assert_array_equal(apart, render_fsc_plot(entries, 0, (360, 240)))
    drawer = fsc_plot._plot_process().submit(os.getpid).result()
    assert drawer != os.getpid()  # matplotlib ran outside this process (and its interpreter lock)


@pytest.mark.skipif(not hasattr(os, "nice"), reason="no os.nice on this platform")
def test_the_plot_process_runs_at_a_lower_priority():
    """It yields the cores to the window's process (its start-up overlaps a run's reconstruction)."""
    niceness = fsc_plot.start_plot_process().result()
    assert niceness == min(os.nice(0) + fsc_plot.PLOT_NICENESS, 19)
    assert fsc_plot._plot_process().submit(os.getpid).result() != os.getpid()
