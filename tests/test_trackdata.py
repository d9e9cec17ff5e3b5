"""Track data as JSON and pickle, and the restricted unpickler."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from napari_cspt2d import CsptInputError, TiltTable, TrackSet
from napari_cspt2d.io.safe_pickle import safe_load, safe_loads
from napari_cspt2d.io.trackdata import FORMAT, read_track_data, read_track_dict, write_track_data
from napari_cspt2d.model.tracks import ParticleTable


def random_tracks(seed: int = 0, shape=(300, 400)) -> TrackSet:
    """Tracks with arbitrary float64 values everywhere (no rounding-friendly numbers)."""
    rng = np.random.default_rng(seed)
    tilts = TiltTable.from_angles(np.sort(rng.uniform(-60, 60, 7)), defocus_um=rng.uniform(2, 4, 7),
                                  axis_deg=rng.normal(0, 3, 7), dose=rng.uniform(1, 3, 7))
    ids = np.array([1, 2, 3, 4, 5])
    particles = ParticleTable(ids, rng.normal(0, 50, (5, 3)), rng.uniform(-180, 180, (5, 3)))
    pid, tid = (a.ravel() for a in np.meshgrid(ids, tilts.id, indexing="ij"))
    keep = rng.random(pid.size) > 0.2
    n = int(keep.sum())
    return TrackSet(pid[keep], tid[keep], rng.normal(0, 20, (n, 2)), rng.random(n), rng.uniform(0, 100, n),
                    particles, tilts, shape)


@pytest.mark.parametrize("suffix", [".json", ".pkl", ".pickle"])
def test_round_trip_is_exact(tmp_path, suffix):
    tracks = random_tracks()
    path = write_track_data(tmp_path / f"tracks{suffix}", tracks)
    back = read_track_data(path)
    assert back.equals(tracks) and back.image_shape_yx == tracks.image_shape_yx
    assert not list(tmp_path.glob(".*part"))
    assert read_track_data(path, image_shape_yx=(10, 20)).image_shape_yx == (10, 20)


def test_json_layout_has_string_ids_and_format(tmp_path):
    path = write_track_data(tmp_path / "t.json", random_tracks())
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT and set(doc["particles"]) == {"1", "2", "3", "4", "5"}
    data = read_track_dict(path)
    assert set(data["particles"]) == {1, 2, 3, 4, 5} and "format" not in data


def test_seed_script_pickle_is_read(tmp_path):
    seed = {
        "particles": {i: {"x_3d": 0.0, "y_3d": 0.0, "z_3d": 0.0} for i in range(1, 4)},
        "tilts": {i: {"angle": -60 + 10 * i, "defocus": np.float64(2.5)} for i in range(13)},
        "projections": [{"pind": p, "tind": t, "shift_x": 0.25 * p, "shift_y": -t, "score": 0.8, "occupancy": 1.0}
                        for p in range(1, 4) for t in range(13)],
    }
    path = tmp_path / "seed.pkl"
    for protocol in (2, 4, 5):
        with open(path, "wb") as fh:
            pickle.dump(seed, fh, protocol=protocol)
        tracks = read_track_data(path)
        assert len(tracks) == 39 and tracks.image_shape_yx is None
        assert tracks.to_track_data()["projections"][5]["shift_y"] == -5


def test_dict_input_is_checked_before_writing(tmp_path):
    with pytest.raises(CsptInputError) as err:
        write_track_data(tmp_path / "t.json", {"particles": {}, "tilts": {}})
    assert err.value.file == str(tmp_path / "t.json") and not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("content, match", [
    ('{"particles": {"1": {"x_3d": NaN}}}', "JSON"),
    ('{"particles": {"a": {}}, "tilts": {}, "projections": []}', "integer ids"),
    ('{"format": "other", "particles": {}}', "format"),
    ('[1, 2]', "dict"),
    ("{", "JSON"),
])
def test_bad_json(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(CsptInputError, match=match) as err:
        read_track_data(path)
    assert err.value.file == str(path)


def test_bad_paths(tmp_path):
    with pytest.raises(CsptInputError, match="suffix"):
        write_track_data(tmp_path / "t.txt", random_tracks())
    with pytest.raises(CsptInputError, match="does not exist"):
        read_track_data(tmp_path / "missing.json")
    (tmp_path / "empty.json").write_text('{"particles": {}, "tilts": {}, "projections": [{"pind": 1}]}')
    with pytest.raises(CsptInputError) as err:
        read_track_data(tmp_path / "empty.json")
    assert err.value.file == str(tmp_path / "empty.json")


# ------------------------------------------------------------------------------------------------ safe unpickler
class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_calling_os_system_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"particles": _Exploit(marker)}))
    with pytest.raises(CsptInputError) as err:
        safe_load(path)
    assert err.value.file == str(path)
    assert "system" in str(err.value) and ("posix" in str(err.value) or "os" in str(err.value))
    with pytest.raises(CsptInputError):
        read_track_data(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_numpy_and_builtins_are_allowed(protocol):
    obj = {"a": np.arange(6.0).reshape(2, 3), "b": np.float32(1.5), "c": {1, 2}, "d": frozenset("x"),
           "e": 1 + 2j, "f": np.zeros((2, 2), order="F"), "g": b"bytes", "h": np.array(["s", "t"]), "i": (None, True)}
    back = safe_loads(pickle.dumps(obj, protocol=protocol))
    assert back.keys() == obj.keys() and back["c"] == {1, 2} and back["g"] == b"bytes"
    np.testing.assert_array_equal(back["a"], obj["a"])
    np.testing.assert_array_equal(back["f"], obj["f"])


def test_numpy1_pickles_and_array_subclasses():
    numpy2 = pickle.dumps({"a": np.arange(4.0), "s": np.float64(2.5)}, protocol=2)
    assert b"numpy._core.multiarray" in numpy2
    numpy1 = numpy2.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # what numpy 1.x writes
    back = safe_loads(numpy1)
    np.testing.assert_array_equal(back["a"], np.arange(4.0))
    assert back["s"] == 2.5
    with pytest.raises(CsptInputError, match="numpy.ma"):
        safe_loads(pickle.dumps(np.ma.masked_array([1, 2], mask=[0, 1])))


@pytest.mark.parametrize("payload", [
    b"cos\nsystem\n(S'true'\ntR.",  # protocol 0: os.system('true')
    b"cbuiltins\neval\n(S'1'\ntR.",
    b"c_codecs\nencode\n(S'x'\nS'rot13'\ntR.",  # only latin-1, as protocol-2 bytes need
])
def test_refused_globals_and_codec_lookups(payload):
    with pytest.raises(CsptInputError) as err:
        safe_loads(payload, source="x.pkl")
    assert err.value.file == "x.pkl"


def test_pandas_objects_are_refused():
    pd = pytest.importorskip("pandas")
    with pytest.raises(CsptInputError, match="pandas"):
        safe_loads(pickle.dumps({"tomo": pd.DataFrame({"x": [1]})}))


@pytest.mark.parametrize("data", [b"", b"\x80\x04garbage", b"not a pickle"])
def test_corrupt_pickles(data):
    with pytest.raises(CsptInputError, match="pickle"):
        safe_loads(data, source="c.pkl")
