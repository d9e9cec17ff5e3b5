"""The seed-compatible files: Parameters, create_cistem_from_2d_tracks, {name}.pkl metadata and project layout."""

from __future__ import annotations

import pickle

import mrcfile
import numpy as np
import pytest
from test_cistem import PIXEL, dyadic_tracks

from napari_cspt2d import CsptInputError, TrackSet
from napari_cspt2d.io import cistem
from napari_cspt2d.io.metadata import metadata_shape, read_metadata, read_metadata_tilts, write_metadata
from napari_cspt2d.model.params import check_cspt_mode
from napari_cspt2d.pyp import Parameters, create_cistem_from_2d_tracks, create_project, load_project

SEED_PARAMS = {
    "csp_no_3d_points": True, "data_mode": "tomo", "csp_frame_refinement": True, "data_set": "your_dataset",
    "refine_iter": 2, "refine_maxiter": 5, "extract_box": 256, "extract_bin": 2, "scope_pixel": 1.35,
    "particle_rad": 100, "csp_RefineProjectionCutoff": 0.5, "csp_UseImagesForRefinementMin": -60,
    "csp_UseImagesForRefinementMax": 60,
}
EXACT_PARAMS = {**SEED_PARAMS, "scope_pixel": PIXEL, "extract_bin": 1}


def seed_track_data(n_particles=10, n_tilts=13, seed=0):
    """The seed's example ``create_example_track_data``."""
    rng = np.random.default_rng(seed)
    return {
        "particles": {i: {"x_3d": 0.0, "y_3d": 0.0, "z_3d": 0.0} for i in range(1, n_particles + 1)},
        "tilts": {i: {"angle": -60 + i * 10, "defocus": 2.5} for i in range(n_tilts)},
        "projections": [{"pind": p, "tind": t, "shift_x": float(rng.normal(0, 5)), "shift_y": float(rng.normal(0, 5)),
                         "score": 0.8, "occupancy": 1.0} for p in range(1, n_particles + 1) for t in range(n_tilts)],
    }


# ------------------------------------------------------------------------------------------------ Parameters
def test_seed_workflow_and_validation_snippet(tmp_path):
    track_data = seed_track_data()
    params = {**SEED_PARAMS, "tomo_vir_rad": 0.0}  # a pyp parameter dict carries keys we do not use: kept silently
    cistem_file, extended_file = create_cistem_from_2d_tracks("ts001", track_data, params,
                                                              tmp_path / "frealign" / "maps")
    assert cistem_file == str(tmp_path / "frealign" / "maps" / "ts001_r01.cistem")
    assert extended_file == str(tmp_path / "frealign" / "maps" / "ts001_r01_extended.cistem")
    par = Parameters.from_file(cistem_file)
    projections = track_data["projections"]
    assert len(par.data) == len(projections)
    assert set(par.data[:, 0]) == set(track_data["particles"])
    assert set(par.data[:, 1]) == set(track_data["tilts"])
    rows = {(int(p), int(t)): i for i, (p, t) in enumerate(par.data[:, :2])}
    order = [rows[(p["pind"], p["tind"])] for p in projections]
    np.testing.assert_allclose(par.data[order, 3], [p["shift_x"] for p in projections], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(par.data[order, 4], [p["shift_y"] for p in projections], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(par.column("X_SHIFT"), par.data[:, 3] * 1.35, rtol=1e-6)  # Å in the file
    assert par.get_num_tilts() == 13 and par.get_num_frames() == 1
    with pytest.raises(ValueError):
        par.data[0, 0] = 5


def test_track_data_to_files_and_back_is_exact(tmp_path):
    """The seed's dict without an image size: the whole shift in X/Y_SHIFT, back exactly; with one, pyp's box
    positions (tests/test_pyp_cistem_rules.py), back within the float32 rounding of the file."""
    tracks = dyadic_tracks(7, 9, xyz=True)
    track_data = tracks.replace(image_shape_yx=None).to_track_data()
    main, _ = create_cistem_from_2d_tracks("ts", track_data, EXACT_PARAMS, tmp_path)
    par = Parameters.from_file(main)
    back = par.to_trackset(None, tilts=tracks.tilts)
    assert back.equals(tracks.replace(image_shape_yx=None))
    assert back.to_track_data() == track_data
    np.testing.assert_array_equal(par.data[:, 3:5], tracks.shift_px)
    main, _ = create_cistem_from_2d_tracks("ts", tracks.to_track_data(), EXACT_PARAMS, tmp_path)
    back = Parameters.from_file(main).to_trackset(tracks.image_shape_yx, tilts=tracks.tilts)
    np.testing.assert_allclose(back.positions_px(), tracks.positions_px(), atol=1e-4)
    np.testing.assert_allclose(back.particles.xyz_px, tracks.particles.xyz_px, atol=1e-4)


def test_parameters_write_and_missing_extended(tmp_path):
    par = Parameters.from_trackset(dyadic_tracks(3, 4), EXACT_PARAMS)
    main, ext = par.write(tmp_path / "p.cistem")
    assert ext.name == "p_extended.cistem"
    ext.unlink()
    alone = Parameters.from_file(main)
    assert alone.extended is None and alone.get_num_tilts() == 4 and len(alone) == 12
    with pytest.raises(CsptInputError, match="_extended") as err:
        alone.to_trackset((64, 64))
    assert err.value.file == str(main)
    with pytest.raises(CsptInputError, match="does not exist"):
        Parameters.from_file(main, tmp_path / "other_extended.cistem")


def test_unknown_tilt_in_files_names_the_file(tmp_path):
    tracks = dyadic_tracks(3, 4)
    main, ext = Parameters.from_trackset(tracks, EXACT_PARAMS).write(tmp_path / "u.cistem")
    particles, tilts = cistem.read_extended(ext)
    cistem.write_extended(ext, particles, cistem.CistemTable.from_columns(
        {n: (tilts[n] + 50 if n == "TIND" else tilts[n]) for n in tilts.names}))
    with pytest.raises(CsptInputError, match="tilts block") as err:
        Parameters.from_file(main)
    assert err.value.file == str(main) and err.value.field == "TIND"


# ------------------------------------------------------------------------------------------------ metadata
def test_metadata_round_trip(tmp_path):
    """Written in pyp's layout (DataFrames; see tests/test_pyp_metadata.py for pyp's rules), read back whole."""
    tracks = dyadic_tracks(2, 5)
    path = write_metadata(tmp_path / "ts.pkl", 640, 512, 5, frames=["a.tif", "b.tif"], extra={"note": "x"},
                          tilts=tracks.tilts)
    data = read_metadata(path)
    assert data["image"].to_dict("records") == [{"x": 640, "y": 512, "z": 5}] and data["frames"] == ["a.tif", "b.tif"]
    assert metadata_shape(data) == (512, 640, 5) and data["note"] == "x"
    tilts = read_metadata_tilts(path)
    for attr in ("id", "angle_deg", "defocus_um", "axis_deg", "dose", "order"):
        np.testing.assert_array_equal(getattr(tilts, attr), getattr(tracks.tilts, attr))


@pytest.mark.parametrize("content, missing", [
    (None, "does not exist"), ({"frames": []}, "'tomo'"), ({"tomo": {"x": [10], "y": [10]}}, "'z'"),
    ({"tomo": {"x": [], "y": [0], "z": [3]}}, "'x', 'y'"), ([1, 2], "list"),
])
def test_metadata_is_required(tmp_path, content, missing):
    path = tmp_path / "ts.pkl"
    if content is not None:
        path.write_bytes(pickle.dumps(content))
    with pytest.raises(CsptInputError) as err:
        read_metadata(path)
    assert str(err.value).startswith("Metadata is required") and missing in str(err.value)
    assert str(path) in str(err.value) and err.value.file == str(path)


def test_metadata_refuses_code_and_bad_values(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    with pytest.raises(CsptInputError, match="os.system"):
        read_metadata(path)
    with pytest.raises(CsptInputError) as err:
        write_metadata(tmp_path / "m.pkl", 0, 10, 3)
    assert err.value.field == "width"
    with pytest.raises(CsptInputError, match="replace"):
        write_metadata(tmp_path / "m.pkl", 10, 10, 3, extra={"tomo": 1})
    with pytest.raises(CsptInputError, match="plain"):
        write_metadata(tmp_path / "m.pkl", 10, 10, 3, extra={"obj": object()})
    write_metadata(tmp_path / "m.pkl", 10, 10, 3)
    with pytest.raises(CsptInputError, match="tilt angles"):
        read_metadata_tilts(tmp_path / "m.pkl")


# ------------------------------------------------------------------------------------------------ project
def _stack(tracks: TrackSet, n_sections: int) -> np.ndarray:
    ny, nx = tracks.image_shape_yx
    return np.random.default_rng(1).normal(size=(n_sections, ny, nx)).astype(np.float32)


def test_create_and_load_project_from_array(tmp_path):
    tracks = dyadic_tracks(4, 6, shape=(48, 64))
    stack = _stack(tracks, 6)
    paths = create_project(tmp_path / "proj", "ts1", stack, tracks.to_track_data(), EXACT_PARAMS)
    root = tmp_path / "proj"
    for rel in (".pyp_config.toml", "ts1.pkl", "ts1_stack.mrc", "frealign/maps/ts1_r01.cistem",
                "frealign/maps/ts1_r01_extended.cistem", "frealign/scratch", "log"):
        assert (root / rel).exists(), rel
    assert paths["stack"] == root / "ts1_stack.mrc"
    with mrcfile.open(paths["stack"]) as mrc:
        np.testing.assert_array_equal(mrc.data, stack)
        assert mrc.voxel_size.x == pytest.approx(PIXEL)
    params, back, metadata = load_project(root, "ts1")
    check_cspt_mode(params)
    assert params["data_set"] == "your_dataset" and metadata_shape(metadata) == (48, 64, 6)
    assert back.equals(tracks.replace(image_shape_yx=(48, 64))) and back.image_shape_yx == (48, 64)


@pytest.mark.parametrize("link", [True, False])
def test_project_from_stack_file(tmp_path, link):
    tracks = dyadic_tracks(3, 4, shape=(32, 40))
    source = tmp_path / "raw.mrc"
    with mrcfile.new(source) as mrc:
        mrc.set_data(_stack(tracks, 5))
        mrc.voxel_size = PIXEL
    paths = create_project(tmp_path / "p", "ts", source, tracks, {**EXACT_PARAMS, "data_set": ""}, link=link)
    assert paths["stack"].is_symlink() == link
    with mrcfile.open(paths["stack"]) as a, mrcfile.open(source) as b:
        np.testing.assert_array_equal(a.data, b.data)
    params, back, _ = load_project(tmp_path / "p", "ts")
    assert params["data_set"] == "ts" and back.equals(tracks)


def test_angles_record_tilts_without_picks(tmp_path):
    tracks = dyadic_tracks(2, 3, shape=(16, 16))
    angles = np.r_[tracks.tilts.angle_deg, 65.0, -65.0]
    create_project(tmp_path, "ts", _stack(tracks, 5), tracks, EXACT_PARAMS, angles)
    tilts = read_metadata_tilts(tmp_path / "ts.pkl")
    assert tilts.id.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(tilts.defocus_um[:3], tracks.tilts.defocus_um)
    _, back, _ = load_project(tmp_path, "ts")
    assert len(back.tilts) == 5 and len(back) == len(tracks)
    with pytest.raises(CsptInputError, match="disagree"):
        create_project(tmp_path / "q", "ts", _stack(tracks, 5), tracks, EXACT_PARAMS, angles + 1.0)


@pytest.mark.parametrize("name, params", [
    ("../escape", EXACT_PARAMS), ("a/b", EXACT_PARAMS), ("ok", {**EXACT_PARAMS, "data_set": "../../x"}),
    ("ok\0", EXACT_PARAMS),
])
def test_names_cannot_escape_the_project(tmp_path, name, params):
    tracks = dyadic_tracks(2, 3, shape=(16, 16))
    with pytest.raises(CsptInputError):
        create_project(tmp_path / "proj", name, _stack(tracks, 3), tracks, params)
    assert not (tmp_path / "escape_stack.mrc").exists() and not list(tmp_path.glob("**/*.mrc"))
    with pytest.raises(CsptInputError):
        load_project(tmp_path, name if name != "ok" else "../ok")


def test_project_input_errors(tmp_path):
    tracks = dyadic_tracks(2, 4, shape=(16, 16))
    with pytest.raises(CsptInputError, match="sections"):
        create_project(tmp_path / "a", "ts", _stack(tracks, 3), tracks, EXACT_PARAMS)
    with pytest.raises(CsptInputError, match="scope_pixle"):
        create_project(tmp_path / "b", "ts", _stack(tracks, 4), tracks, {**EXACT_PARAMS, "scope_pixle": 1.0})
    with pytest.raises(CsptInputError, match="stack"):
        create_project(tmp_path / "c", "ts", np.zeros((4, 16)), tracks, EXACT_PARAMS)
    paths = create_project(tmp_path / "d", "ts", _stack(tracks, 4), tracks, EXACT_PARAMS)
    paths["metadata"].unlink()
    with pytest.raises(CsptInputError, match="^Metadata is required"):
        load_project(tmp_path / "d", "ts")
