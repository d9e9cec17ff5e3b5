"""``cspt2d run`` as a user meets it: a typo'd key stops it before any work, a changed box or binning rebuilds what
depends on it (or says how to go on), each iteration's resolution is printed, one run per project."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from napari_cspt2d import pyp
from napari_cspt2d.cli import EXIT_INPUT, EXIT_OK, main
from napari_cspt2d.io.mrc import open_stack
from napari_cspt2d.model import params as params_module
from napari_cspt2d.run_lock import ProjectBusyError
from napari_cspt2d.sample import make_sample, write_sample

SETTINGS = {"refine_maxiter": 2, "slurm_bundle_size": 2, "refine_rhref": "20:16"}
#: Holds the lock of the project in argv[1] until stdin closes, after saying "locked".
HOLDER = """
import sys
from napari_cspt2d.run_lock import project_lock
with project_lock(sys.argv[1], "CSPT refinement"):
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A small project (4 particles × 11 tilts, 160², box 32)."""
    root = tmp_path_factory.mktemp("safety")
    write_sample(make_sample(n_particles=4, n_tilts=11, shape_yx=(160, 160), box=32, thickness_px=30.0), root,
                 name="ts1")
    params = pyp.load_parameters(root)
    params.update(SETTINGS)
    pyp.save_parameters(params, root)
    return root


@pytest.fixture
def project(tmp_path, template, monkeypatch):
    monkeypatch.setattr(params_module, "_SAID", set())  # each test sees the notices of its own run
    return Path(shutil.copytree(template, tmp_path / "project"))


def set_keys(project: Path, **values) -> None:
    """Change (or add) keys in the project's .pyp_config.toml as a user edits it: line by line."""
    config = project / ".pyp_config.toml"
    lines = [line for line in config.read_text().splitlines() if line.split(" = ")[0] not in values]
    config.write_text("\n".join(lines + [f"{k} = {v!r}".replace("'", '"') for k, v in values.items()]) + "\n")


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_a_typo_stops_the_run_before_any_work(project, capsys):
    set_keys(project, extract_bxo=48)
    before = listing(project)
    for args in (["run", str(project)], ["run", str(project), "--dry-run"], ["reconstruct", str(project)]):
        assert main(args) == EXIT_INPUT, args
        err = capsys.readouterr().err
        assert err.count("did you mean 'extract_box'") == 1 and "--allow-unknown" in err, err
        assert "Warning" not in err and "warnings.warn" not in err
    assert listing(project) == before  # nothing written, not even a log
    assert main(["run", str(project), "--dry-run", "--allow-unknown"]) == EXIT_OK
    captured = capsys.readouterr()
    assert "iterations 2..2" in captured.out and "extract_bxo" in captured.err  # kept, with one note


def test_a_changed_box_rebuilds_the_initial_map_and_resolutions_are_printed(project, capsys):
    maps = project / "frealign" / "maps"
    assert main(["run", str(project), "--serial"]) == EXIT_OK
    first = capsys.readouterr().out
    assert open_stack(maps / "ts1_r01_01.mrc")[0].shape == (32, 32, 32)
    rows = re.findall(r"^\s+2\s+(\d+\.\d+) Å\s+(\d+\.\d+) Å\s+(\S+)$", first, re.M)
    assert len(rows) == 1 and "FSC 0.143  FSC 0.5" in first, first
    fsc143, fsc05, plot = float(rows[0][0]), float(rows[0][1]), Path(rows[0][2])
    assert 8.0 < fsc143 <= fsc05 < 200.0 and plot.is_file() and plot.name == "ts1_r01_02_fsc.png"

    set_keys(project, extract_box=48)
    assert main(["run", str(project), "--dry-run"]) == EXIT_OK
    assert "ts1_r01_01.mrc is built first (its input parameters, box or binning changed)" in capsys.readouterr().out
    assert main(["run", str(project), "--serial"]) == EXIT_OK
    for it in (1, 2):
        assert open_stack(maps / f"ts1_r01_{it:02d}.mrc")[0].shape == (48, 48, 48)

    set_keys(project, extract_box=32, refine_maxiter=3)  # starting later: the map of iteration 2 is 48³
    assert main(["run", str(project), "--iteration", "3", "--dry-run"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "is a 48x48x48 map, but extract_box = 32" in err and "start again from iteration 2" in err, err

    (project / "frealign" / "scratch" / "ts1_r01_01.inputs").unlink()  # iteration 1's map: now the user's
    assert main(["run", str(project), "--dry-run"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "taken as your initial reference: resample it" in err and "ts1_r01_01.mrc" in err, err


def test_reconstruct_prints_the_resolution(project, capsys):
    assert main(["reconstruct", str(project)]) == EXIT_OK
    out = capsys.readouterr().out
    found = re.search(r"resolution at FSC 0.143: (\d+\.\d+) Å; at 0.5: (\d+\.\d+) Å", out)
    assert found and float(found.group(1)) <= float(found.group(2)), out
    assert (project / "frealign" / "maps" / "ts1_r01_02_fsc.png").is_file() and "fsc_plot" in out


@pytest.fixture
def running(project):
    """Another process holding ``project``'s lock, as a run does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(project)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.stdin.close()
    proc.wait(timeout=30)


def test_a_second_run_exits_2_naming_the_first(project, running, monkeypatch, capsys):
    assert main(["run", str(project), "--dry-run"]) == EXIT_OK  # checking is fine, and says who runs
    out = capsys.readouterr().out
    assert "running now: CSPT refinement" in out and f"pid {running.pid}" in out
    cli = subprocess.run([sys.executable, "-m", "napari_cspt2d.cli", "run", str(project), "--serial"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == EXIT_INPUT, cli.stderr
    assert f"pid {running.pid}" in cli.stderr and "started" in cli.stderr and "CSPT refinement" in cli.stderr
    assert cli.stderr.count("bad input") == 1 and "Traceback" not in cli.stderr
    monkeypatch.chdir(project)
    params = pyp.load_parameters()
    with pytest.raises(ProjectBusyError, match=f"pid {running.pid}"):
        pyp.csp_split(params, iteration=2, serial=True)  # the seed's Option A
    with pytest.raises(ProjectBusyError, match=f"pid {running.pid}"):
        pyp.run_reconstruction("ts1", mp=params, iteration=2)  # and Option B
    assert not (project / "frealign" / "maps" / "ts1_r01_02.mrc").exists()


def test_a_napari_run_on_a_busy_project_writes_nothing(project, running):
    from napari_cspt2d.model.editing import TrackDocument
    from napari_cspt2d.runs import Session, run_job

    params, tracks, _ = pyp.load_project(project, "ts1")
    stack, _ = open_stack(project / "ts1_stack.mrc")
    session = Session(stack, project / "ts1_stack.mrc", tracks.tilts, TrackDocument(tracks), tracks, params, project,
                      "ts1")
    before = {p: p.stat().st_mtime_ns for p in project.rglob("*") if p.is_file()}
    with pytest.raises(ProjectBusyError, match=f"pid {running.pid}"):
        next(run_job(session, "refine", lambda *a: None, lambda: False))
    assert {p: p.stat().st_mtime_ns for p in project.rglob("*") if p.is_file()} == before
