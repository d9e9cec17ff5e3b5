"""``PypParameters``: the pyp parameters of a project (``.pyp_config.toml``), typed, documented and validated.

:data:`PARAMS` is the one table of every key: type, default, unit, help text and form group. The napari form and the
CLI are generated from it. Names, defaults and units follow pyp's public spec (``config/pyp_config.toml`` of
nextpyp/pyp) except where noted in the help text; keys marked ``pyp=False`` are napari-cspt2d's own.

Notes on pyp's meaning of some keys (kept, so that a project means the same thing to pyp):

* ``extract_box`` is the box of the *extracted* particle images, in extracted (binned) pixels; pyp cuts
  ``extract_box * extract_bin`` tilt-stack pixels. Pixel of the extracted particles = ``scope_pixel * data_bin *
  extract_bin`` Å (:attr:`PypParameters.particle_pixel_A`).
* Per-iteration values (``refine_rhref``, ``reconstruct_cutoff``) are pyp colon lists ``"8:7:6"``: the first value is
  for iteration 2 (the first refinement), the last one is repeated for later iterations
  (:func:`param_for_iteration`).
* ``csp_UseImagesForRefinementMin/Max`` select exposures by acquisition index (``TIND``, 0 = first exposure;
  Max = -1 means "to the last"); a negative Min makes them tilt angles in degrees (the seed's -60/60). Whether the
  range selects nothing is checked by the pipeline, which knows the tilts.
* ``csp_RefineProjectionCutoff`` is pyp's "min number of projections for refinement" (an integer, 0 = all); a
  value between 0 and 1 (the seed's 0.5) is taken as a fraction of the tilt series' tilts.

Values the seed writes that do not fit pyp's meaning are accepted and what they are taken to mean is said once per
process (:func:`interpretations`). Keys renamed to pyp's names (:data:`RENAMED`) are still read under their old
names, with a one-time notice.

Unknown keys: a key of pyp's spec that napari-cspt2d does not use (:func:`pyp_key_names`) is kept as is. Any other
key that is close to a known one (``extract_bxo``) is taken for a typo and refused with the closest name, unless
the caller allows unknown keys; it would otherwise leave the default in place and change the work silently.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from difflib import get_close_matches
from functools import cache
from importlib import resources
from typing import Any

import numpy as np

from ..errors import CsptInputError, warn_input
from .tracks import _shown

__all__ = [
    "ParamSpec", "PARAMS", "GROUPS", "RENAMED", "PypParameters", "check_cspt_mode", "param_for_iteration",
    "refine_rhref_for", "check_name", "NAME_PATTERN", "as_parameters", "pyp_key_names", "closest_key",
    "interpretations", "min_projections",
]

GROUPS = ("data", "extraction", "refinement", "reconstruction", "cluster")

#: Names used in file names (``{name}_stack.mrc``, ``data_set``): no path separators, no "..", no NUL or spaces.
NAME_PATTERN = r"(?!.*\.\.)[A-Za-z0-9_][A-Za-z0-9._+-]{0,199}"


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: ``type`` is bool, int, float or str; ``minimum``/``maximum`` are inclusive unless
    ``min_exclusive``; ``per_iteration`` marks a pyp colon list of numbers (each checked against the range);
    ``pattern`` is a regular expression a string must match in full; ``fraction`` lets an int key also take a
    number between 0 and 1 (a fraction, like pyp's ``reconstruct_cutoff``); ``pyp`` is False for our own keys."""

    name: str
    type: type
    default: Any
    group: str
    label: str
    help: str
    unit: str = ""
    minimum: float | None = None
    maximum: float | None = None
    min_exclusive: bool = False
    choices: tuple[str, ...] | None = None
    pattern: str | None = None
    per_iteration: bool = False
    fraction: bool = False
    pyp: bool = True

    def describe_range(self) -> str:
        lo = "" if self.minimum is None else f"{'>' if self.min_exclusive else '>='} {self.minimum:g}"
        hi = "" if self.maximum is None else f"<= {self.maximum:g}"
        return " and ".join(p for p in (lo, hi) if p) or "any value"


_SPECS = [
    # ---------------------------------------------------------------- data
    ParamSpec("data_set", str, "", "data", "Data set name",
              "Project name (pyp's data_set); letters, digits and . _ + - only, as it ends up in file names.",
              pattern=f"(|{NAME_PATTERN})"),
    ParamSpec("data_mode", str, "tomo", "data", "Data mode",
              "pyp data mode; 2D tilt-series CSPT needs 'tomo'.", choices=("tomo", "spr")),
    ParamSpec("data_bin", int, 1, "data", "Data binning",
              "Binning of the raw images that made {name}_stack.mrc; tilt-stack pixel = scope_pixel x data_bin.",
              unit="x", minimum=1),
    ParamSpec("scope_pixel", float, 1.35, "data", "Pixel size",
              "Detector pixel size (before data_bin). pyp requires it (no default); 1.35 is the seed's value.",
              unit="Å", minimum=0, min_exclusive=True, maximum=100),
    ParamSpec("scope_voltage", float, 300.0, "data", "Voltage", "Acceleration voltage (pyp requires it).",
              unit="kV", minimum=0, min_exclusive=True, maximum=1000),
    ParamSpec("scope_cs", float, 2.7, "data", "Spherical aberration", "Spherical aberration Cs of the microscope.",
              unit="mm", minimum=0, maximum=20),
    ParamSpec("scope_wgh", float, 0.07, "data", "Amplitude contrast", "Amplitude contrast fraction.",
              minimum=0, maximum=1),
    ParamSpec("scope_dose_rate", float, 1.0, "data", "Dose per tilt",
              "Electron dose of each exposure (tilt image), used for dose weighting (B = -4 x exposure index x dose).",
              unit="e/Å²", minimum=0, maximum=1000),
    ParamSpec("tomo_rec_binning", float, 1.0, "data", "Tomogram binning",
              "pyp's binning of its tomograms: {name}.pkl holds the tomogram size divided by it, and pyp "
              "multiplies it back. pyp's default is 8; projects made here write 1 unless it is set.",
              unit="x", minimum=0, min_exclusive=True),
    # ---------------------------------------------------------------- extraction
    ParamSpec("extract_box", int, 256, "extraction", "Box size",
              "Box of the extracted particle images in extracted (binned) pixels; pyp cuts extract_box x "
              "extract_bin tilt-stack pixels. pyp requires it; 256 is the seed's value.",
              unit="px", minimum=2, maximum=4096),
    ParamSpec("extract_bin", int, 1, "extraction", "Extraction binning",
              "Binning of the extracted particle images relative to the tilt stack.", unit="x", minimum=1,
              maximum=64),
    ParamSpec("particle_rad", float, 100.0, "extraction", "Particle radius",
              "Approximate particle radius (pyp requires it; 100 is the seed's value); the box must hold the "
              "particle diameter.", unit="Å", minimum=0, min_exclusive=True),
    # ---------------------------------------------------------------- refinement
    ParamSpec("csp_no_3d_points", bool, True, "refinement", "2D tracks only (no 3D points)",
              "2D tilt-series CSPT: particles are known by their 2D tracks, their 3D points may be zero. Required "
              "for this mode (not in pyp's public spec; defined by the seed's workflow).", pyp=True),
    ParamSpec("csp_frame_refinement", bool, True, "refinement", "Per-particle refinement",
              "pyp's movie-frame refinement switch; required on for per-particle splitting in this mode "
              "(pyp's default is off)."),
    ParamSpec("refine_iter", int, 2, "refinement", "Starting iteration",
              "First refinement iteration (pyp counts from 2; iteration 1 is the initial parameters).", minimum=2),
    ParamSpec("refine_maxiter", int, 2, "refinement", "Last iteration", "Last refinement iteration.", minimum=2),
    ParamSpec("refine_rhref", str, "10", "refinement", "Max resolution",
              "High-resolution limit used in refinement, per iteration as a colon list ('8:7:6' = 8 Å in "
              "iteration 2, 7 Å in 3, 6 Å after).", unit="Å", minimum=0, min_exclusive=True, per_iteration=True),
    ParamSpec("refine_rlref", float, 100.0, "refinement", "Min resolution",
              "Low-resolution limit used in refinement.", unit="Å", minimum=0, min_exclusive=True),
    ParamSpec("refine_shift_range_A", float, 0.0, "refinement", "Shift search range",
              "Largest distance a projection may move from its pick during refinement; 0 = a quarter of "
              "particle_rad.", unit="Å", minimum=0,
              pyp=False),
    ParamSpec("csp_RefineProjectionCutoff", int, 0, "refinement", "Min projections for refinement",
              "Only refine particles that have at least this many projections (pyp's meaning; 0 = all). A value "
              "between 0 and 1 (the seed's 0.5) is a fraction of the tilt series' tilts.", minimum=0, fraction=True),
    ParamSpec("refine_projection_score_cutoff", float, 0.0, "refinement", "Projection score cutoff",
              "Drop low-scoring projections from refinement and reconstruction (occupancy 0), per particle: for "
              "0 < c < 1 below c x the particle's median score, for c >= 1 below mean - c x sd; 0 keeps all "
              "(napari-cspt2d's own key).", minimum=0, pyp=False),
    ParamSpec("csp_UseImagesForRefinementMin", int, 0, "refinement", "First exposure for refinement",
              "First exposure used in refinement: acquisition index (pyp's meaning, 0 = first image taken); a "
              "negative Min makes Min/Max tilt angles in degrees instead (the seed's -60/60; see "
              "recon.refine.TiltSelection). With csp_refine_micrographs the other tilts are still measured, for "
              "their own tilt geometry only (as pyp's micrograph refinement uses every exposure)."),
    ParamSpec("csp_UseImagesForRefinementMax", int, 20, "refinement", "Last exposure for refinement",
              "Last exposure used in refinement (acquisition index, -1 = up to the last one; degrees when Min is "
              "negative)."),
    # constrained refinement (pyp's tab "csp"; meanings and rules in recon.constrained)
    ParamSpec("csp_refine_micrographs", bool, False, "refinement", "Refine tilt geometry",
              "Refine each tilt image's tilt angle, tilt-axis angle and shift, shared by all particles of the tilt "
              "series (constrained mode; off = free per-projection shifts)."),
    ParamSpec("csp_ToleranceMicrographTiltAngles", float, 1.5, "refinement", "Tilt-angle range",
              "How far a tilt angle may move from its starting value (csp_refine_micrographs).", unit="°",
              minimum=0, maximum=90),
    ParamSpec("csp_ToleranceMicrographTiltAxisAngles", float, 1.0, "refinement", "Tilt-axis angle range",
              "How far a tilt-axis angle may move from its starting value (csp_refine_micrographs).", unit="°",
              minimum=0, maximum=180),
    ParamSpec("csp_ToleranceMicrographShifts", float, 100.0, "refinement", "Tilt shift range",
              "How far each tilt image may shift (each of x, y) from its starting position "
              "(csp_refine_micrographs).", unit="Å", minimum=0),
    ParamSpec("csp_refine_particles", bool, False, "refinement", "Refine particle alignments",
              "Refine each particle's 3D position (fitted from its track) and orientation, seen through the tilt "
              "geometry in every tilt (constrained mode)."),
    ParamSpec("csp_ToleranceParticlesPhi", float, 30.0, "refinement", "Particle Phi range",
              "How far a particle's Euler angle Phi may move from its start in constrained refinement "
              "(csp_refine_particles); 0 holds it.", unit="°", minimum=0, maximum=180),
    ParamSpec("csp_ToleranceParticlesPsi", float, 30.0, "refinement", "Particle Psi range",
              "How far Psi (the in-plane angle) may move; 0 holds it (see Particle Phi range).", unit="°",
              minimum=0, maximum=180),
    ParamSpec("csp_ToleranceParticlesTheta", float, 30.0, "refinement", "Particle Theta range",
              "How far Theta may move; 0 holds it (see Particle Phi range).", unit="°", minimum=0, maximum=180),
    ParamSpec("csp_ToleranceParticlesShifts", float, 20.0, "refinement", "Particle translation range",
              "How far a particle's 3D position may move (each of x, y, z) from the one fitted from its track "
              "(csp_refine_particles).", unit="Å", minimum=0),
    ParamSpec("csp_transreg", bool, False, "refinement", "Regularize translations",
              "Pull per-projection shifts towards the constrained prediction: residuals are averaged over nearby "
              "particles (csp_spatial_sigma) and smoothed along the exposures (csp_time_sigma), as pyp does."),
    ParamSpec("csp_spatial_sigma", float, 500.0, "refinement", "Spatial sigma",
              "Distance scale of the neighbour weights exp(-d / sigma) of csp_transreg; 0 = no spatial averaging.",
              unit="px", minimum=0),
    ParamSpec("csp_time_sigma", int, 21, "refinement", "Time sigma",
              "Window (number of exposures, in acquisition order) of csp_transreg's smoothing; 0 = none.",
              minimum=0, maximum=1000),
    ParamSpec("fitted_heights_ctf", bool, True, "refinement", "Heights from tracks for the CTF",
              "When the tracks carry no 3D points, fit each particle's 3D point from its track and give every "
              "projection the defocus of its height (tilt defocus minus height), where the fit is trustworthy "
              "(height uncertainty below fitted_heights_max_error_A).", pyp=False),
    ParamSpec("fitted_heights_max_error_A", float, 100.0, "refinement", "Height uncertainty limit",
              "A fitted height is used for the CTF only when its 1-sigma uncertainty is at most this.", unit="Å",
              minimum=0, min_exclusive=True, pyp=False),
    # ---------------------------------------------------------------- reconstruction
    ParamSpec("particle_sym", str, "C1", "reconstruction", "Symmetry",
              "Point-group symmetry applied during reconstruction, with RELION's axes: Cn (n-fold axis along z), "
              "Dn (plus a 2-fold axis along x), T, O (4-fold axes along x, y, z), I (= I2) or I1..I4.",
              pattern=r"(?i:[CD][1-9][0-9]{0,2}|T|O|I[1-4]?)"),
    ParamSpec("reconstruct_cutoff", str, "1", "reconstruction", "Fraction of particles",
              "pyp's particles per reconstruction, per iteration (0 = automatic, < 1 = fraction, 1 = all, > 1 = "
              "number), kept for pyp: napari-cspt2d reconstructs every projection that passes "
              "csp_RefineProjectionCutoff.", minimum=0, per_iteration=True),
    ParamSpec("reconstruct_mintilt", float, -90.0, "reconstruction", "Min tilt angle",
              "Projections at tilt angles below this are not reconstructed.", unit="°", minimum=-90, maximum=90),
    ParamSpec("reconstruct_maxtilt", float, 90.0, "reconstruction", "Max tilt angle",
              "Projections at tilt angles above this are not reconstructed.", unit="°", minimum=-90, maximum=90),
    ParamSpec("reconstruct_dose_weighting_enable", bool, False, "reconstruction", "Dose weighting",
              "Weight each tilt by its accumulated dose during reconstruction."),
    ParamSpec("reconstruct_shell_damping", float, 1.0, "reconstruction", "Map filter strength",
              "Fraction of the Wiener filter's per-shell attenuation the maps keep (log amplitude): 1 = the full "
              "Wiener filter (closest to the truth when the poses are right), 0 = none (every shell at unit signal "
              "gain, for FSC against a model). 0.5 scores with a plain back-projection in FSC against the truth "
              "inside a tight mask and keeps most of the Wiener map's real-space fidelity at low SNR (README "
              "'Fidelity'). The half maps' FSC does not depend on it.",
              minimum=0, maximum=1, pyp=False),
    # ---------------------------------------------------------------- cluster
    ParamSpec("cluster_backend", str, "local", "cluster", "Run on",
              "'local' = dask processes on this machine, 'address' = an existing dask scheduler "
              "(cluster_address), 'slurm' = SLURM jobs started through dask-jobqueue.",
              choices=("local", "address", "slurm"), pyp=False),
    ParamSpec("cluster_address", str, "", "cluster", "Scheduler address",
              "dask scheduler address, e.g. tcp://10.0.0.5:8786 (cluster_backend = address).",
              pattern=r"(|[a-z]+://\S+|[^\s/:]+:\d+)", pyp=False),
    ParamSpec("workers", int, 0, "cluster", "Workers",
              "Number of dask workers (local processes or SLURM jobs); 0 = one per CPU core locally, one job "
              "per bundle on SLURM.", minimum=0, maximum=10000, pyp=False),
    ParamSpec("slurm_queue", str, "", "cluster", "SLURM partition",
              "SLURM partition the jobs are submitted to (pyp's key; formerly slurm_partition).",
              pattern=r"[A-Za-z0-9_.,-]*"),
    ParamSpec("slurm_account", str, "", "cluster", "SLURM account", "Account charged for the jobs (pyp's key).",
              pattern=r"[A-Za-z0-9_.-]*"),
    ParamSpec("slurm_walltime", str, "1-00:00:00", "cluster", "Walltime",
              "Maximum run time of each job, [days-]hh:mm:ss or minutes (pyp's key and default).",
              pattern=r"(\d+-)?\d{1,2}:\d{2}:\d{2}|\d+"),
    ParamSpec("slurm_tasks", int, 1, "cluster", "Threads per job",
              "CPU cores of each SLURM job, each running one single-threaded worker (pyp's key: threads of each "
              "Split job; formerly slurm_cores).", minimum=1, maximum=1024),
    ParamSpec("slurm_memory", int, 4, "cluster", "Memory per job", "Memory of each SLURM job (pyp's key and "
              "default).", unit="GB", minimum=1, maximum=4096),
    ParamSpec("slurm_job_extra", str, "", "cluster", "Extra sbatch directives",
              "Additional #SBATCH options, separated by ';' (e.g. '--gres=gpu:1;--constraint=avx2').", pyp=False),
    ParamSpec("slurm_bundle_size", int, 1, "cluster", "Bundle size",
              "Number of regions processed one after the other in each job (pyp's key: micrographs or tilt "
              "series); in 2D tilt-series CSPT a region is one particle, so this is particles per task.",
              minimum=1),
]

#: Every key of a project's parameters, in form order.
PARAMS: dict[str, ParamSpec] = {s.name: s for s in _SPECS}

#: Keys renamed to pyp's names: old name -> new name (old names are still read, with a one-time notice).
RENAMED = {"slurm_partition": "slurm_queue", "slurm_cores": "slurm_tasks"}

#: How close (difflib ratio) an unknown key must be to a known one to be taken for its typo.
_TYPO_RATIO = 0.8
#: Notices already given in this process (each is said once).
_SAID: set[str] = set()


@cache
def pyp_key_names() -> frozenset[str]:
    """Every parameter name of pyp's public spec (``pyp_keys.txt`` beside this module, with its source)."""
    text = resources.files(__package__).joinpath("pyp_keys.txt").read_text(encoding="utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def closest_key(key: str) -> str | None:
    """The known key (of napari-cspt2d or pyp) that ``key`` is most likely a typo of, None when none is close."""
    close = get_close_matches(key, [*PARAMS, *RENAMED, *pyp_key_names()], n=1, cutoff=_TYPO_RATIO)
    return close[0] if close else None


def _say_once(message: str, *, file: Any = None, field: str | None = None) -> None:
    """A :class:`~napari_cspt2d.errors.CsptInputWarning`, given at most once per process."""
    if message not in _SAID:
        _SAID.add(message)
        warn_input(message, file=file, field=field)


def min_projections(cutoff: float, n_tilts: int) -> int:
    """The fewest projections a particle needs to be refined under ``csp_RefineProjectionCutoff = cutoff`` in a
    tilt series of ``n_tilts`` tilts: ``cutoff`` itself (pyp's count; 0 = every particle), or
    ``ceil(cutoff x n_tilts)`` for a fraction between 0 and 1."""
    if 0 < cutoff < 1:
        return math.ceil(cutoff * n_tilts - 1e-9)
    return int(cutoff)


def interpretations(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(key, what it is taken to mean)`` for each value of ``params`` that does not fit pyp's meaning of the key
    (the seed's ``csp_RefineProjectionCutoff = 0.5``, ``csp_UseImagesForRefinementMin = -60``)."""
    notes = []
    cutoff = params.get("csp_RefineProjectionCutoff", 0)
    if 0 < cutoff < 1:
        notes.append(("csp_RefineProjectionCutoff",
                      f"csp_RefineProjectionCutoff = {cutoff:g} is taken as a fraction: particles with projections "
                      f"in at least {cutoff:.0%} of their tilt series' tilts are refined (pyp's meaning: the minimum "
                      "number of projections, an integer)"))
    low, high = params.get("csp_UseImagesForRefinementMin", 0), params.get("csp_UseImagesForRefinementMax", 0)
    if low < 0:
        notes.append(("csp_UseImagesForRefinementMin",
                      f"csp_UseImagesForRefinementMin/Max = {low:g}/{high:g} are taken as tilt angles in degrees, "
                      "because Min is negative (pyp's meaning: exposure indices, 0 = the first image taken)"))
    return notes

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def check_name(value: Any, field: str) -> str:
    """``value`` if it is safe as a file-name part (see :data:`NAME_PATTERN`), else :class:`CsptInputError`."""
    if not isinstance(value, str) or not re.fullmatch(NAME_PATTERN, value):
        raise CsptInputError(f"is {value!r}", field=field,
                             expected="a name of letters, digits and . _ + - (no '/', '..', spaces or NUL)")
    return value


def _suggest(key: str, known: list[str]) -> str:
    close = get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _coerce(spec: ParamSpec, value: Any) -> Any:
    """``value`` converted to ``spec``'s type and checked against its range, choices and pattern."""
    bad = lambda: CsptInputError(f"is {_shown(value)}", field=spec.name, expected=_expected(spec))  # noqa: E731
    if spec.type is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad()
    if isinstance(value, (bool, np.bool_)) or value is None:
        raise bad()
    if spec.type is int:
        try:
            number = float(value) if not isinstance(value, int) else value
        except (TypeError, ValueError):
            raise bad() from None
        if spec.fraction and isinstance(number, float) and 0 < number < 1:
            return number
        if isinstance(number, float) and not (math.isfinite(number) and number == int(number)):
            raise bad()
        result: Any = int(number)
        if not -(2**63) <= result < 2**63:
            raise bad()
        _check_range(spec, result, value)
        return result
    if spec.type is float:
        try:
            result = float(value)
        except (TypeError, ValueError, OverflowError):
            raise bad() from None
        if not math.isfinite(result):
            raise bad()
        _check_range(spec, result, value)
        return result
    if spec.per_iteration and isinstance(value, (int, float)):
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise bad()
        value = f"{value:g}" if isinstance(value, float) else str(value)
    if not isinstance(value, str):
        raise bad()
    if spec.choices is not None:
        if value.lower() not in spec.choices:
            raise bad()
        return value.lower()
    if spec.pattern is not None and not re.fullmatch(spec.pattern, value):
        raise bad()
    if spec.per_iteration:
        for item in value.split(":"):
            try:
                number = float(item)
            except ValueError:
                raise bad() from None
            if not math.isfinite(number):
                raise bad()
            _check_range(spec, number, value)
    return value


def _check_range(spec: ParamSpec, number: float, original: Any) -> None:
    low_ok = spec.minimum is None or (number > spec.minimum if spec.min_exclusive else number >= spec.minimum)
    high_ok = spec.maximum is None or number <= spec.maximum
    if not (low_ok and high_ok):
        raise CsptInputError(f"is {_shown(original)}", field=spec.name, expected=_expected(spec))


def _expected(spec: ParamSpec) -> str:
    if spec.type is bool:
        return "true or false"
    if spec.choices:
        return "one of " + ", ".join(repr(c) for c in spec.choices)
    kind = {int: "an integer", float: "a number", str: "a string"}[spec.type]
    if spec.fraction:
        kind += " or a fraction between 0 and 1"
    if spec.per_iteration:
        kind = "a number or colon list of numbers like '8:7:6'"
    if spec.pattern and not spec.per_iteration:
        kind += f" matching {spec.pattern}"
    if spec.minimum is not None or spec.maximum is not None:
        kind += f", {spec.describe_range()}"
    return kind + (f" ({spec.unit})" if spec.unit else "")


class PypParameters(MutableMapping):
    """A dict of every key of :data:`PARAMS` (defaults filled in), each value typed and range-checked on assignment.

    ``PypParameters({"scope_pixel": 1.35, ...})`` validates every key and the consistency of the whole
    (:meth:`validate`). Unknown keys raise :class:`CsptInputError` with the closest valid name; with
    ``strict=False`` other keys of pyp's spec are kept in :attr:`extra` (a real ``.pyp_config.toml`` has many) and
    written back on save, and a key close to a known one still raises as a typo unless ``allow_unknown`` (then it
    is kept too, with a warning). Old names (:data:`RENAMED`) are read as their new names. Deleting a known key
    resets it to its default. Assigning keys one at a time checks each value; call :meth:`validate` afterwards to
    check the combination."""

    def __init__(self, values: Mapping[str, Any] | None = None, *, strict: bool = True,
                 source: str | os.PathLike[str] | None = None, allow_unknown: bool = False) -> None:
        self._values: dict[str, Any] = {name: spec.default for name, spec in PARAMS.items()}
        self.extra: dict[str, Any] = {}
        self.strict = strict
        self.allow_unknown = allow_unknown
        self.source = None if source is None else os.fspath(source)
        values = {self._current_name(str(k)): v for k, v in dict(values or {}).items()}
        unknown = [k for k in values if k not in PARAMS]
        if unknown and strict:
            lines = [f"{k!r}{_suggest(str(k), list(PARAMS))}" for k in unknown]
            raise CsptInputError("unknown parameter(s): " + ", ".join(lines), file=self.source,
                                 field=", ".join(map(str, unknown)), expected="keys of PARAMS")
        foreign = [k for k in unknown if k not in pyp_key_names()]
        typos = {k: close for k in foreign if (close := closest_key(k)) is not None}
        if typos and not allow_unknown:
            shown = "; ".join(f"{k!r}: did you mean {close!r}?" for k, close in typos.items())
            raise CsptInputError(f"unknown parameter {shown} A misspelt key would leave the default in place: fix "
                                 "it, or keep it as is with --allow-unknown (allow_unknown=True in Python)",
                                 file=self.source, field=", ".join(typos))
        if foreign:
            _say_once(f"{len(foreign)} parameter(s) neither napari-cspt2d's nor pyp's, kept as is: "
                      + ", ".join(repr(k) for k in foreign[:5]) + (", ..." if len(foreign) > 5 else ""),
                      file=self.source, field="parameters")
        for key in unknown:
            self.extra[key] = values.pop(key)
        problems = []
        for key, value in values.items():
            try:
                self._values[key] = _coerce(PARAMS[key], value)
            except CsptInputError as exc:
                problems.append(exc)
        if problems:
            raise CsptInputError("; ".join(str(p) for p in problems), file=self.source,
                                 field=", ".join(p.field or "" for p in problems))
        self.validate()

    def _current_name(self, key: str) -> str:
        """``key``, or its new name when it is an old one (:data:`RENAMED`), said once."""
        if key not in RENAMED:
            return key
        _say_once(f"'{key}' is now called '{RENAMED[key]}' (pyp's name); read as such", file=self.source)
        return RENAMED[key]

    # ---------------------------------------------------------------- mapping protocol
    def __getitem__(self, key: str) -> Any:
        key = self._current_name(key)
        if key in self._values:
            return self._values[key]
        if key in self.extra:
            return self.extra[key]
        raise KeyError(f"{key!r}{_suggest(str(key), list(PARAMS))}")

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, else ``default``; a missing key costs no typo suggestion (``__getitem__``'s)."""
        key = self._current_name(key)
        return self._values[key] if key in self._values else self.extra.get(key, default)

    def __contains__(self, key: object) -> bool:
        key = self._current_name(key) if isinstance(key, str) else key
        return key in self._values or key in self.extra

    def __setitem__(self, key: str, value: Any) -> None:
        key = self._current_name(key)
        if key in PARAMS:
            self._values[key] = _coerce(PARAMS[key], value)
        elif self.strict:
            raise CsptInputError(f"unknown parameter{_suggest(str(key), list(PARAMS))}", file=self.source,
                                 field=str(key), expected="a key of PARAMS")
        else:
            self.extra[key] = value

    def __delitem__(self, key: str) -> None:
        key = self._current_name(key)
        if key in PARAMS:
            self._values[key] = PARAMS[key].default
        else:
            del self.extra[key]

    def __iter__(self) -> Iterator[str]:
        yield from self._values
        yield from self.extra

    def __len__(self) -> int:
        return len(self._values) + len(self.extra)

    def __repr__(self) -> str:
        changed = {k: v for k, v in self._values.items() if v != PARAMS[k].default}
        return f"PypParameters({changed!r}{', extra=' + repr(self.extra) if self.extra else ''})"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every key (our keys in :data:`PARAMS` order, then :attr:`extra`)."""
        return {**self._values, **self.extra}

    def copy(self) -> PypParameters:
        return PypParameters(self.to_dict(), strict=self.strict, source=self.source, allow_unknown=self.allow_unknown)

    # ---------------------------------------------------------------- derived values
    @property
    def stack_pixel_A(self) -> float:
        """Pixel of ``{name}_stack.mrc`` (Å): ``scope_pixel * data_bin``."""
        return self["scope_pixel"] * self["data_bin"]

    @property
    def particle_pixel_A(self) -> float:
        """Pixel of the extracted particle images (Å): ``scope_pixel * data_bin * extract_bin``."""
        return self.stack_pixel_A * self["extract_bin"]

    @property
    def box_unbinned_px(self) -> int:
        """Box cut from the tilt stack, in tilt-stack pixels: ``extract_box * extract_bin``."""
        return self["extract_box"] * self["extract_bin"]

    # ---------------------------------------------------------------- consistency
    def validate(self) -> PypParameters:
        """Check the combination of values; raises one :class:`CsptInputError` listing every inconsistency."""
        problems: list[tuple[str, str]] = []
        diameter_px = 2 * self["particle_rad"] / self.particle_pixel_A
        if self["extract_box"] < diameter_px:
            problems.append(("extract_box", f"extract_box = {self['extract_box']} px is smaller than the particle "
                             f"diameter ({diameter_px:.1f} px = 2 x {self['particle_rad']:g} Å at "
                             f"{self.particle_pixel_A:g} Å/px)"))
        if self["refine_maxiter"] < self["refine_iter"]:
            problems.append(("refine_maxiter", f"refine_maxiter = {self['refine_maxiter']} is before refine_iter = "
                             f"{self['refine_iter']}"))
        if self["reconstruct_mintilt"] > self["reconstruct_maxtilt"]:
            problems.append(("reconstruct_mintilt", f"reconstruct_mintilt = {self['reconstruct_mintilt']:g}° is "
                             f"above reconstruct_maxtilt = {self['reconstruct_maxtilt']:g}°"))
        rhref = [float(v) for v in self["refine_rhref"].split(":")]
        if max(rhref) >= self["refine_rlref"]:
            problems.append(("refine_rhref", f"refine_rhref {self['refine_rhref']} Å must be finer (smaller) than "
                             f"refine_rlref = {self['refine_rlref']:g} Å"))
        if self["cluster_backend"] == "address" and not self["cluster_address"]:
            problems.append(("cluster_address", "cluster_backend = 'address' needs cluster_address"))
        if problems:
            raise CsptInputError("inconsistent parameters: " + "; ".join(m for _, m in problems), file=self.source,
                                 field=", ".join(f for f, _ in problems))
        for _, meaning in interpretations(self):
            _say_once(meaning, file=self.source)
        nyquist = 2 * self.particle_pixel_A
        if min(rhref) < nyquist:
            warn_input(f"refine_rhref {self['refine_rhref']} Å goes beyond Nyquist ({nyquist:g} Å at "
                       f"{self.particle_pixel_A:g} Å/px); it will be limited to Nyquist", file=self.source,
                       field="refine_rhref")
        return self


def as_parameters(parameters: Mapping[str, Any], *, strict: bool) -> PypParameters:
    """``parameters`` as :class:`PypParameters`: one is re-validated, a plain mapping is validated (other pyp keys are
    kept unless ``strict``)."""
    if isinstance(parameters, PypParameters):
        return parameters.validate()
    if not isinstance(parameters, Mapping):
        raise CsptInputError(f"is a {type(parameters).__name__}", field="parameters",
                             expected="a dict or PypParameters")
    return PypParameters(parameters, strict=strict)


def check_cspt_mode(params: Mapping[str, Any], source: str | None = None) -> None:
    """Raise ONE :class:`CsptInputError` "No output parameter file is generated: ..." listing every condition of
    2D tilt-series CSPT that ``params`` fails: ``csp_no_3d_points`` true, ``data_mode`` containing "tomo",
    ``csp_frame_refinement`` true. ``source`` (default: ``params.source``, if any) is the file they came from."""
    failures = []
    if params.get("csp_no_3d_points") is not True:
        failures.append(f"csp_no_3d_points is {params.get('csp_no_3d_points')!r} (must be true)")
    mode = params.get("data_mode")
    if not isinstance(mode, str) or "tomo" not in mode.lower():
        failures.append(f"data_mode is {mode!r} (must contain 'tomo')")
    if params.get("csp_frame_refinement") is not True:
        failures.append(f"csp_frame_refinement is {params.get('csp_frame_refinement')!r} (must be true)")
    if failures:
        source = source or getattr(params, "source", None)
        exc = CsptInputError("No output parameter file is generated: " + "; ".join(failures)
                             + (f" (parameters from {source})" if source else ""))
        # file and field set after construction, so that the message keeps the seed's wording at its start
        exc.file, exc.field = source, "csp_no_3d_points/data_mode/csp_frame_refinement"
        raise exc


def param_for_iteration(params: Mapping[str, Any], key: str, iteration: int) -> str:
    """The value of a per-iteration colon list for ``iteration`` (pyp's rule: item ``iteration - 2``, the last item
    for later iterations; iterations before 2 get the first item)."""
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 1:
        raise CsptInputError(f"is {iteration!r}", field="iteration", expected="an integer >= 1")
    if key not in params:
        raise CsptInputError("is missing", field=key, expected="a value or colon list like '8:7:6'")
    items = str(params[key]).split(":")
    return items[min(max(iteration - 2, 0), len(items) - 1)].strip()


def refine_rhref_for(params: Mapping[str, Any], iteration: int) -> float:
    """High-resolution refinement limit (Å) for ``iteration`` from ``refine_rhref`` (e.g. ``"8:7:6"``)."""
    value = param_for_iteration(params, "refine_rhref", iteration)
    try:
        result = float(value)
    except ValueError:
        raise CsptInputError(f"has item {value!r}", field="refine_rhref",
                             expected="numbers in Å like '8:7:6'") from None
    if not (math.isfinite(result) and result > 0):
        raise CsptInputError(f"has item {value!r}", field="refine_rhref", expected="resolutions > 0 Å")
    return result
