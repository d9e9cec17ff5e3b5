"""The cockpit's run logic without Qt: preview binning and what the views get, prepared in the worker."""

from __future__ import annotations

from pathlib import Path

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


def test_a_projects_fsc_plots_are_drawn_in_the_plot_process(tmp_path, monkeypatch):
    """matplotlib never runs in the run's process (it held the GIL through the cockpit's first Reconstruct and each
    Refine iteration): the PNGs are drawn by the plot process, so breaking this process's plot_fsc changes nothing."""
    from napari_cspt2d import pyp
    from napari_cspt2d.model.editing import TrackDocument
    from napari_cspt2d.model.params import PypParameters
    from napari_cspt2d.recon import reconstruct
    from napari_cspt2d.runs import Session, run_job
    from napari_cspt2d.sample import make_sample
    from conftest import GUI_SAMPLE

    def in_this_process(*_, **__):
        raise AssertionError("plot_fsc ran in the run's process")

    monkeypatch.setattr(reconstruct, "plot_fsc", in_this_process)
    sample = make_sample(**GUI_SAMPLE)
    params = PypParameters(sample.params)
    pyp.create_project(tmp_path, "sample", sample.stack, sample.tracks, params, angles=sample.tracks.tilts)
    session = Session(sample.stack, None, sample.tracks.tilts, TrackDocument(sample.tracks), sample.tracks, params,
                      tmp_path, "sample")
    [item] = run_job(session, "reconstruct", lambda *a: None, lambda: False)
    png = tmp_path / "frealign" / "maps" / "sample_r01_01_fsc.png"
    assert png in [Path(p) for p in item.written] and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    session.params.update(refine_iter=2, refine_maxiter=2, cluster_backend="local")
    [_, refined] = run_job(session, "refine", lambda *a: None, lambda: False)
    png = tmp_path / "frealign" / "maps" / "sample_r01_02_fsc.png"
    assert refined.iteration == 2 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
