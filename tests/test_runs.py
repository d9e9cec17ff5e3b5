"""The cockpit's run logic without Qt: preview binning and what the views get, prepared in the worker."""

from __future__ import annotations

import numpy as np
import pytest

from napari_cspt2d.model.params import PypParameters
from napari_cspt2d.runs import iso_level, map_display, preview_bin


def test_preview_bin_keeps_a_useful_box():
    base = {"scope_pixel": 2.0, "particle_rad": 30.0}
    assert preview_bin(PypParameters({**base, "extract_box": 128})) == 4  # 32-voxel preview
    assert preview_bin(PypParameters({**base, "extract_box": 64})) == 2
    assert preview_bin(PypParameters({**base, "extract_box": 40})) == 1  # too small to bin


def test_map_display_is_ready_for_a_layer():
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(16, 16, 16))
    volume[6:10, 6:10, 6:10] += 10.0  # a particle: 64 of 4096 voxels (1.6 %)
    display = map_display(volume, 3.5)
    assert display.volume.dtype == np.float32 and display.volume.flags.c_contiguous
    assert display.contrast_limits == (pytest.approx(volume.min()), pytest.approx(volume.max()))
    assert display.voxel_A == 3.5
    assert 1.0 < display.iso_level < 12.0 and display.iso_level == iso_level(volume)
    flat = map_display(np.zeros((4, 4, 4)), 1.0)
    assert flat.contrast_limits[1] > flat.contrast_limits[0]  # napari refuses an empty range
