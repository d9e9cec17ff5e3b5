"""Atomic writes under SIGKILL: a file with its final name is absent or complete, never half-written.

A child process rewrites every kind of file we write (track data JSON and pickle, the .cistem pair, the parameter
file, {name}.pkl, a map, a streamed stack) in a loop, each version filled with its own number ``k``; the test kills
it with SIGKILL at random moments, 20 times, and after each kill reads every file that has its final name with our
readers and checks it is one whole version. What a kill may leave behind (documented and asserted here):

* ``.{name}.<random>.part`` temporary files of the write that was interrupted (never read by anyone);
  :func:`~napari_cspt2d.io.atomic.remove_stale_temp_files` (run at the start of every pipeline run) removes them;
* a ``.cistem`` pair from two versions: each file is atomic, the pair is not (the main file is renamed first, so
  after a kill between the two renames the main file is newer than ``_extended.cistem``). The pair reader refuses
  such a pair (the extended file carries the digest of the main file it was written with).

Each child numbers its versions on from where the previous child was killed (``sys.argv[2]``), so a newer file
always has a larger number, across kills too.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from test_fuzz_readers import PARAMS_SEED, seed_tracks

from napari_cspt2d import CsptInputError
from napari_cspt2d.io import atomic, cistem, metadata, mrc, toml, trackdata
from napari_cspt2d.pyp import Parameters, create_cistem_from_2d_tracks

N_PARTICLES, N_TILTS, N_FRAMES, STACK_SHAPE, MAP_SHAPE = 20, 41, 500, (12, 128, 128), (24, 24, 24)

WRITER = textwrap.dedent(f"""
    import sys, warnings
    from pathlib import Path
    import numpy as np
    from napari_cspt2d import TrackSet
    from napari_cspt2d.io import metadata, mrc, toml, trackdata
    from napari_cspt2d.pyp import create_cistem_from_2d_tracks

    warnings.simplefilter("ignore")
    folder, k = Path(sys.argv[1]), int(sys.argv[2])
    params = {{"csp_no_3d_points": True, "data_mode": "tomo", "csp_frame_refinement": True, "scope_pixel": 1.0,
              "extract_box": 256, "particle_rad": 100, "data_set": "ts"}}

    def tracks(k):
        return TrackSet.from_track_data({{
            "particles": {{p: {{"x_3d": 0.0, "y_3d": 0.0, "z_3d": 0.0}} for p in range(1, {N_PARTICLES} + 1)}},
            "tilts": {{t: {{"angle": -60.0 + 3 * t, "defocus": 2.5}} for t in range({N_TILTS})}},
            "projections": [{{"pind": p, "tind": t, "shift_x": float(k), "shift_y": -float(k), "score": float(k),
                             "occupancy": 100.0}} for p in range(1, {N_PARTICLES} + 1) for t in range({N_TILTS})]}},
            (128, 128))

    print("ready", flush=True)
    while True:
        ts = tracks(k)
        trackdata.write_track_data(folder / "tracks.json", ts)
        trackdata.write_track_data(folder / "tracks.pkl", ts)
        create_cistem_from_2d_tracks("ts", ts, params, folder)
        toml.save_params({{**params, "slurm_bundle_size": k}}, folder / "cfg.toml")
        metadata.write_metadata(folder / "ts.pkl", 128, 128, {N_TILTS}, frames=[k] * {N_FRAMES})
        mrc.write_map(folder / "map.mrc", np.full({MAP_SHAPE}, k, np.float32), 1.0)
        mrc.merge_images(folder / "stack.mrc", (np.full({STACK_SHAPE[1:]}, k, np.float32)
                                               for _ in range({STACK_SHAPE[0]})), {STACK_SHAPE[0]}, 1.0)
        k += 1
""")

FINAL = ("tracks.json", "tracks.pkl", "ts_r01.cistem", "ts_r01_extended.cistem", "cfg.toml", "ts.pkl", "map.mrc",
         "stack.mrc")


def _one(values, name: str) -> int:
    """The single version number ``values`` all equal (a file mixing versions or zeros fails here)."""
    values = np.unique(np.asarray(values, dtype=np.float64))
    assert values.size == 1 and values[0] >= 1 and values[0] == int(values[0]), f"{name} mixes values {values[:5]}"
    return int(values[0])


def check_files(folder) -> dict[str, int]:
    """Read every file that has its final name; each must be one whole version. Returns name -> version."""
    found = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind in ("json", "pkl"):
            path = folder / f"tracks.{kind}"
            if path.exists():
                ts = trackdata.read_track_data(path)
                assert len(ts) == N_PARTICLES * N_TILTS and ts.image_shape_yx == (128, 128)
                found[path.name] = _one(np.concatenate([ts.score, ts.shift_px[:, 0], -ts.shift_px[:, 1]]), path.name)
        if (folder / "ts_r01.cistem").exists():
            main = cistem.read_cistem(folder / "ts_r01.cistem")
            assert len(main) == N_PARTICLES * N_TILTS
            found["ts_r01.cistem"] = _one(main["SCORE"], "ts_r01.cistem")
        if (folder / "ts_r01_extended.cistem").exists():
            particles, tilts = cistem.read_extended(folder / "ts_r01_extended.cistem")
            assert len(particles) == N_PARTICLES and len(tilts) == N_TILTS
            found["ts_r01_extended.cistem"] = _one(particles["PSCORE"], "ts_r01_extended.cistem")
        if (folder / "cfg.toml").exists():
            found["cfg.toml"] = toml.load_params(folder / "cfg.toml")["slurm_bundle_size"]
        if (folder / "ts.pkl").exists():
            meta = metadata.read_metadata(folder / "ts.pkl")
            assert len(meta["frames"]) == N_FRAMES and metadata.metadata_shape(meta)[2] == N_TILTS
            found["ts.pkl"] = _one(meta["frames"], "ts.pkl")
        for name, shape in (("map.mrc", MAP_SHAPE), ("stack.mrc", STACK_SHAPE)):
            if (folder / name).exists():
                data, _ = mrc.open_stack(folder / name)
                assert data.shape == shape, (name, data.shape)
                found[name] = _one(data, name)
    return found


@pytest.mark.slow
def test_files_survive_sigkill_at_random_moments(tmp_path):
    rng = random.Random(0)
    kills, stray_parts, split_pairs, seen = 20, 0, 0, set()
    for kill in range(kills):
        first_version = 1 + 1000 * kill  # above anything an earlier child wrote (each writes far fewer than 1000)
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(first_version)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        found = check_files(tmp_path)
        seen |= set(found)
        main, ext = found.get("ts_r01.cistem"), found.get("ts_r01_extended.cistem")
        if main is not None and ext is not None:
            assert main >= ext, f"pair versions {main} and {ext}"  # main renamed first, then extended
            split_pairs += main != ext
            _check_pair(tmp_path / "ts_r01.cistem", torn=main != ext)
        leftovers = {p.name for p in tmp_path.iterdir()} - set(FINAL) - {f".ts_r01.cistem{cistem.PAIR_WRITING}"}
        assert all(re.fullmatch(rf"\.({'|'.join(map(re.escape, FINAL))})\.\w+\.part", n) for n in leftovers), leftovers
        stray_parts = len(leftovers)
    assert seen == set(FINAL), f"the writer never completed {set(FINAL) - seen} in {kills} runs"
    print(f"\n{kills} kills: {stray_parts} stray .part files left, cistem pair split by {split_pairs} kills")


def _check_pair(path, *, torn: bool) -> None:
    """The pair reader accepts a pair written together and refuses one torn between its two renames."""
    if not torn:
        cistem.read_pair(path)
        return
    with pytest.raises(CsptInputError) as err:
        cistem.read_pair(path)
    assert err.value.field == "pair" and err.value.file == str(cistem.extended_path(path))


def test_torn_cistem_pair_is_refused(tmp_path):
    """A kill between the two renames leaves a new main file beside the old extended file: refused by every pair
    reader, accepted again once both files are written."""
    main, ext = map(Path, create_cistem_from_2d_tracks("ts", seed_tracks(), PARAMS_SEED, tmp_path))
    old_ext = ext.read_bytes()
    moved = seed_tracks()
    moved["projections"][0]["shift_x"] += 3.0
    create_cistem_from_2d_tracks("ts", moved, PARAMS_SEED, tmp_path)
    _check_pair(main, torn=False)
    ext.write_bytes(old_ext)  # as if killed after the main file's rename: the write's marker is still there
    main.with_name(f".{main.name}{cistem.PAIR_WRITING}").touch()
    _check_pair(main, torn=True)
    with pytest.raises(CsptInputError, match="interrupted"):
        Parameters.from_file(main)
    assert len(cistem.read_extended(ext)[0]) == 3  # the extended file alone is whole
    create_cistem_from_2d_tracks("ts", moved, PARAMS_SEED, tmp_path)
    assert len(Parameters.from_file(main)) == 12


def test_stale_temp_files_are_removed_and_fresh_ones_kept(tmp_path):
    started = time.time()
    stale = [tmp_path / ".map.mrc.abcd1234.part", tmp_path / "frealign" / "scratch" / ".x_r01.cistem.zz_9zz_9.part"]
    fresh = tmp_path / ".tracks.json.qwer5678.part"  # a writer at work
    other = [tmp_path / ".notes.part", tmp_path / "map.part", tmp_path / ".old.mrc.abcd1234.partial"]
    for path in (*stale, fresh, *other):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        if path != fresh:
            os.utime(path, (started - 3600, started - 3600))
    assert sorted(atomic.remove_stale_temp_files(tmp_path, started=started)) == sorted(stale)
    assert fresh.exists() and all(p.exists() for p in other) and not any(p.exists() for p in stale)
    assert atomic.remove_stale_temp_files(tmp_path, started=started + 3600) == [fresh]
