"""npe2 sample data: the synthetic tilt series (40 particles × 41 tilts, 1k × 1k) with its picked tracks."""

from __future__ import annotations

from typing import Any

from ._reader import series_layer_data
from .model.tiltseries import TiltSeries
from .sample import make_sample

__all__ = ["SAMPLE_SOURCE", "make_sample_data"]

#: The autosave key of the sample's tracks (it has no file).
SAMPLE_SOURCE = "napari-cspt2d:sample"


def make_sample_data(**sample_kwargs: Any) -> list[tuple[Any, dict[str, Any], str]]:
    """Image, trajectories and tracks layers of :func:`napari_cspt2d.sample.make_sample` (keyword arguments are
    passed on; about 2 s with the defaults). Point diameter = the sample's particle diameter."""
    sample = make_sample(**sample_kwargs)
    series = TiltSeries(sample.stack, sample.pixel_A, sample.tracks.tilts, sample.name)
    params = sample.params
    microscope = {"voltage_kV": params["scope_voltage"], "cs_mm": params["scope_cs"],
                  "amp_contrast": params["scope_wgh"]}
    return series_layer_data(series, sample.tracks, radius_px=params["particle_rad"] / sample.pixel_A,
                             source=SAMPLE_SOURCE, microscope=microscope)
