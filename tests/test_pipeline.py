"""The CSPT pipeline and its pyp façade: per-particle split, Option A/B, dask vs serial, several tilt series, bad
input, resume."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_cspt2d import pyp
from napari_cspt2d.errors import CsptInputError, CsptRunError
from napari_cspt2d.io.mrc import open_stack, read_image, write_map
from napari_cspt2d.model.settings import Settings
from napari_cspt2d.recon import csp_run, executor, fsc, pipeline, refine
from napari_cspt2d.recon.arguments import reconstruction_options
from napari_cspt2d.recon.project import tilt_series_names
from napari_cspt2d.recon.reconstruct import HalfMapInsertion, ReconstructionSettings, half_split, reconstruct_tracks
from napari_cspt2d.sample import make_sample, write_sample

SETTINGS = {"refine_maxiter": 4, "refine_rhref": "12:10:9", "slurm_bundle_size": 4, "refine_shift_range_A": 0.0}


@pytest.fixture(scope="module")
def template(tmp_path_factory, small_sample):
    """The small sample written as a pyp project (12 particles × 21 tilts, box 48), with the test settings."""
    root = tmp_path_factory.mktemp("template")
    write_sample(small_sample, root, name="sample")
    params = pyp.load_parameters(root)
    params.update(SETTINGS)
    pyp.save_parameters(params, root)
    return root


@pytest.fixture
def project(tmp_path, template):
    """A fresh copy of the template project (the stack is a copy too, so each test owns its files)."""
    root = tmp_path / "project"
    shutil.copytree(template, root, symlinks=False)
    return root


def truth_error_px(tracks, sample):
    return float(np.sqrt(np.mean(np.sum((tracks.positions_px() - sample.truth_tracks.positions_px()) ** 2, 1))))


def read_tracks(path, sample):
    return pyp.Parameters.from_file(path).to_trackset(sample.tracks.image_shape_yx, tilts=sample.tracks.tilts)


def assert_same_map(a, b):
    """Equal up to float rounding (the pipeline adds grids filled in parts, in another order)."""
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def reconstruct_iteration(root, name, iteration):
    """The single-process reconstruction of a tilt series' parameters after ``iteration`` (iteration 1: the input
    tracks with the 3D points the run fits for their heights, ``csp_run.prepare``)."""
    params, tracks, _ = pyp.load_project(root, name, iteration)
    if iteration == 1:
        picks = {name: tracks}
        csp_run.prepare(picks, {}, Settings.parse(params), {})
        tracks = picks[name]
    options = reconstruction_options(Settings.parse(params))
    return reconstruct_tracks(open_stack(root / f"{name}_stack.mrc")[0], tracks, **options)


# ------------------------------------------------------------------------------------------------ split
def test_sort_particles_regions():
    assert pyp.sort_particles_regions([[3, 1, 2, 3], [1, 0, 0, 0], [2, 9, 9, 9]], None, None,
                                      per_particle=True) == [[3], [1], [2]]
    assert pyp.sort_particles_regions([5, 6], per_particle=True) == [[5], [6]]
    rows = [["1", "1", "1", "1"], ["2", "6", "1", "1"], ["3", "7", "2", "1"], ["4", "50", "50", "50"]]
    corners = [[0, 0, 0], [5, 0, 0]]
    assert pyp.sort_particles_regions(rows, corners, [5, 5, 5]) == [[1], [4], [2, 3]]
    with pytest.raises(CsptInputError, match="corners_squares"):
        pyp.sort_particles_regions(rows, None, None)


def test_prepare_particle_cspt_writes_one_region_per_particle(project, small_sample, monkeypatch):
    monkeypatch.chdir(project)
    params = pyp.load_parameters()
    parameter_file = "frealign/maps/sample_r01.cistem"
    split = pyp.prepare_particle_cspt("sample", parameter_file, pyp.Parameters.from_file(parameter_file), params,
                                      grids=[1, 1, 1], use_frames=True)
    assert [ids.tolist() for _, ids, _ in split] == [[i] for i in small_sample.tracks.particles.id]
    path, ids, tilts = split[3]
    assert Path(path).parent == project / "frealign" / "scratch" and Path(path).name == "sample_r01_region0003.cistem"
    region = pyp.Parameters.from_file(path)
    assert set(region.data[:, 0]) == {ids[0]} and np.array_equal(np.unique(region.data[:, 1]), tilts)
    expected = small_sample.tracks.select(small_sample.tracks.particle == ids[0])
    back = region.to_trackset(expected.image_shape_yx, tilts=expected.tilts, parameters=params)
    np.testing.assert_allclose(back.shift_px, expected.shift_px, atol=1e-3)

    os.remove("sample.pkl")
    with pytest.raises(CsptInputError, match="Metadata is required"):
        pyp.prepare_particle_cspt("sample", parameter_file, pyp.Parameters.from_file(parameter_file), params)


def test_prepare_refuses_parameters_outside_2d_cspt_mode(project, monkeypatch):
    monkeypatch.chdir(project)
    params = pyp.load_parameters()
    params["csp_no_3d_points"] = False
    parameter_file = "frealign/maps/sample_r01.cistem"
    with pytest.raises(CsptInputError, match="No output parameter file is generated"):
        pyp.prepare_particle_cspt("sample", parameter_file, pyp.Parameters.from_file(parameter_file), params)


# ------------------------------------------------------------------------------------------------ Option A
@pytest.fixture(scope="module")
def option_a(tmp_path_factory, template):
    """The seed's Option A run from the project folder: ``csp_split(parameters, iteration=2)`` (in-process jobs)."""
    root = tmp_path_factory.mktemp("option_a") / "project"
    shutil.copytree(template, root)
    cwd = Path.cwd()
    os.chdir(root)
    try:
        outputs = pyp.csp_split(pyp.load_parameters(), iteration=2, serial=True)
    finally:
        os.chdir(cwd)
    return root, outputs


@pytest.mark.slow
def test_option_a_runs_from_the_project_folder(option_a, small_sample):
    root, out = option_a
    maps = root / "frealign" / "maps"
    assert Path(out["map"]).parent == maps and len(out["iterations"]) >= 2
    for name in ("sample_r01_01.mrc", "sample_r01_02.mrc", "sample_r01_02_half1.mrc", "sample_r01_02_fsc.csv",
                 "sample_r01_02.cistem", "sample_r01_02_extended.cistem"):
        assert (maps / name).is_file(), name
    regions = sorted((root / "frealign" / "scratch").glob("sample_r01_region*[0-9].cistem"))  # written by the jobs
    ids = np.sort(small_sample.tracks.particles.id)
    assert [p.name for p in regions] == [f"sample_r01_region{k:04d}.cistem" for k in range(ids.size)]
    for k in (0, ids.size // 2, ids.size - 1):  # numbered as prepare_particle_cspt numbers the whole split
        assert set(pyp.Parameters.from_file(regions[k]).data[:, 0]) == {ids[k]}
    assert (root / "log" / "sample_csp.log").is_file() and list((root / "log").glob("sample_r01_02_bundle*.log"))
    par = pyp.Parameters.from_file(maps / "sample_r01_02.cistem")  # the seed's validation
    assert set(par.data[:, 0]) == set(small_sample.tracks.particles.id)
    assert set(par.data[:, 1]) == set(small_sample.tracks.tilts.id)
    before = truth_error_px(small_sample.tracks, small_sample)
    after = truth_error_px(read_tracks(out["parameters"][0], small_sample), small_sample)
    assert after < 0.5 * before
    assert np.all(np.isfinite(par.data[:, 5])) and np.median(par.data[:, 5]) > 0.1


@pytest.mark.slow
def test_maps_built_in_parts_equal_the_single_process_reconstruction(option_a):
    root, out = option_a
    for it in (1, out["iterations"][-1]["iteration"]):
        expected = reconstruct_iteration(root, "sample", it)
        assert_same_map(read_image(root / "frealign" / "maps" / f"sample_r01_{it:02d}.mrc"), expected.map)
    assert out["iterations"][-1]["projections"] == expected.stats["n_used"]


@pytest.mark.slow
def test_fsc_against_truth_improves_monotonically(option_a, small_sample):
    root, out = option_a
    iterations = [1] + [it["iteration"] for it in out["iterations"]]
    mean_fsc = []
    for it in iterations:
        curve = fsc.fsc_curve(read_image(root / "frealign" / "maps" / f"sample_r01_{it:02d}.mrc"),
                              small_sample.truth_map, small_sample.pixel_A)
        mean_fsc.append(float(curve.fsc[1:].mean()))
    assert mean_fsc[-1] > mean_fsc[0] + 0.02, mean_fsc
    assert np.all(np.diff(mean_fsc) >= -0.002), mean_fsc


@pytest.mark.slow
def test_option_b_prepares_and_reconstructs(project, monkeypatch):
    if not hasattr(pyp, "run_reconstruction"):
        pytest.skip("pyp.run_reconstruction is not in the façade yet")
    monkeypatch.chdir(project)
    name, params = "sample", pyp.load_parameters()
    parameter_file = f"frealign/maps/{name}_r01.cistem"
    alignment_parameters = pyp.Parameters.from_file(parameter_file)
    split_parx_list = pyp.prepare_particle_cspt(name=name, parameter_file=parameter_file,
                                                alignment_parameters=alignment_parameters, parameters=params,
                                                grids=[1, 1, 1], use_frames=True)
    assert len(split_parx_list) == 12
    pyp.run_reconstruction(name=name, mp=params, merged_recon_dir="merged_recon", output_folder="../output",
                           save_stacks=False, ref=1, iteration=2)
    assert Path(f"frealign/maps/{name}_r01_02.mrc").is_file()


# ------------------------------------------------------------------------------------------------ dask
@pytest.mark.slow
def test_local_cluster_gives_the_same_parameters_as_one_process(tmp_path, template, small_sample):
    runs = {}
    for mode in ("serial", "dask"):
        root = tmp_path / mode
        shutil.copytree(template, root)
        params = pyp.load_parameters(root)
        params["refine_maxiter"] = 2
        out = pyp.csp_split(params, iteration=2, project_dir=root, serial=mode == "serial", workers=2)
        runs[mode] = read_tracks(out["parameters"][0], small_sample)
        assert Path(out["parameters"][0]).name == "sample_r01_02.cistem"
    a, b = runs["serial"], runs["dask"]
    np.testing.assert_allclose(b.shift_px, a.shift_px, atol=1e-3)
    np.testing.assert_allclose(b.score, a.score, atol=1e-5)
    np.testing.assert_allclose(b.particles.euler_deg, a.particles.euler_deg, atol=1e-3)
    for it in (1, 2):  # inserted by the workers, finished in the main process
        maps = [read_image(tmp_path / mode / "frealign" / "maps" / f"sample_r01_{it:02d}.mrc")
                for mode in ("serial", "dask")]
        assert_same_map(maps[1], maps[0])


def test_the_cluster_closes_while_the_last_map_is_finished(tmp_path, template, monkeypatch):
    events = []
    finish, release = pipeline._finish_map, executor.EarlyClose.start

    def finishing(paths, iteration, *args):
        events.append(("finish", iteration))
        return finish(paths, iteration, *args)

    def releasing(self):
        events.append(("release", self.client.status))
        release(self)

    monkeypatch.setattr(pipeline, "_finish_map", finishing)
    monkeypatch.setattr(executor.EarlyClose, "start", releasing)
    shutil.copytree(template, tmp_path / "p")
    params = pyp.load_parameters(tmp_path / "p")
    params["refine_maxiter"] = 3
    run = pipeline.run_cspt(params, project_dir=tmp_path / "p", workers=2, stop_when_converged=False)
    assert events == [("finish", 1), ("finish", 2), ("release", "running"), ("finish", 3)]
    assert run.map.name == "sample_r01_03.mrc" and run.map.is_file()


# ------------------------------------------------------------------------------------------------ several tilt series
@pytest.fixture(scope="module")
def second_sample():
    """Another small tilt series of the same object: other particles, tilts, defocus and image size."""
    return make_sample(n_particles=8, n_tilts=15, shape_yx=(320, 320), box=48, thickness_px=60.0, defocus_um=3.0,
                       seed=1)


@pytest.mark.slow
def test_every_tilt_series_is_refined_and_all_go_into_one_map(tmp_path, small_sample, second_sample):
    root = tmp_path / "pair"
    write_sample(small_sample, root, name="tsA")
    write_sample(second_sample, root, name="tsB")
    params = pyp.load_parameters(root)
    params.update(SETTINGS, refine_maxiter=2, data_set="")  # no data set: the project folder names the map
    out = pyp.csp_split(params, iteration=2, project_dir=root, serial=True)

    maps = root / "frealign" / "maps"
    assert Path(out["map"]) == maps / "pair_r01_02.mrc" and (maps / "pair_r01_01.mrc").is_file()
    assert [Path(p).name for p in out["parameters"]] == ["tsA_r01_02.cistem", "tsB_r01_02.cistem"]
    for name, sample in (("tsA", small_sample), ("tsB", second_sample)):
        refined = read_tracks(maps / f"{name}_r01_02.cistem", sample)
        assert truth_error_px(refined, sample) < 0.5 * truth_error_px(sample.tracks, sample), name

    # the map is both series inserted together, each split into halves by its own particles
    together = HalfMapInsertion(ReconstructionSettings(**reconstruction_options(Settings.parse(params))))
    for name in ("tsA", "tsB"):
        _, tracks, _ = pyp.load_project(root, name, 2)
        together.insert(open_stack(root / f"{name}_stack.mrc")[0], tracks, half_split(tracks))
    assert out["iterations"][0]["projections"] == together.stats["n_used"] > len(small_sample.tracks)
    assert_same_map(read_image(out["map"]), together.finish().map)
    together.close()
    one = reconstruct_iteration(root, "tsA", 2).map
    truth_fsc = [fsc.fsc_curve(m, small_sample.truth_map, small_sample.pixel_A).fsc[1:].mean()
                 for m in (read_image(out["map"]), one)]
    assert truth_fsc[0] > truth_fsc[1], truth_fsc


# ------------------------------------------------------------------------------------------------ bad input
def _no_work_done(root: Path) -> bool:
    return not list((root / "frealign" / "scratch").iterdir()) and not list(
        (root / "frealign" / "maps").glob("*.mrc"))


@pytest.mark.parametrize("change, match", [
    ({"refine_maxiter": 1}, "refine_maxiter"),
    ({"csp_UseImagesForRefinementMin": 30, "csp_UseImagesForRefinementMax": 40}, "selects no tilt"),
    ({"data_mode": "spr"}, "No output parameter file is generated"),
    ({"particle_rad": 150.0}, "particle_rad|extract_box"),
])
def test_inconsistent_parameters_fail_before_any_work(project, change, match):
    values = pyp.load_parameters(project).to_dict()
    values.update(change)
    with pytest.raises(CsptInputError, match=match):
        pyp.csp_split(values, iteration=2, project_dir=project, serial=True)
    assert _no_work_done(project)


def test_wrong_files_fail_before_any_work(project):
    params = pyp.load_parameters(project)
    write_map(project / "frealign" / "maps" / "sample_r01_01.mrc", np.zeros((32, 32, 32), np.float32), 4.0)
    with pytest.raises(CsptInputError, match="sample_r01_01.mrc"):
        pyp.csp_split(params, project_dir=project, serial=True)
    with pytest.raises(CsptInputError, match="iteration 2"):
        pyp.csp_split(params, iteration=3, project_dir=project, serial=True)
    (project / "frealign" / "maps" / "sample_r01_01.mrc").unlink()
    (project / "sample_stack.mrc").unlink()
    with pytest.raises(CsptInputError, match="tilt series"):
        pyp.csp_split(params, project_dir=project, serial=True)
    assert tilt_series_names(project) == []
    assert _no_work_done(project)


@pytest.mark.slow
def test_initial_map_is_rebuilt_when_the_input_changes_but_a_user_reference_is_kept(project, small_sample):
    params = pyp.load_parameters(project)
    params["refine_maxiter"] = 2
    initial = project / "frealign" / "maps" / "sample_r01_01.mrc"
    pyp.csp_split(params, project_dir=project, serial=True)
    first = read_image(initial)
    moved = small_sample.tracks.replace(shift_px=small_sample.tracks.shift_px + 1.0)
    pyp.create_cistem_from_2d_tracks("sample", moved, params, project / "frealign" / "maps")
    pyp.csp_split(params, project_dir=project, serial=True)
    assert not np.array_equal(read_image(initial), first)  # rebuilt from the changed input

    (project / "frealign" / "scratch" / "sample_r01_01.inputs").unlink()
    write_map(initial, small_sample.truth_map, small_sample.pixel_A)  # the user's own reference
    pyp.csp_split(params, project_dir=project, serial=True)
    np.testing.assert_array_equal(read_image(initial), small_sample.truth_map)


def test_failed_job_is_reported_with_its_log_and_the_run_resumes(project, monkeypatch):
    params = pyp.load_parameters(project)
    params["refine_maxiter"] = 2
    real = refine.refine_tracks

    def broken(stack, tracks, *args, **kwargs):
        if 6 in tracks.particles.id:
            raise RuntimeError("simulated crash in the bundle with particle 6")
        return real(stack, tracks, *args, **kwargs)

    monkeypatch.setattr(refine, "refine_tracks", broken)
    with pytest.raises(CsptRunError, match="1 of 3 refinement job") as failure:
        pyp.csp_split(params, project_dir=project, serial=True)
    log = Path(failure.value.log_path)
    assert log.name == "sample_r01_02_bundle0001.log" and "simulated crash" in log.read_text()
    assert "Traceback" in log.read_text()
    done = sorted(p.name for p in (project / "frealign" / "scratch").glob("*_bundle*.npz"))
    assert done == ["sample_r01_02_bundle0000.npz", "sample_r01_02_bundle0002.npz"]

    monkeypatch.setattr(refine, "refine_tracks", real)
    out = pyp.csp_split(params, project_dir=project, serial=True)
    assert out["iterations"][0]["skipped"] == 2 and out["iterations"][0]["bundles"] == 3
    assert Path(out["map"]).name == "sample_r01_02.mrc"
    # the resumed bundles' projections are inserted by the main process
    assert_same_map(read_image(out["map"]), reconstruct_iteration(project, "sample", 2).map)
