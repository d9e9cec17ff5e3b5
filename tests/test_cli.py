"""The ``cspt2d`` command as a user runs it: exit codes and messages."""

import numpy as np

from napari_cspt2d.cli import EXIT_INPUT, EXIT_OK, main
from napari_cspt2d.io.mrc import write_map


def test_fsc_between_a_map_and_its_noisy_copy(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = np.linspace(-1, 1, 32)
    vol = np.exp(-(x[:, None, None] ** 2 + x[None, :, None] ** 2 + (x[None, None, :] - 0.2) ** 2) * 8)
    write_map(tmp_path / "a.mrc", vol, 2.0)
    write_map(tmp_path / "b.mrc", vol + rng.normal(0, 0.05, vol.shape), 2.0)
    assert main(["fsc", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc"), "--out", str(tmp_path / "fsc")]) == EXIT_OK
    out = capsys.readouterr().out
    assert "resolution at FSC 0.143" in out
    assert (tmp_path / "fsc.csv").is_file() and (tmp_path / "fsc.png").stat().st_size > 1000


def test_bad_input_exit_code_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.mrc"
    bad.write_bytes(b"\0" * 10)
    assert main(["fsc", str(bad), str(bad)]) == EXIT_INPUT
    assert "bad.mrc" in capsys.readouterr().err


def test_sample_writes_a_pyp_project(tmp_path, capsys):
    out = tmp_path / "proj"
    assert main(["sample", str(out), "--particles", "6", "--tilts", "11"]) == EXIT_OK
    for rel in (".pyp_config.toml", "sample.pkl", "sample_stack.mrc", "frealign/maps/sample_r01.cistem",
                "frealign/maps/sample_r01_extended.cistem", "truth/sample_truth.mrc"):
        assert (out / rel).is_file(), rel
    from napari_cspt2d.pyp import load_project

    params, tracks, meta = load_project(out, "sample")
    assert tracks.n_particles == 6 and tracks.n_tilts == 11 and params["csp_no_3d_points"] is True


def test_import_export_round_trip(tmp_path, small_sample, capsys):
    from napari_cspt2d.io.cryodrgn import read_ctf, read_poses
    from napari_cspt2d.io.mrc import open_stack
    from napari_cspt2d.io.star import read_star_blocks
    from napari_cspt2d.io.trackdata import read_track_data, write_track_data
    from napari_cspt2d.sample import write_sample

    write_sample(small_sample, tmp_path / "src", name="ts1")
    picks = write_track_data(tmp_path / "picks.json", small_sample.tracks)
    project = tmp_path / "proj"
    args = ["import", str(picks), "--stack", str(tmp_path / "src" / "ts1_stack.mrc"), "--out", str(project),
            "--set", "extract_box=48", "--set", "particle_rad=60", "--set", "scope_pixel=4"]
    assert main(args) == EXIT_OK
    assert main(["export", str(project), "--to", "json", "--out", str(tmp_path / "json")]) == EXIT_OK
    back = read_track_data(tmp_path / "json" / "ts1_r01_01.json", small_sample.tracks.image_shape_yx)
    np.testing.assert_allclose(back.positions_px(), small_sample.tracks.positions_px(), atol=1e-3)
    assert main(["export", str(project), "--to", "relion", "--out", str(tmp_path / "relion")]) == EXIT_OK
    assert len(read_star_blocks(tmp_path / "relion" / "particles.star")["particles"]) == 12
    assert main(["export", str(project), "--to", "cryodrgn", "--out", str(tmp_path / "drgn")]) == EXIT_OK
    particles, _ = open_stack(tmp_path / "drgn" / "ts1_particles.mrcs")
    rot, trans = read_poses(tmp_path / "drgn" / "ts1_poses.pkl")
    assert particles.shape == (len(small_sample.tracks), 48, 48) and rot.shape == (len(particles), 3, 3)
    assert read_ctf(tmp_path / "drgn" / "ts1_ctf.pkl").shape == (len(particles), 9) and not trans.any()


def test_unknown_parameter_suggests_the_closest(tmp_path, small_sample, capsys):
    from napari_cspt2d.io.trackdata import write_track_data
    from napari_cspt2d.sample import write_sample

    write_sample(small_sample, tmp_path / "src", name="ts1")
    picks = write_track_data(tmp_path / "picks.json", small_sample.tracks)
    args = ["import", str(picks), "--stack", str(tmp_path / "src" / "ts1_stack.mrc"), "--out", str(tmp_path / "p"),
            "--set", "extract_bx=48"]
    assert main(args) == EXIT_INPUT
    assert "did you mean 'extract_box'" in capsys.readouterr().err
