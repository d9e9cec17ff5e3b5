"""``cspt2d import``/``export`` of the real RELION 5 project (EMPIAR-10164 tutorial, ../shared/data/relion5).

The positions are checked against RELION 5's own projection of the picked 3D coordinates, written independently of
the importer in tests/test_star.py (``_relion_positions``) from RELION's public source (github 3dem/relion):
``src/jaz/tomography/tomogram.cpp`` ``Tomogram::setProjectionMatrix`` (``P = S(int(image/2)) S(shift / pixel)
Rz(ZRot) Ry(YTilt) Rx(XTilt) S(-int(tomogram/2))``, shifts ``rlnTomoX/YShiftAngst / rlnTomoTiltSeriesPixelSize``),
``src/jaz/tomography/tomogram_set.cpp`` (the tomogram centre ``w0/2.0`` that ``ParticleSet`` adds),
``src/jaz/tomography/particle_set.cpp`` ``getParticleCoordDecenteredPixel`` (centred Å / pixel + centre) and
``src/jaz/gravis/t3Matrix.h`` ``rotation`` (right-handed, degrees). The stacks are sparse MRC files of the
tutorial's image size with one section per tilt-series star row (no pixels are read).
"""

from __future__ import annotations


import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from test_star import SHAPE, _relion_positions

from napari_cspt2d.cli import EXIT_INPUT, EXIT_OK, main
from napari_cspt2d.io import star
from napari_cspt2d.pyp import load_project

N_TILTS = {"TS_01": 40, "TS_03": 40, "TS_43": 41, "TS_45": 41, "TS_54": 41}


@pytest.fixture(scope="module")
def relion_files(request):
    root = request.getfixturevalue("shared_data") / "relion5"
    return root / "Picks" / "job019" / "particles.star", root / "Tomograms" / "job006" / "tomograms.star", root


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    """``{name}.mrc`` per tomogram: empty (sparse) stacks of the tutorial's image size, and a wrong ``.tlt``
    beside each (all 0°: it must not be used)."""
    folder = tmp_path_factory.mktemp("stacks")
    for name, n in N_TILTS.items():
        with mrcfile.new_mmap(folder / f"{name}.mrc", shape=(n, *SHAPE), mrc_mode=0) as mrc:
            mrc.voxel_size = 1.35
        (folder / f"{name}.tlt").write_text("0.0\n" * n)
    return folder


def _import(relion_files, stacks, out, *extra):
    particles, tomograms, root = relion_files
    return main(["import", str(particles), "--tomograms", str(tomograms), "--relion-dir", str(root), "--out",
                 str(out), *extra])


def _deviation_px(relion_files, project, name):
    """|position - RELION's projection| (px) of every projection of ``name`` in ``project``."""
    particles, tomograms, root = relion_files
    series = star.read_relion5_tomograms(tomograms, project_dir=root)[name]
    df = starfile.read(particles)
    coords = df[df.rlnTomoName == name][list(star._COORDS)].to_numpy()
    _, tracks, _ = load_project(project, name)
    expected = _relion_positions(series, coords, SHAPE)  # (P, T, 2)
    got = tracks.positions_px()[np.lexsort((tracks.tilt, tracks.particle))]
    return np.hypot(*(got - expected.reshape(-1, 2)).T)


def test_one_tomogram_of_a_multi_tomogram_picks_file(relion_files, stacks, tmp_path, capsys):
    project = tmp_path / "p"
    assert _import(relion_files, stacks, project, "--tomo", "TS_01", "--stack", str(stacks / "TS_01.mrc")) == EXIT_OK
    assert "imported TS_01: 78400 projections of 1960 particles in 40 tilts" in capsys.readouterr().out
    params, tracks, _ = load_project(project, "TS_01")
    raw = starfile.read(relion_files[2] / "Tomograms" / "job006" / "tilt_series" / "TS_01.star")
    t = tracks.tilts
    np.testing.assert_allclose(t.angle_deg, raw.rlnTomoYTilt)  # not the 0° of the .tlt beside the stack
    np.testing.assert_allclose(t.axis_deg, raw.rlnTomoZRot)  # 85°, not 0
    np.testing.assert_allclose(t.defocus_um, (raw.rlnDefocusU + raw.rlnDefocusV) / 2e4)
    np.testing.assert_allclose(t.accumulated_dose(), raw.rlnMicrographPreExposure, atol=1e-9)
    assert (params["scope_pixel"], params["scope_voltage"], params["scope_cs"], params["scope_wgh"]) == (
        1.35, 300.0, 2.7, 0.1)
    assert params["scope_dose_rate"] == 3.0
    deviation = _deviation_px(relion_files, project, "TS_01")
    assert np.median(deviation) < 1e-3 and deviation.max() < 1e-2


def test_every_tomogram_into_one_project(relion_files, stacks, tmp_path):
    project = tmp_path / "all"
    assert _import(relion_files, stacks, project, "--stack", str(stacks / "{name}.mrc")) == EXIT_OK
    deviations = {name: _deviation_px(relion_files, project, name) for name in N_TILTS}
    for name, deviation in deviations.items():
        assert deviation.max() < 1e-2, name  # TS_54's axis varies per tilt (69-92°): still RELION's positions
    everything = np.concatenate(list(deviations.values()))
    print(f"RELION 5 positions, {everything.size} projections: median {np.median(everything):.2e} px, "
          f"max {everything.max():.2e} px")


def test_import_input_errors(relion_files, stacks, tmp_path, capsys):
    assert _import(relion_files, stacks, tmp_path / "a", "--stack", str(stacks / "TS_01.mrc")) == EXIT_INPUT
    assert "{name}" in capsys.readouterr().err  # five tomograms, one stack path
    assert _import(relion_files, stacks, tmp_path / "b", "--tomo", "TS_99", "--stack", str(stacks / "x.mrc")) == 2
    assert "TS_99" in capsys.readouterr().err
    assert _import(relion_files, stacks, tmp_path / "c", "--tomo", "TS_43", "--stack",
                   str(stacks / "TS_01.mrc")) == EXIT_INPUT  # 40 sections for 41 tilts
    assert "41 tilt images" in capsys.readouterr().err


def _same_table(after: pd.DataFrame, before: pd.DataFrame, what: str, atol: float = 2e-6) -> None:
    assert list(after.columns) == list(before.columns), what
    assert len(after) == len(before), what
    for col in before.columns:
        if before[col].dtype.kind in "fi":
            np.testing.assert_allclose(after[col], before[col], atol=atol, err_msg=f"{what}: {col}")
        else:
            assert list(after[col].astype(str)) == list(before[col].astype(str)), f"{what}: {col}"


def test_export_gives_relions_files_back(relion_files, stacks, tmp_path):
    """Import two tomograms, export: every column of RELION's tables comes back (pass-through), values equal."""
    particles, tomograms, root = relion_files
    project, out = tmp_path / "p", tmp_path / "out"
    for name in ("TS_01", "TS_54"):
        assert _import(relion_files, stacks, project, "--tomo", name, "--stack", str(stacks / f"{name}.mrc")) == 0
    assert main(["export", str(project), "--to", "relion", "--out", str(out)]) == EXIT_OK
    glob_before = starfile.read(tomograms).set_index("rlnTomoName").loc[["TS_01", "TS_54"]].reset_index()
    glob_after = starfile.read(out / "tomograms.star")
    same = [c for c in glob_before.columns if c != "rlnTomoTiltSeriesStarFile"]
    _same_table(glob_after[same], glob_before[same], "tomograms.star")
    for name in ("TS_01", "TS_54"):
        before = starfile.read(root / "Tomograms" / "job006" / "tilt_series" / f"{name}.star")
        after = starfile.read(out / "tilt_series" / f"{name}.star")
        _same_table(after, before, f"{name}.star", atol=2e-3)  # shifts (Å) through the float32 .cistem pair
    p_before = starfile.read(particles)
    p_before = p_before[p_before.rlnTomoName.isin(["TS_01", "TS_54"])]
    p_before = pd.concat([p_before[p_before.rlnTomoName == n] for n in ("TS_01", "TS_54")], ignore_index=True)
    _same_table(starfile.read(out / "particles.star"), p_before, "particles.star", atol=2e-3)


def test_file_open_of_a_picks_star(relion_files, tmp_path):
    """File ▸ Open of particles.star: tomograms.star found in the project's Tomograms/job*/, the image size from the
    first micrograph's header (only TS_01's is there: the others are left out with a warning)."""
    import shutil

    from napari_cspt2d._reader import get_tracks_reader
    from napari_cspt2d.errors import CsptInputWarning

    particles, tomograms, root = relion_files
    project = tmp_path / "relion"
    shutil.copytree(root, project)
    raw = starfile.read(project / "Tomograms" / "job006" / "tilt_series" / "TS_01.star")
    micrograph = project / raw.rlnMicrographName.iloc[0]
    micrograph.parent.mkdir(parents=True)
    with mrcfile.new_mmap(micrograph, shape=(1, *SHAPE), mrc_mode=0):
        pass
    path = project / "Picks" / "job019" / "particles.star"
    reader = get_tracks_reader(str(path))
    assert reader is not None and get_tracks_reader(str(tomograms)) is None  # not every star is a picks file
    with pytest.warns(CsptInputWarning, match="TS_03"):
        layers = reader(str(path))
    assert [layer[1]["name"] for layer in layers] == ["TS_01 trajectories", "TS_01 tracks"]
    tracks = layers[1][1]["metadata"]["cspt2d"]["tracks"]
    series = star.read_relion5_tomograms(tomograms, project_dir=root)["TS_01"]
    df = starfile.read(particles)
    expected = _relion_positions(series, df[df.rlnTomoName == "TS_01"][list(star._COORDS)].to_numpy(), SHAPE)
    got = tracks.positions_px()[np.lexsort((tracks.tilt, tracks.particle))]
    np.testing.assert_allclose(got, expected.reshape(-1, 2), atol=1e-6)
    np.testing.assert_allclose(layers[1][1]["scale"][1:], 1.35)
