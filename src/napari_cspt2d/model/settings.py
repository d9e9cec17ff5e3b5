"""``Settings``: a project's parameters parsed once into one typed, immutable object, grouped as the user thinks
of them.

The boundary (the ``pyp`` façade, the ``cspt2d`` command, the napari widgets) turns the ``.pyp_config.toml`` dict or
:class:`~napari_cspt2d.model.params.PypParameters` into a :class:`Settings` with :meth:`Settings.parse`; the
pipeline, refinement, reconstruction and cluster code receive that object and never read a parameter by its string
key. Its five groups are the form groups of :data:`~napari_cspt2d.model.params.PARAMS`::

    settings.data            data set, binning and optics: data_set, data_mode, data_bin, scope_pixel (Å), ...
    settings.extraction      extract_box (extracted px), extract_bin, particle_rad (Å)
    settings.refinement      refine_iter, refine_maxiter, refine_rhref ("8:7:6", Å), refine_rlref (Å), ...
    settings.reconstruction  particle_sym, reconstruct_mintilt/maxtilt (°), reconstruct_dose_weighting_enable, ...
    settings.cluster         cluster_backend, workers, slurm_* ...

Each group's fields are exactly the keys of its group in ``PARAMS``, with their names, types and units (see
``PARAMS[key].help``): **adding a key to ``PARAMS`` is the one edit** that makes it a field here. Values are checked
when parsed (ranges, choices, the combination: :meth:`PypParameters.validate`); a key that is not in ``PARAMS`` is
refused with the closest valid name, except that the other keys of a real pyp config are kept aside by
``PypParameters(strict=False)`` (with a warning) and never reach the settings. Values derived from several keys
(pixel sizes, the unbinned box, the shift range, an iteration's resolution limit) are properties, computed in one
place. A changed copy is :meth:`Settings.replace` (checked like a parse).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..errors import CsptInputError
from .params import GROUPS, PARAMS, PypParameters, check_cspt_mode, refine_rhref_for

__all__ = ["Settings", "DataParams", "ExtractionParams", "RefinementParams", "ReconstructionParams",
           "ClusterParams"]


def _fields_of(group: str) -> type:
    """A frozen dataclass with one field per key of ``group`` in :data:`PARAMS` (name and type from the spec)."""
    specs = [s for s in PARAMS.values() if s.group == group]
    return dataclasses.make_dataclass(f"_{group.title()}Fields", [(s.name, s.type) for s in specs], frozen=True)


@dataclasses.dataclass(frozen=True)
class DataParams(_fields_of("data")):
    """The data set and its optics (``PARAMS`` group "data")."""

    @property
    def stack_pixel_A(self) -> float:
        """Pixel of ``{name}_stack.mrc`` (Å): ``scope_pixel × data_bin``."""
        return self.scope_pixel * self.data_bin


@dataclasses.dataclass(frozen=True)
class ExtractionParams(_fields_of("extraction")):
    """How particles are boxed (``PARAMS`` group "extraction"): ``extract_box`` in extracted (binned) px."""

    @property
    def box_unbinned_px(self) -> int:
        """Box cut from the tilt stack, in tilt-stack px: ``extract_box × extract_bin``."""
        return self.extract_box * self.extract_bin


@dataclasses.dataclass(frozen=True)
class RefinementParams(_fields_of("refinement")):
    """Refinement (``PARAMS`` group "refinement"); ``refine_rhref`` is pyp's per-iteration colon list."""

    def resolution_A(self, iteration: int) -> float:
        """High-resolution limit (Å) of ``iteration`` (pyp's rule: :func:`model.params.refine_rhref_for`)."""
        return refine_rhref_for({"refine_rhref": self.refine_rhref}, iteration)


@dataclasses.dataclass(frozen=True)
class ReconstructionParams(_fields_of("reconstruction")):
    """Reconstruction (``PARAMS`` group "reconstruction")."""


@dataclasses.dataclass(frozen=True)
class ClusterParams(_fields_of("cluster")):
    """Where the jobs run (``PARAMS`` group "cluster")."""


_GROUP_TYPES = {"data": DataParams, "extraction": ExtractionParams, "refinement": RefinementParams,
                "reconstruction": ReconstructionParams, "cluster": ClusterParams}
assert tuple(_GROUP_TYPES) == GROUPS, "one settings group per PARAMS group"


@dataclasses.dataclass(frozen=True)
class Settings:
    """A project's parameters, validated and immutable (module docstring). ``source`` is the file they came from,
    if any (named in errors); ``extra`` the other pyp keys of the project's config, as read (:meth:`pyp_value`)."""

    data: DataParams
    extraction: ExtractionParams
    refinement: RefinementParams
    reconstruction: ReconstructionParams
    cluster: ClusterParams
    source: str | None = None
    extra: tuple[tuple[str, Any], ...] = ()

    # ---------------------------------------------------------------- the boundary
    @classmethod
    def parse(cls, parameters: Settings | Mapping[str, Any]) -> Settings:
        """``parameters`` as Settings: Settings are returned as they are; :class:`PypParameters` are validated as a
        whole; a plain mapping is parsed by ``PypParameters(..., strict=False)`` (other pyp keys are kept aside
        with a warning, never used). Raises :class:`CsptInputError` naming every bad key."""
        if isinstance(parameters, Settings):
            return parameters
        if isinstance(parameters, PypParameters):
            params = parameters.validate()
        elif isinstance(parameters, Mapping):
            params = PypParameters(parameters, strict=False)
        else:
            raise CsptInputError(f"is a {type(parameters).__name__}", field="parameters",
                                 expected="a dict of pyp keys, PypParameters or Settings")
        return cls._of(params)

    @classmethod
    def _of(cls, params: PypParameters) -> Settings:
        """The settings of validated ``params`` (the one place that reads them by key)."""
        groups = {name: kind(**{f.name: params[f.name] for f in dataclasses.fields(kind)})
                  for name, kind in _GROUP_TYPES.items()}
        return cls(**groups, source=params.source, extra=tuple(params.extra.items()))

    def to_parameters(self) -> PypParameters:
        """The editable (and savable) :class:`PypParameters` of these settings."""
        return PypParameters(self.values(), strict=True, source=self.source)

    def values(self) -> dict[str, Any]:
        """Every key of :data:`PARAMS` and its value, in ``PARAMS`` order."""
        flat = {f.name: getattr(group, f.name) for group in self._groups() for f in dataclasses.fields(group)}
        return {key: flat[key] for key in PARAMS}

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` (pyp keys) applied, checked as a parse is (unknown keys refused)."""
        return Settings._of(PypParameters({**self.values(), **changes}, strict=True, source=self.source))

    def pyp_value(self, key: str, default: Any) -> Any:
        """The value of a pyp key that napari-cspt2d does not own (kept from the project's config as read, e.g.
        ``tomo_rec_thickness``), or ``default``."""
        return dict(self.extra).get(key, default)

    def check_cspt_mode(self) -> Settings:
        """These settings, if they are 2D tilt-series CSPT's (:func:`model.params.check_cspt_mode`); else raises
        "No output parameter file is generated: ..."."""
        check_cspt_mode(self.values(), source=self.source)
        return self

    def _groups(self) -> tuple[Any, ...]:
        return self.data, self.extraction, self.refinement, self.reconstruction, self.cluster

    # ---------------------------------------------------------------- derived values
    @property
    def stack_pixel_A(self) -> float:
        """Pixel of the tilt stack (Å): ``scope_pixel × data_bin``."""
        return self.data.stack_pixel_A

    @property
    def particle_pixel_A(self) -> float:
        """Pixel of the extracted particle images and voxel of the map (Å): ``stack_pixel_A × extract_bin``."""
        return self.stack_pixel_A * self.extraction.extract_bin

    @property
    def box_unbinned_px(self) -> int:
        """Box cut from the tilt stack, in tilt-stack px: ``extract_box × extract_bin``."""
        return self.extraction.box_unbinned_px

    @property
    def shift_range_A(self) -> float:
        """How far refinement may move a projection from its pick (Å): ``refine_shift_range_A``, or when it is 0 a
        quarter of ``particle_rad``."""
        return self.refinement.refine_shift_range_A or 0.25 * self.extraction.particle_rad
