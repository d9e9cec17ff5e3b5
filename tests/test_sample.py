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
