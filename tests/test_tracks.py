import numpy as np
import pytest

from napari_cspt2d import CsptInputError, TiltTable, TrackSet
from napari_cspt2d.errors import CsptInputWarning


def seed_track_data(n_particles=10, n_tilts=13):
    rng = np.random.default_rng(1)
    return {
        "particles": {i: {"x_3d": 0.0, "y_3d": 0.0, "z_3d": 0.0} for i in range(1, n_particles + 1)},
        "tilts": {i: {"angle": -60 + i * 10, "defocus": 2.5} for i in range(n_tilts)},
        "projections": [
            {"pind": p, "tind": t, "shift_x": float(rng.normal(0, 5)), "shift_y": float(rng.normal(0, 5)),
             "score": 0.8, "occupancy": 1.0}
            for p in range(1, n_particles + 1) for t in range(n_tilts)
        ],
    }


def test_track_data_round_trip_is_exact():
    td = seed_track_data()
    ts = TrackSet.from_track_data(td)
    back = ts.to_track_data()
    assert len(ts) == 130 and ts.n_particles == 10 and ts.n_tilts == 13
    for a, b in zip(td["projections"], back["projections"]):
        assert a == b
    assert {k: {kk: v[kk] for kk in ("x_3d", "y_3d", "z_3d")} for k, v in back["particles"].items()} == td["particles"]
    assert all(back["tilts"][k]["angle"] == v["angle"] for k, v in td["tilts"].items())
    assert TrackSet.from_track_data(back).equals(ts)


def test_zero_3d_shift_is_position_relative_to_centre():
    ts = TrackSet.from_track_data(seed_track_data(), image_shape_yx=(1024, 2048))
    pos = ts.positions_px()
    np.testing.assert_allclose(pos - [1023.5, 511.5], ts.shift_px)


def test_positions_follow_tilt_geometry_and_survive_3d_fill():
    td = seed_track_data(2, 3)
    td["particles"][1].update(x_3d=100.0, y_3d=-20.0, z_3d=50.0)
    ts = TrackSet.from_track_data(td, image_shape_yx=(100, 100))
    row = ts.row_of(1, 0)  # tilt 0 is at -60 degrees
    t = np.deg2rad(-60)
    expected_x = 49.5 + 100 * np.cos(t) + 50 * np.sin(t) + ts.shift_px[row, 0]
    assert ts.positions_px()[row, 0] == pytest.approx(expected_x)
    moved = ts.with_particle_xyz(np.zeros((2, 3)))
    np.testing.assert_allclose(moved.positions_px(), ts.positions_px(), atol=1e-9)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda td: td["projections"].append(dict(td["projections"][0])), "projections"),
        (lambda td: td["projections"][0].update(tind=99), "projections.tind"),
        (lambda td: td["projections"][0].update(shift_x=float("nan")), "shift_x"),
        (lambda td: td["projections"][1].update(pind="a"), "pind"),
        (lambda td: td.pop("tilts"), "tilts"),
        (lambda td: td["tilts"][0].pop("angle"), "angle"),
    ],
)
def test_bad_track_data_names_the_field(mutate, field):
    td = seed_track_data(3, 4)
    mutate(td)
    with pytest.raises(CsptInputError) as err:
        TrackSet.from_track_data(td)
    assert field in str(err.value)


def test_non_sequential_ids_warn():
    td = seed_track_data(3, 4)
    td["particles"][10] = td["particles"].pop(3)
    for p in td["projections"]:
        if p["pind"] == 3:
            p["pind"] = 10
    with pytest.warns(CsptInputWarning, match="not sequential"):
        TrackSet.from_track_data(td)


def test_edits_return_new_sets_and_keep_order():
    ts = TrackSet.from_track_data(seed_track_data(3, 4), image_shape_yx=(64, 64))
    moved = ts.with_positions([0], [[10.0, 20.0]])
    assert ts.positions_px()[0, 0] != 10.0 and moved.positions_px()[0].tolist() == [10.0, 20.0]
    grown = ts.append([7, 7], [0, 1], [[1, 2], [3, 4]])
    assert grown.n_particles == 4 and len(grown) == len(ts) + 2
    assert np.all(np.diff(grown.particle) >= 0)
    dropped = grown.select(grown.particle != 7)
    assert dropped.equals(ts)


def test_accumulated_dose_follows_acquisition_order():
    tilts = TiltTable.from_angles([-6, -3, 0, 3, 6], dose=2.0)
    # dose-symmetric default order: 0 first, then -3/3, then -6/6 (stable)
    assert tilts.order.tolist() == [3, 1, 0, 2, 4]
    assert tilts.accumulated_dose().tolist() == [6.0, 2.0, 0.0, 4.0, 8.0]


def test_hundred_thousand_projections_are_cheap():
    n_p, n_t = 2500, 41
    pid, tid = (a.ravel() for a in np.meshgrid(np.arange(1, n_p + 1), np.arange(n_t), indexing="ij"))
    tilts = TiltTable.from_angles(np.linspace(-60, 60, n_t))
    ts = TrackSet.from_positions(pid, tid, np.random.default_rng(0).uniform(0, 4000, (pid.size, 2)), tilts,
                                 (4096, 4096))
    assert len(ts) == 102_500
    np.testing.assert_allclose(ts.with_positions([5], [[1.0, 2.0]]).positions_px()[5], [1.0, 2.0])
