"""PypParameters: the parameter table, validation, pyp colon lists and .pyp_config.toml."""

from __future__ import annotations

import warnings

import pytest

from napari_cspt2d import CsptInputError
from napari_cspt2d.errors import CsptInputWarning
from napari_cspt2d.io.toml import load_params, save_params
from napari_cspt2d.model import params as params_module
from napari_cspt2d.model.params import (
    GROUPS, PARAMS, PypParameters, check_cspt_mode, check_name, interpretations, min_projections,
    param_for_iteration, pyp_key_names, refine_rhref_for,
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
    with warnings.catch_warnings():
        warnings.simplefilter("error", CsptInputWarning)  # another key of pyp's spec is kept silently
        lenient = PypParameters({"tomo_vir_rad": 150.0, "scope_pixel": 2.0}, strict=False)
    assert lenient["tomo_vir_rad"] == 150.0 and lenient.extra == {"tomo_vir_rad": 150.0}


@pytest.fixture
def fresh_notices(monkeypatch):
    """Forget which notices this process has given (each is said once per process)."""
    monkeypatch.setattr(params_module, "_SAID", set())


def test_looking_up_a_key_costs_no_typo_suggestion(monkeypatch):
    """``get`` and ``in`` of a known or missing key never run difflib (~ms per call on the cockpit's GUI thread when
    ``create_project`` asks for ``tomo_rec_thickness``); only a typo's KeyError does."""
    asked: list[str] = []
    real = params_module.get_close_matches
    monkeypatch.setattr(params_module, "get_close_matches",
                        lambda key, *a, **k: asked.append(key) or real(key, *a, **k))
    params = PypParameters({"tomo_vir_rad": 150.0}, strict=False)
    asked.clear()
    assert params.get("tomo_rec_thickness", 2048) == 2048 and params.get("tomo_vir_rad") == 150.0
    assert params.get("extract_box") == PARAMS["extract_box"].default
    assert "tomo_rec_thickness" not in params and "extract_box" in params and "tomo_vir_rad" in params
    assert params["extract_box"] == PARAMS["extract_box"].default
    assert asked == []
    with pytest.raises(KeyError, match="did you mean 'extract_box'"):
        params["extract_bx"]
    assert asked == ["extract_bx"]


@pytest.mark.parametrize("typo, meant", [("extract_bxo", "extract_box"), ("slurm_queu", "slurm_queue"),
                                         ("csp_RefineProjectionCutof", "csp_RefineProjectionCutoff"),
                                         ("reconstruct_minscor", "reconstruct_minscore")])
def test_a_typo_stops_even_when_other_keys_are_allowed(typo, meant, fresh_notices):
    with pytest.raises(CsptInputError, match=f"did you mean '{meant}'") as err:
        PypParameters({typo: 64}, strict=False)
    assert err.value.field == typo
    with pytest.warns(CsptInputWarning, match="kept as is"):
        allowed = PypParameters({typo: 64}, strict=False, allow_unknown=True)
    assert allowed.extra == {typo: 64} and allowed.copy().extra == {typo: 64}


def test_keys_far_from_every_known_one_are_kept_with_one_notice(fresh_notices):
    with pytest.warns(CsptInputWarning, match="neither napari-cspt2d's nor pyp's"):
        PypParameters({"my_lab_note": "grid 3"}, strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CsptInputWarning)
        assert PypParameters({"my_lab_note": "grid 3"}, strict=False).extra == {"my_lab_note": "grid 3"}


def test_pyp_key_list_holds_pyp_names_only():
    names = pyp_key_names()
    assert len(names) > 1000 and {"slurm_queue", "slurm_tasks", "csp_RefineProjectionCutoff", "extract_box"} <= names
    assert "cluster_backend" not in names and "workers" not in names
    own = {k for k, spec in PARAMS.items() if not spec.pyp}
    assert own.isdisjoint(names), own & names
    assert {k for k, spec in PARAMS.items() if spec.pyp} - names == {"csp_no_3d_points"}  # the seed's own mode key


@pytest.mark.parametrize("old, new, value",
                         [("slurm_partition", "slurm_queue", "cpu"), ("slurm_cores", "slurm_tasks", 4)])
def test_old_names_are_read_as_pyps_with_one_notice(old, new, value, tmp_path, fresh_notices):
    (tmp_path / ".pyp_config.toml").write_text(f"{old} = {value!r}\n".replace("'", '"'))
    with pytest.warns(CsptInputWarning, match=f"now called '{new}'"):
        params = load_params(tmp_path, strict=False)
    assert params[new] == value and old not in params.to_dict() and not params.extra
    with warnings.catch_warnings():
        warnings.simplefilter("error", CsptInputWarning)
        assert params[old] == value  # said once
    save_params(params, tmp_path)
    assert f"{new} = " in (tmp_path / ".pyp_config.toml").read_text()


def test_projection_cutoff_has_pyps_meaning_and_takes_the_seeds_fraction(fresh_notices):
    assert PypParameters({"csp_RefineProjectionCutoff": 5})["csp_RefineProjectionCutoff"] == 5
    with pytest.warns(CsptInputWarning, match="taken as a fraction") as said:
        seed = PypParameters(SEED)
    assert seed["csp_RefineProjectionCutoff"] == 0.5
    assert any("tilt angles in degrees" in str(w.message) for w in said)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CsptInputWarning)
        PypParameters(SEED)  # each meaning is said once
    for bad in (1.5, -1, "many"):
        with pytest.raises(CsptInputError, match="fraction between 0 and 1"):
            PypParameters({"csp_RefineProjectionCutoff": bad})
    assert [min_projections(c, 41) for c in (0, 0.5, 0.25, 1, 30)] == [0, 21, 11, 1, 30]
    assert interpretations({"csp_RefineProjectionCutoff": 3, "csp_UseImagesForRefinementMin": 0}) == []


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
    path.write_text('scope_pixel = 2.0\ntomo_vir_rad = 150.0\nslurm_merge_queue = "cpu"\n')
    with pytest.raises(CsptInputError, match="tomo_vir_rad") as err:
        load_params(path)
    assert err.value.file == str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CsptInputWarning)
        params = load_params(path, strict=False)
    save_params(params, path)
    text = path.read_text()
    assert 'slurm_merge_queue = "cpu"' in text and "tomo_vir_rad = 150.0" in text


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
