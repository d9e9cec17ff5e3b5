"""The settings object: parsed once at the boundary, typed, immutable, grouped; the only thing below the boundary."""

from __future__ import annotations

import ast
import dataclasses
import pickle
from pathlib import Path

import pytest

from napari_cspt2d import CsptInputError
from napari_cspt2d.model import settings as settings_module
from napari_cspt2d.model.params import GROUPS, PARAMS, ParamSpec, PypParameters
from napari_cspt2d.model.settings import Settings
from napari_cspt2d.recon import arguments

SOURCE = Path(__file__).resolve().parents[1] / "src" / "napari_cspt2d"
#: Code below the boundary: it receives Settings (or kernel arguments) and never reads a parameter by its key.
BELOW_THE_BOUNDARY = ["model", "io", "recon", "cluster.py", "geometry.py", "errors.py"]
#: Where keys are defined and parsed.
PARSERS = {"model/params.py", "model/settings.py"}

SEED = {"scope_pixel": 1.35, "extract_box": 96, "extract_bin": 2, "data_bin": 1, "particle_rad": 100.0,
        "refine_rhref": "12:10:8", "refine_maxiter": 4}


def test_every_parameter_is_a_field_of_its_group():
    s = Settings.parse({})
    for group in GROUPS:
        names = {f.name for f in dataclasses.fields(getattr(s, group))}
        assert names == {k for k, spec in PARAMS.items() if spec.group == group}, group
    assert s.values() == {k: PypParameters({})[k] for k in PARAMS}


def test_adding_a_key_to_params_is_the_one_edit(monkeypatch):
    """A new key in PARAMS becomes a field of its group, with its type: nothing else to change."""
    monkeypatch.setitem(PARAMS, "slurm_example_key", ParamSpec("slurm_example_key", int, 3, "cluster", "Example",
                                                               "A key added by someone else."))
    fields = {f.name: f.type for f in dataclasses.fields(settings_module._fields_of("cluster"))}
    assert fields["slurm_example_key"] is int


def test_values_are_parsed_once_and_immutable():
    s = Settings.parse(SEED)
    assert s.extraction.extract_box == 96 and isinstance(s.data.scope_pixel, float)
    assert Settings.parse(s) is s  # what the boundary parsed is passed down, never parsed again
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.extraction.extract_box = 128  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.data = s.data  # type: ignore[misc]
    back = pickle.loads(pickle.dumps(s))  # the bundle jobs carry it to the workers
    assert back == s


def test_bad_and_unknown_keys_are_refused_at_the_boundary():
    with pytest.raises(CsptInputError, match="extract_box"):
        Settings.parse({**SEED, "extract_box": -3})
    s = Settings.parse(SEED)
    with pytest.raises(CsptInputError, match="did you mean 'refine_maxiter'"):
        s.replace(refine_maxiterr=5)
    with pytest.raises(CsptInputError, match="parameters"):
        Settings.parse(["extract_box", 96])  # type: ignore[arg-type]
    assert s.replace(refine_maxiter=6).refinement.refine_maxiter == 6 and s.refinement.refine_maxiter == 4


def test_derived_values_are_properties():
    s = Settings.parse(SEED)
    assert s.stack_pixel_A == pytest.approx(1.35) and s.particle_pixel_A == pytest.approx(2.7)
    assert s.box_unbinned_px == 192
    assert s.shift_range_A == 25.0  # 0 = a quarter of particle_rad
    assert s.replace(refine_shift_range_A=12.0).shift_range_A == 12.0
    assert [s.refinement.resolution_A(i) for i in (2, 3, 4, 9)] == [12.0, 10.0, 8.0, 8.0]


def test_the_kernels_are_given_values_from_one_mapping():
    s = Settings.parse({**SEED, "reconstruct_dose_weighting_enable": True, "scope_voltage": 200.0})
    imaging = arguments.imaging(s)
    assert (imaging.box, imaging.bin, imaging.voltage_kV, imaging.dose_weighting) == (96, 2, 200.0, True)
    assert imaging.pixel_A == pytest.approx(s.particle_pixel_A)
    options = arguments.reconstruction_options(s)
    assert options["extract_box"] == s.box_unbinned_px and options["pixel_A"] == s.stack_pixel_A
    assert arguments.reconstruction_settings(s).box == s.extraction.extract_box
    assert arguments.refine_options(s, 3).resolution_A == 10.0


def _string_key_reads(path: Path) -> list[str]:
    """``x["key"]`` and ``x.get("key")`` of a parameter key (not a spec lookup ``PARAMS["key"]``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value in PARAMS
                and not (isinstance(node.value, ast.Name) and node.value.id == "PARAMS")):
            found.append(f"{path.name}:{node.lineno} [{node.slice.value!r}]")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in PARAMS):
            found.append(f"{path.name}:{node.lineno} .get({node.args[0].value!r})")
    return found


def test_the_string_key_check_sees_a_read(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('x = params["extract_box"]\ny = params.get("particle_rad")\nz = PARAMS["workers"]\n')
    assert _string_key_reads(probe) == ["probe.py:1 ['extract_box']", "probe.py:2 .get('particle_rad')"]


def test_no_module_below_the_boundary_reads_a_parameter_by_its_key():
    files = [p for part in BELOW_THE_BOUNDARY for p in
             ((SOURCE / part).rglob("*.py") if (SOURCE / part).is_dir() else [SOURCE / part])]
    assert len(files) > 20
    reads = [r for p in files if p.relative_to(SOURCE).as_posix() not in PARSERS for r in _string_key_reads(p)]
    assert not reads


def test_map_filter_strength_reaches_the_reconstruction_and_round_trips(tmp_path):
    """``reconstruct_shell_damping`` (the map's Wiener shell attenuation kept) goes from .pyp_config.toml through the
    settings to the reconstruction's arguments; a typo in its name or a value outside 0..1 is refused."""
    from napari_cspt2d.io.toml import load_params, save_params
    from napari_cspt2d.model.params import PypParameters

    assert arguments.reconstruction_settings(Settings.parse(SEED)).shell_damping == 1.0  # the Wiener map by default
    path = save_params(PypParameters({**SEED, "reconstruct_shell_damping": 0.5}), tmp_path)
    s = Settings.parse(load_params(path))
    assert s.reconstruction.reconstruct_shell_damping == 0.5
    assert arguments.reconstruction_options(s)["shell_damping"] == 0.5
    assert arguments.reconstruction_settings(s).shell_damping == 0.5
    with pytest.raises(CsptInputError, match="did you mean 'reconstruct_shell_damping'"):
        Settings.parse({**SEED, "reconstruct_shell_dampin": 0.5})
    with pytest.raises(CsptInputError, match="reconstruct_shell_damping"):
        Settings.parse({**SEED, "reconstruct_shell_damping": 1.5})
