import os

import numpy as np

from napari_cspt2d import geometry
from napari_cspt2d.sample import blob_model, render_map, render_projections


def test_sample_has_truth_consistent_with_picks(small_sample):
    s = small_sample
    assert s.stack.shape == (21, 384, 384)
    err = s.tracks.positions_px() - s.truth_tracks.positions_px()
    assert 1.0 < err.std() < 3.0  # 2 px pick error
    # particles are dark: the mean under the true positions is below the image mean
    pos = np.round(s.truth_tracks.positions_px()).astype(int)
    under = s.stack[s.truth_tracks.tilt, pos[:, 1], pos[:, 0]]
    assert under.mean() < s.stack.mean()


def test_analytic_projection_matches_summed_map():
    model = blob_model(radius_px=10)
    box = 32
    vol = render_map(model, box)
    a = geometry.euler_to_matrix(30.0, 50.0, -20.0)
    proj = render_projections(model, a[None], box)[0]
    # real-space check: rotate the sampled map so that view z is the array's first axis, then sum
    from scipy.ndimage import affine_transform

    c = box // 2
    # output view coordinate v=(x,y,z) samples map at A.T v; arrays are [z,y,x]
    perm = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]])
    m = perm @ a.T @ perm
    rotated = affine_transform(vol, m, offset=c - m @ np.full(3, c), order=1)
    np.testing.assert_allclose(rotated.sum(0), proj, atol=0.05 * proj.max())


SMALL = {"n_particles": 6, "n_tilts": 9, "shape_yx": (192, 160), "box": 32, "thickness_px": 40.0}


def test_a_streamed_sample_is_the_sample_whatever_the_order(tmp_path):
    """The stream makes the tilt napari shows first at once, then the others nearest first; the finished stack is
    make_sample's (every tilt depends only on the seed and its section), and is saved for next time."""
    from napari_cspt2d._sample_data import SampleStream, _load
    from napari_cspt2d.sample import SamplePlan, first_tilt, make_sample, tilt_order

    assert first_tilt(41) == 20 and first_tilt(4) == 1  # napari's slider starts at int((n - 1) / 2)
    assert tilt_order(5) == [2, 3, 1, 4, 0]
    whole = make_sample(**SMALL)
    stream = SampleStream(SamplePlan(**SMALL), (tmp_path, "key"))
    first = first_tilt(SMALL["n_tilts"])
    made = [t for t in range(SMALL["n_tilts"]) if stream.stack[t].any()]
    assert made == [first] and np.array_equal(stream.stack[first], whole.stack[first])
    assert stream.claim() and not stream.claim()
    progress = list(stream.fill(batch_s=0.0))
    assert progress == [(n, SMALL["n_tilts"]) for n in range(2, SMALL["n_tilts"] + 1)]
    assert stream.complete and np.array_equal(stream.stack, whole.stack)
    stack, tracks, pixel_A, params = _load(tmp_path, "key")
    assert np.array_equal(stack, whole.stack) and tracks.equals(whole.tracks) and params == whole.params
    # deterministic per seed, and the seed matters
    again, other = make_sample(**SMALL), make_sample(**SMALL, seed=1)
    assert np.array_equal(again.stack, whole.stack) and again.tracks.equals(whole.tracks)
    assert not np.array_equal(other.stack, whole.stack)


def test_sample_parameters_have_pyps_meaning():
    """The sample's own settings open without a notice: every exposure, as pyp's exposure indices."""
    from napari_cspt2d.model.params import interpretations
    from napari_cspt2d.sample import make_sample

    params = make_sample(**SMALL).params
    assert (params["csp_UseImagesForRefinementMin"], params["csp_UseImagesForRefinementMax"]) == (0, -1)
    assert interpretations(params) == []


def test_a_sample_made_by_a_child_process_is_byte_identical_and_stop_ends_the_child(tmp_path):
    """fill_in_child: the tilts made by a child process (napari's streamed sample) are the in-process ones, byte
    for byte, and the finished sample is saved; stop() kills the child and ends the stream where it was."""
    from napari_cspt2d._sample_data import SampleStream, _load
    from napari_cspt2d.sample import SamplePlan

    here = SampleStream(SamplePlan(**SMALL))
    here.finish()
    there = SampleStream(SamplePlan(**SMALL), (tmp_path, "key"))
    progress = list(there.fill_in_child(batch_s=0.0))
    assert progress == [(n, SMALL["n_tilts"]) for n in range(2, SMALL["n_tilts"] + 1)]
    assert there.complete and there.stack.tobytes() == here.stack.tobytes()
    assert _load(tmp_path, "key")[0].tobytes() == here.stack.tobytes()

    big = SampleStream(SamplePlan(n_particles=4, n_tilts=41), (tmp_path, "big"))
    batches = big.fill_in_child(batch_s=0.0)
    assert next(batches) == (2, 41)
    child = big._child
    assert child is not None and child.poll() is None
    if os.getpriority(os.PRIO_PROCESS, 0) < 19:  # the child runs below its parent
        assert os.getpriority(os.PRIO_PROCESS, child.pid) > os.getpriority(os.PRIO_PROCESS, 0)
    big.stop()
    assert list(batches) == []  # the tilt being read when it was stopped is not waited for
    assert child.returncode is not None and big._child is None
    assert not big.complete and big.done < 41 and _load(tmp_path, "big") is None


def test_a_sample_whose_child_process_fails_is_made_in_process(monkeypatch):
    """The child cannot run (here: it exits at once): the stream makes the remaining tilts itself, the same ones."""
    from napari_cspt2d import _sample_child
    from napari_cspt2d._sample_data import SampleStream
    from napari_cspt2d.sample import SamplePlan

    here = SampleStream(SamplePlan(**SMALL))
    here.finish()
    monkeypatch.setattr(_sample_child, "PROGRAM", "raise SystemExit(3)")
    there = SampleStream(SamplePlan(**SMALL))
    progress = list(there.fill_in_child(batch_s=0.0))
    assert progress[-1] == (SMALL["n_tilts"], SMALL["n_tilts"])
    assert there.complete and there.stack.tobytes() == here.stack.tobytes() and there._child is None
