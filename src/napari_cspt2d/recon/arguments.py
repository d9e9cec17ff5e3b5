"""What the kernels are given: the one mapping from a project's :class:`~napari_cspt2d.model.settings.Settings` to the
arguments of refinement and reconstruction.

Kernels take arrays and plain values, never the settings: :func:`refine.refine_tracks` takes a
:class:`refine.RefineOptions` and an :class:`refine.Imaging`, :func:`reconstruct.reconstruct_tracks` keyword values
(:class:`reconstruct.ReconstructionSettings` for the streaming :class:`reconstruct.HalfMapInsertion`). The functions
here are the only place where a parameter becomes such an argument, so a parameter's meaning is decided once.
"""

from __future__ import annotations

from typing import Any

from ..model.settings import Settings
from .constrained import CspModes
from .refine import Imaging, RefineOptions, TiltSelection, TiltUnit
from .reconstruct import ReconstructionSettings

__all__ = ["imaging", "tilt_selection", "refine_options", "csp_modes", "reconstruction_options",
           "reconstruction_settings"]


def imaging(settings: Settings) -> Imaging:
    """How particle images are boxed and modelled: box and binning, stack pixel, particle radius, optics and dose
    weighting (``reconstruct_dose_weighting_enable``, as in the reconstruction)."""
    data, extraction = settings.data, settings.extraction
    return Imaging(extraction.extract_box, extraction.extract_bin, settings.stack_pixel_A, extraction.particle_rad,
                   data.scope_voltage, data.scope_cs, data.scope_wgh,
                   settings.reconstruction.reconstruct_dose_weighting_enable)


def tilt_selection(settings: Settings, unit: TiltUnit = "auto") -> TiltSelection:
    """The tilts used for refinement: ``csp_UseImagesForRefinementMin/Max`` in ``unit`` (:class:`TiltSelection`)."""
    refinement = settings.refinement
    return TiltSelection(float(refinement.csp_UseImagesForRefinementMin),
                         float(refinement.csp_UseImagesForRefinementMax), unit)


def refine_options(settings: Settings, iteration: int, *, tilt_unit: TiltUnit = "auto",
                   **overrides: Any) -> RefineOptions:
    """Refinement options of ``iteration``: ``refine_rhref`` of that iteration, ``refine_rlref``, the shift range
    (:attr:`Settings.shift_range_A`), the tilt selection, ``csp_RefineProjectionCutoff`` (min projections) and
    ``refine_projection_score_cutoff``; with ``csp_refine_micrographs`` the shifts of every tilt are measured (the
    per-tilt geometry is fitted to all exposures, as in pyp); with ``csp_refine_particles`` the orientation search
    stays within the particle tolerances, each Euler angle its own (:attr:`CspModes.euler_range_deg`).
    ``overrides`` replace any field."""
    refinement = settings.refinement
    values: dict[str, Any] = dict(resolution_A=refinement.resolution_A(iteration),
                                  low_resolution_A=refinement.refine_rlref, shift_range_A=settings.shift_range_A,
                                  tilts=tilt_selection(settings, tilt_unit),
                                  min_projections=refinement.csp_RefineProjectionCutoff,
                                  projection_cutoff=refinement.refine_projection_score_cutoff)
    modes = csp_modes(settings)
    values["measure_all_tilts"] = modes.refine_micrographs
    if modes.refine_particles:
        values["euler_range_deg"] = modes.euler_range_deg
    values.update(overrides)
    return RefineOptions(**values)


def csp_modes(settings: Settings) -> CspModes:
    """pyp's constrained-refinement modes and tolerances (the ``csp_*`` keys)."""
    r = settings.refinement
    return CspModes(refine_micrographs=r.csp_refine_micrographs, refine_particles=r.csp_refine_particles,
                    frame_refinement=r.csp_frame_refinement, transreg=r.csp_transreg,
                    spatial_sigma_px=r.csp_spatial_sigma, time_sigma=r.csp_time_sigma,
                    tilt_angle_deg=r.csp_ToleranceMicrographTiltAngles,
                    tilt_axis_deg=r.csp_ToleranceMicrographTiltAxisAngles,
                    tilt_shift_A=r.csp_ToleranceMicrographShifts, particle_shift_A=r.csp_ToleranceParticlesShifts,
                    particle_phi_deg=r.csp_ToleranceParticlesPhi, particle_psi_deg=r.csp_ToleranceParticlesPsi,
                    particle_theta_deg=r.csp_ToleranceParticlesTheta)


def reconstruction_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of :func:`reconstruct.reconstruct_tracks` (stack pixel, box in tilt-stack px, binning,
    particle radius, optics, tilt range, dose weighting, symmetry, the map filter's ``shell_damping``)."""
    data, extraction, reconstruction = settings.data, settings.extraction, settings.reconstruction
    return dict(pixel_A=settings.stack_pixel_A, extract_box=settings.box_unbinned_px,
                extract_bin=extraction.extract_bin, particle_rad_A=extraction.particle_rad,
                voltage_kV=data.scope_voltage, cs_mm=data.scope_cs, amp_contrast=data.scope_wgh,
                min_tilt_deg=reconstruction.reconstruct_mintilt, max_tilt_deg=reconstruction.reconstruct_maxtilt,
                dose_weighting=reconstruction.reconstruct_dose_weighting_enable,
                symmetry=reconstruction.particle_sym, shell_damping=reconstruction.reconstruct_shell_damping)


def reconstruction_settings(settings: Settings) -> ReconstructionSettings:
    """:class:`ReconstructionSettings` of :func:`reconstruction_options` (for :class:`HalfMapInsertion`)."""
    return ReconstructionSettings(**reconstruction_options(settings))
