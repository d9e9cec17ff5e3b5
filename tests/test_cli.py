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
