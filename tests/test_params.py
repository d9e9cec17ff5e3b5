"""PypParameters: the parameter table, validation, pyp colon lists and .pyp_config.toml."""

from __future__ import annotations

import warnings

import pytest

from napari_cspt2d import CsptInputError
from napari_cspt2d.errors import CsptInputWarning
from napari_cspt2d.io.toml import load_params, save_params
from napari_cspt2d.model.params import (
    GROUPS, PARAMS, PypParameters, check_cspt_mode, check_name, param_for_iteration, refine_rhref_for,
)

SEED = {  # the seed's .pyp_config.toml
    "csp_no_3d_points": True, "data_mode": "tomo", "csp_frame_refinement": True, "data_set": "your_dataset",
    "refine_iter": 2, "refine_maxiter": 5, "extract_box": 256, "extract_bin": 2, "scope_pixel": 1.35,
    "particle_rad": 100, "csp_RefineProjectionCutoff": 0.5, "csp_UseImagesForRefinementMin": -60,
    "csp_UseImagesForRefinementMax": 60, "slurm_bundle_size": 1,
}


def test_table_documents_every_key():
    for name, spec in PARAMS.items():
        assert spec.name == name and spec.group in GROUPS and spec.label and spec.help
        assert isinstance(spec.default, spec.type)
    assert {s.group for s in PARAMS.values()} == set(GROUPS)
    params = PypParameters()
    assert set(params) == set(PARAMS) and all(params[k] == s.default for k, s in PARAMS.items())


def test_seed_configuration_is_accepted_and_typed():
    params = PypParameters(SEED)
    assert params["particle_rad"] == 100.0 and isinstance(params["particle_rad"], float)
    assert params["extract_bin"] == 2 and params["csp_UseImagesForRefinementMin"] == -60
    assert params.particle_pixel_A == pytest.approx(2.7) and params.box_unbinned_px == 512
    check_cspt_mode(params)


@pytest.mark.parametrize("key, value", [
    ("extract_box", "abc"), ("extract_box", 2.5), ("extract_box", True), ("csp_no_3d_points", 1.0),
    ("scope_pixel", 0.0), ("scope_pixel", float("nan")), ("extract_bin", 0), ("scope_wgh", 1.5),
    ("data_mode", "movie"), ("refine_rhref", "8:x"), ("refine_rhref", "8:-1"), ("slurm_walltime", "one day"),
    ("workers", -1), ("cluster_address", "has space:1"), ("data_set", "../evil"), ("particle_sym", "C0"),
    ("refine_iter", 1), ("csp_UseImagesForRefinementMax", 2.5),
])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(CsptInputError) as err:
        PypParameters({key: value})
    assert err.value.field == key
    params = PypParameters()
    with pytest.raises(CsptInputError):
        params[key] = value


def test_values_are_coerced():
    params = PypParameters({"csp_no_3d_points": "true", "extract_box": 160.0, "refine_rhref": 8,
                            "scope_voltage": "200", "data_mode": "TOMO"})
    assert params["csp_no_3d_points"] is True and params["extract_box"] == 160
    assert params["refine_rhref"] == "8" and params["scope_voltage"] == 200.0 and params["data_mode"] == "tomo"


def test_unknown_keys_suggest_the_closest_name():
    with pytest.raises(CsptInputError, match="did you mean 'scope_pixel'") as err:
        PypParameters({"scope_pixle": 1.0})
    assert err.value.field == "scope_pixle"
    params = PypParameters()
    with pytest.raises(CsptInputError, match="extract_box"):
        params["extract_bx"] = 3
    with pytest.raises(KeyError, match="refine_maxiter"):
        params["refine_maxiterr"]
    with pytest.warns(CsptInputWarning, match="kept as is"):
        lenient = PypParameters({"tomo_vir_rad": 150.0, "scope_pixel": 2.0}, strict=False)
    assert lenient["tomo_vir_rad"] == 150.0 and lenient.extra == {"tomo_vir_rad": 150.0}


@pytest.mark.parametrize("changes, field", [
    ({"extract_box": 64, "particle_rad": 100.0, "scope_pixel": 1.35, "extract_bin": 1}, "extract_box"),
    ({"refine_iter": 4, "refine_maxiter": 3}, "refine_maxiter"),
    ({"reconstruct_mintilt": 30.0, "reconstruct_maxtilt": -30.0}, "reconstruct_mintilt"),
    ({"refine_rhref": "8:200", "refine_rlref": 100.0}, "refine_rhref"),
    ({"cluster_backend": "address"}, "cluster_address"),
])
def test_inconsistent_parameters(changes, field):
    with pytest.raises(CsptInputError, match="inconsistent") as err:
        PypParameters(changes)
    assert field in err.value.field


def test_box_check_uses_the_extracted_pixel():
    # 200 Å diameter = 74.1 px at 2.7 Å/px (fits 80) but 148.1 px at 1.35 Å/px (does not)
    PypParameters({"extract_box": 80, "particle_rad": 100.0, "scope_pixel": 1.35, "extract_bin": 2})
    with pytest.raises(CsptInputError, match="148.1 px"):
        PypParameters({"extract_box": 80, "particle_rad": 100.0, "scope_pixel": 1.35, "extract_bin": 1})


def test_rhref_beyond_nyquist_warns():
    with pytest.warns(CsptInputWarning, match="Nyquist"):
        PypParameters({"refine_rhref": "10:2", "scope_pixel": 1.35, "extract_bin": 1})


def test_check_cspt_mode_lists_every_failed_condition():
    with pytest.raises(CsptInputError) as err:
        check_cspt_mode({"csp_no_3d_points": False, "data_mode": "spr", "csp_frame_refinement": False})
    message = str(err.value)
    assert message.startswith("No output parameter file is generated")
    assert "csp_no_3d_points" in message and "data_mode" in message and "csp_frame_refinement" in message
    with pytest.raises(CsptInputError) as err:
        check_cspt_mode({**SEED, "data_mode": "spr"})
    assert "data_mode" in str(err.value) and "csp_no_3d_points is" not in str(err.value)
    check_cspt_mode({"csp_no_3d_points": True, "data_mode": "Tomo_new", "csp_frame_refinement": True})


@pytest.mark.parametrize("iteration, expected", [(1, 8.0), (2, 8.0), (3, 7.0), (4, 6.0), (9, 6.0)])
def test_rhref_per_iteration(iteration, expected):
    assert refine_rhref_for({"refine_rhref": "8:7:6"}, iteration) == expected


def test_per_iteration_errors():
    assert refine_rhref_for(PypParameters(), 5) == float(PARAMS["refine_rhref"].default)
    assert param_for_iteration({"reconstruct_cutoff": "0:0.5"}, "reconstruct_cutoff", 3) == "0.5"
    with pytest.raises(CsptInputError):
        refine_rhref_for({"refine_rhref": "8"}, 0)
    with pytest.raises(CsptInputError):
        refine_rhref_for({"refine_rhref": "8:abc"}, 3)
    with pytest.raises(CsptInputError):
        param_for_iteration({}, "refine_rhref", 2)


def test_mapping_behaviour():
    params = PypParameters(SEED)
    params["extract_box"] = 300
    del params["extract_box"]
    assert params["extract_box"] == PARAMS["extract_box"].default
    assert len(params) == len(PARAMS) and params.copy().to_dict() == params.to_dict()


@pytest.mark.parametrize("name", ["../x", "a/b", "", "a\0b", ".hidden", "a b", "x/../../y", "a\\b", 3])
def test_unsafe_names(name):
    with pytest.raises(CsptInputError):
        check_name(name, "name")


def test_toml_round_trip(tmp_path):
    params = PypParameters({**SEED, "refine_rhref": "8:7:6", "slurm_job_extra": "--gres=gpu:1"})
    path = save_params(params, tmp_path)
    assert path == tmp_path / ".pyp_config.toml" and not list(tmp_path.glob(".*part"))
    assert load_params(tmp_path).to_dict() == params.to_dict()
    assert load_params(path)["scope_pixel"] == 1.35


def test_toml_keeps_other_pyp_keys_when_lenient(tmp_path):
    path = tmp_path / ".pyp_config.toml"
    path.write_text('scope_pixel = 2.0\ntomo_vir_rad = 150.0\nslurm_queue = "cpu"\n')
    with pytest.raises(CsptInputError, match="tomo_vir_rad") as err:
        load_params(path)
    assert err.value.file == str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CsptInputWarning)
        params = load_params(path, strict=False)
    save_params(params, path)
    text = path.read_text()
    assert 'slurm_queue = "cpu"' in text and "tomo_vir_rad = 150.0" in text


def test_toml_errors(tmp_path):
    with pytest.raises(CsptInputError, match="does not exist"):
        load_params(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("scope_pixel = = 1\n")
    with pytest.raises(CsptInputError, match="TOML") as err:
        load_params(bad)
    assert err.value.file == str(bad)
    bad.write_text("scope_pixel = -1.0\n")
    with pytest.raises(CsptInputError) as err:
        load_params(bad)
    assert err.value.field == "scope_pixel" and err.value.file == str(bad)
