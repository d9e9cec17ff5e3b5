"""The whole CSPT pipeline killed with SIGKILL at random moments, again and again, then left to finish.

A small sample project (6 particles × 11 tilts, box 32, iterations 2-3, in-process jobs) is run in a child process
that the test kills at a seeded random moment, several times in a row on the same project folder. After every kill,
every file with its final name in the project must be readable by our readers (maps and stacks, ``.cistem`` files,
``.pyp_config.toml``, ``{name}.pkl`` through the safe unpickler, bundle results, FSC tables and plots, records); a
``.cistem`` pair torn between its two renames must be refused as a pair (and is counted). A last run without kill
must then finish and give the same parameters and map as an uninterrupted run of a copy of the project, within
float tolerance: the map of a resumed iteration adds the projections of resumed bundles in another order, so it
is not bit-identical (see ``recon/pipeline.py``). Temporary files the kills left are removed by the last run.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_cspt2d import CsptInputError, pyp
from napari_cspt2d.io import cistem, metadata, mrc, toml
from napari_cspt2d.io.atomic import TEMP_SUFFIX
from napari_cspt2d.io.mrc import read_image
from napari_cspt2d.recon.pipeline import plan_cspt
from napari_cspt2d.sample import make_sample, write_sample

KILLS, SEED = 6, 20240917
SETTINGS = {"refine_maxiter": 3, "refine_rhref": "12:10:9", "slurm_bundle_size": 2}

RUNNER = textwrap.dedent("""
    import sys
    from napari_cspt2d import pyp

    params = pyp.load_parameters(sys.argv[1])
    print("ready", flush=True)
    pyp.csp_split(params, project_dir=sys.argv[1], serial=True)
""")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("template")
    sample = make_sample(n_particles=6, n_tilts=11, shape_yx=(256, 256), box=32, thickness_px=40.0)
    write_sample(sample, root, name="sample")
    params = pyp.load_parameters(root)
    params.update(SETTINGS)
    pyp.save_parameters(params, root)
    return root


def _read_cistem_pair(path: Path) -> bool:
    """Read one ``.cistem`` file (and its pair, if both exist); True when the pair is torn (and refused)."""
    if path.name.endswith("_extended.cistem"):
        cistem.read_extended(path)
        return False
    cistem.read_cistem(path)
    if not cistem.extended_path(path).exists():
        return False
    try:
        cistem.read_pair(path)
    except CsptInputError as exc:
        assert exc.field == "pair", exc
        return True
    return False


def _read_png(path: Path) -> None:
    with Image.open(path) as image:
        image.load()


READERS = {
    ".mrc": lambda p: mrc.open_stack(p)[0].sum(), ".toml": toml.load_params, ".pkl": metadata.read_metadata,
    ".npz": lambda p: np.load(p, allow_pickle=False)["fingerprint"], ".png": _read_png,
    ".csv": lambda p: np.loadtxt(p, delimiter=",", skiprows=2, ndmin=2)[:, 3], ".json": lambda p: p.read_text(),
    ".inputs": lambda p: p.read_text(), ".writing": lambda p: p.read_text(),
}


def check_readable(root: Path) -> tuple[int, int]:
    """Read every file of the project that has its final name (all but temporary files and logs, which are
    appended to); returns (files read, torn .cistem pairs)."""
    n_read, torn = 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(root.rglob("*")):
            if path.is_dir() or path.name.startswith(".") or path.suffix == ".log":
                continue
            if path.suffix == ".cistem":
                torn += _read_cistem_pair(path)
            else:
                assert path.suffix in READERS, f"no reader for {path}"
                READERS[path.suffix](path)
            n_read += 1
    return n_read, torn


def _last_step(root: Path) -> str:
    """The last step the run log records (where the kill struck), shortened."""
    log = root / "log" / "sample_csp.log"
    lines = log.read_text().splitlines() if log.is_file() else []
    step = lines[-1][20:].split(":")[0] if lines else "nothing logged"
    return "run started" if step.startswith("CSPT of") else step


def _final_state(root: Path, sample_like) -> tuple:
    out = sorted((root / "frealign" / "maps").glob("sample_r01_[0-9][0-9].cistem"))[-1]
    tracks = pyp.Parameters.from_file(out).to_trackset(sample_like.image_shape_yx, tilts=sample_like.tilts)
    return out.name, tracks, read_image(root / "frealign" / "maps" / out.name.replace(".cistem", ".mrc"))


@pytest.mark.slow
def test_pipeline_survives_repeated_sigkill(template, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    shutil.copytree(template, reference)
    shutil.copytree(template, killed)
    started = time.perf_counter()
    pyp.csp_split(pyp.load_parameters(reference), project_dir=reference, serial=True)  # also fills numba's cache
    duration = time.perf_counter() - started

    rng, torn, reached = random.Random(SEED), 0, []
    for _ in range(KILLS):
        child = subprocess.Popen([sys.executable, "-c", RUNNER, str(killed)], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 1.5 * duration))  # the child also loads what the run imports lazily
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        torn += check_readable(killed)[1]
        reached.append(_last_step(killed))
    leftovers = [p for p in killed.rglob(f".*{TEMP_SUFFIX}")]
    for path in leftovers:  # as if the kills were long ago: the next run removes them
        os.utime(path, (time.time() - 3600,) * 2)

    last = subprocess.run([sys.executable, "-c", RUNNER, str(killed)], capture_output=True, text=True, timeout=120)
    assert last.returncode == 0, last.stderr[-3000:]
    n_read, torn_after = check_readable(killed)
    assert torn_after == 0 and not list(killed.rglob(f".*{TEMP_SUFFIX}"))
    assert not list((killed / "frealign" / "scratch").glob("*.writing"))

    like = pyp.load_project(template, "sample")[1]
    name, tracks, volume = _final_state(killed, like)
    ref_name, ref_tracks, ref_volume = _final_state(reference, like)
    assert name == ref_name
    np.testing.assert_array_equal(tracks.particle, ref_tracks.particle)
    np.testing.assert_allclose(tracks.shift_px, ref_tracks.shift_px, atol=1e-3)
    np.testing.assert_allclose(tracks.particles.euler_deg, ref_tracks.particles.euler_deg, atol=1e-2)
    np.testing.assert_allclose(tracks.score, ref_tracks.score, atol=1e-4)
    np.testing.assert_allclose(volume, ref_volume, atol=1e-4 * np.abs(ref_volume).max())
    print(f"\n{KILLS} kills in a {duration:.1f} s run, after: {'; '.join(reached)}; {torn} torn "
          f"pair(s) refused, {len(leftovers)} temporary file(s) removed by the last run, {n_read} files read; "
          f"final map equal within {np.abs(volume - ref_volume).max() / np.abs(ref_volume).max():.1e} (relative), "
          f"bit-identical: {np.array_equal(volume, ref_volume)}")


def test_unfinished_iteration_is_redone_and_a_pending_initial_map_rebuilt(template, tmp_path):
    """What an interrupted run leaves makes the next run start earlier: a writing marker, a torn parameter pair or a
    missing half map of iteration 2 make a run asked to start at 3 start at 2; a pending record of the initial map
    makes it rebuilt."""
    root = tmp_path / "project"
    shutil.copytree(template, root)
    params = pyp.load_parameters(root)
    params["refine_maxiter"] = 2
    pyp.csp_split(params, project_dir=root, serial=True)
    maps, scratch = root / "frealign" / "maps", root / "frealign" / "scratch"
    params["refine_maxiter"] = 3

    def first_iteration() -> str:
        return plan_cspt(params, project_dir=root, first_iteration=3).splitlines()[0].split("iterations ")[1]

    assert first_iteration() == "3..3"
    marker = scratch / "sample_r01_02.writing"
    marker.write_text("pending")
    assert first_iteration() == "2..3"
    marker.unlink()
    ext = maps / "sample_r01_02_extended.cistem"
    done = ext.read_bytes()
    shutil.copy(maps / "sample_r01_extended.cistem", ext)  # iteration 1's: torn from iteration 2's main file
    assert first_iteration() == "2..3"
    ext.write_bytes(done)
    half = maps / "sample_r01_02_half2.mrc"
    half.rename(half.with_suffix(".bak"))
    assert first_iteration() == "2..3"
    half.with_suffix(".bak").rename(half)
    assert first_iteration() == "3..3"

    record = scratch / "sample_r01_01.inputs"
    record.write_text("pending")  # killed while building the initial map
    before = (maps / "sample_r01_01.mrc").stat().st_mtime_ns
    pyp.csp_split({**params, "refine_maxiter": 2}, project_dir=root, serial=True)
    assert (maps / "sample_r01_01.mrc").stat().st_mtime_ns > before and record.read_text() != "pending"
