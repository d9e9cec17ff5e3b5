"""``{name}.pkl`` as pyp writes and reads it (DataFrames), the seed's plain form, and the safety of reading either.

pyp's rules encoded here (file names are in the public nextpyp/pyp repository):

* ``src/pyp/inout/metadata/pyp_metadata.py`` (``FILES_TOMO``, ``LocalMetadata.loadImageDim``, ``loadTextFile``,
  ``write``): the pickle is a plain ``pickle.dump`` of a dict of DataFrames; ``image`` = the tilt stack's x, y, z
  (z = sections); ``tomo`` = the ``.rec`` size stored as x, y, thickness (IMOD's ``header -size`` x, z, y); ``tlt``
  (column ``tilt_angle``), ``order`` (``order``), ``ctf`` (``tilt_angle, df1, df2, ast, cc, est_res``), ``ali``
  (``m00 m01 m02 m03 dx dy``), ``frames`` a list of names.
* ``src/pyp/inout/metadata/core.py`` ``tomo_extract_coordinates``: ``metadata["tomo"].at[0, "x"]`` times
  ``tomo_rec_binning`` is the unbinned reconstruction; ``metadata["image"].at[0, "x"]`` the micrograph size;
  ``[_[0] for _ in metadata["order"].to_numpy()]`` the scan order (written as ``TIND``);
  ``metadata["ctf"].to_numpy()[i, 1:4]`` = df1, df2 (Å), astigmatism angle; the tilt axis is the rotation of the
  *inverse* of ``ali`` (``xf2rotmagstr``), so ``ali`` rotates by minus the axis.
* ``requirements.txt``: pyp runs pandas 2.3.3 with numpy 1.26.4; ``tests/data/pyp_metadata_pandas2.pkl.b64`` was
  written by those (``tests/data/make_pyp_metadata.py``).
"""

from __future__ import annotations

import base64
import warnings
import copyreg
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pandas.core.indexes.base import _new_Index
from test_cistem import dyadic_tracks

from napari_cspt2d import CsptInputError
from napari_cspt2d.io.metadata import (metadata_shape, metadata_tomogram_px, read_metadata, read_metadata_tilts,
                                       write_metadata)
from napari_cspt2d.io.safe_pickle import safe_loads

DATA = Path(__file__).parent / "data"
FRAME = pd.DataFrame({"x": [463], "y": [479], "z": [256]}).set_axis(pd.Index(list("xyz"), dtype=object), axis=1)


def pyp_written_pickle(tmp_path: Path) -> Path:
    path = tmp_path / "TS_01.pkl"
    path.write_bytes(base64.b64decode((DATA / "pyp_metadata_pandas2.pkl.b64").read_text()))
    return path


def test_a_pickle_written_by_pyps_pandas_is_read(tmp_path):
    path = pyp_written_pickle(tmp_path)
    data = read_metadata(path)
    assert metadata_shape(data) == (3838, 3708, 3)  # image y, x, sections
    assert metadata_tomogram_px(data, rec_binning=8) == (463 * 8, 479 * 8, 256 * 8)  # tomo x binning, as pyp does
    assert data["frames"][0] == "TS_01_000_0.0.tif" and data["drift"][0].shape == (2, 6)
    tilts = read_metadata_tilts(path, dose_per_tilt=3.0)
    np.testing.assert_array_equal(tilts.angle_deg, [-3, 0, 3])
    np.testing.assert_array_equal(tilts.order, [1, 0, 2])
    np.testing.assert_allclose(tilts.defocus_um, [2.45, 2.46, 2.47])  # mean of df1, df2 (Å) in µm
    np.testing.assert_allclose(tilts.axis_deg, 85.3)  # ali turns raw images by -85.3°: the axis is 85.3°
    np.testing.assert_array_equal(tilts.dose, 3.0)


def test_written_as_pyp_reads_it(tmp_path):
    """pyp's own expressions (``tomo_extract_coordinates``) on the file written here give pyp's meanings."""
    tracks = dyadic_tracks(2, 5)
    path = write_metadata(tmp_path / "ts.pkl", 640, 512, 5, frames=["a.tif"], tilts=tracks.tilts, thickness_px=800,
                          rec_binning=4)
    metadata = pd.read_pickle(path)  # what pyp's LocalMetadata calls (trusted: we wrote it)
    assert metadata["mode"] == "tomo" and metadata["frames"] == ["a.tif"]
    assert (metadata["image"].at[0, "x"], metadata["image"].at[0, "y"], metadata["image"].at[0, "z"]) == (640, 512, 5)
    binning = 4
    rec = [metadata["tomo"].at[0, a] * binning for a in "xyz"]
    assert rec == [640, 512, 800]  # z is the thickness, not the number of tilts
    tilts = metadata["tlt"].to_numpy()
    assert tilts.shape == (5, 1)
    np.testing.assert_array_equal(tilts[:, 0], tracks.tilts.angle_deg)
    assert [int(o[0]) for o in metadata["order"].to_numpy()] == tracks.tilts.order.tolist()
    np.testing.assert_allclose(metadata["ctf"].to_numpy()[:, 1], tracks.tilts.defocus_um * 1e4)
    assert list(metadata["ctf"].columns) == ["tilt_angle", "df1", "df2", "ast", "cc", "est_res"]
    assert metadata_tomogram_px(read_metadata(path), rec_binning=4) == (640, 512, 800)


@pytest.mark.skipif(not os.environ.get("CSPT2D_PYP_PYTHON"), reason="set CSPT2D_PYP_PYTHON to an interpreter with "
                    "pyp's pandas 2.3.3 / numpy 1.26.4 to check that pyp's pandas reads the file written here")
def test_pyps_pandas_reads_the_file_written_here(tmp_path):
    path = write_metadata(tmp_path / "ts.pkl", 640, 512, 5, tilts=dyadic_tracks(2, 5).tilts)
    code = ("import pandas as pd, sys; m = pd.read_pickle(sys.argv[1]); "
            "print(m['tomo'].at[0, 'z'], m['image'].at[0, 'x'], m['tlt'].values.shape, pd.__version__)")
    out = subprocess.run([os.environ["CSPT2D_PYP_PYTHON"], "-c", code, str(path)], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[:4] == ["2048", "640", "(5,", "1)"]


def test_the_seeds_plain_form_is_still_read(tmp_path):
    """The seed document's ``create_metadata`` (plain ``pickle.dump``): ``tomo`` holds the image size and tilts."""
    path = tmp_path / "ts001.pkl"
    with open(path, "wb") as f:
        pickle.dump({"tomo": {"x": [1024], "y": [1024], "z": [13]}}, f)
    data = read_metadata(path)
    assert metadata_shape(data) == (1024, 1024, 13) and metadata_tomogram_px(data) is None


def test_pyps_tomo_table_without_image_is_not_taken_for_the_image(tmp_path):
    path = tmp_path / "ts.pkl"
    path.write_bytes(pickle.dumps({"tomo": FRAME}))
    with pytest.raises(CsptInputError, match="Metadata is required.*'image'"):
        read_metadata(path)


def test_pandas_3_string_columns_are_refused_by_name(tmp_path):
    """pandas 3 pickles string labels as Arrow arrays, which pyp's pandas 2.3.3 may not read and which would need
    pyarrow's reconstructors; the refusal names them."""
    path = tmp_path / "ts.pkl"
    path.write_bytes(pickle.dumps({"image": pd.DataFrame({"x": [10], "y": [10], "z": [3]})}))
    if pd.DataFrame({"x": [1]}).columns.dtype == object:
        pytest.skip("this pandas pickles labels as object arrays")
    with pytest.raises(CsptInputError, match="refers to the global 'pandas"):
        read_metadata(path)


# ------------------------------------------------------------------------------------------------ safety
class Reduce:
    """Pickles as ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class NewObj:
    """Pickles as ``NEWOBJ cls(*args)`` then ``BUILD state``, as copyreg does for ordinary classes."""

    def __init__(self, cls, args, state):
        self.cls, self.args, self.state = cls, args, state

    @property
    def __class__(self):  # pickle checks that NEWOBJ's class is the object's
        return self.cls

    def __reduce_ex__(self, protocol):
        return copyreg.__newobj__, (self.cls, *self.args), self.state


@pytest.mark.parametrize("abuse, refused", [
    (NewObj(pd.DataFrame, (), {**FRAME.__getstate__(), "_constructor": 1}), "state"),  # would set any attribute
    (NewObj(pd.DataFrame, (), {"_mgr": "not a manager", "_typ": "dataframe"}), "state"),
    (NewObj(pd.DataFrame, ({"x": [1]},), None), "instantiates"),  # DataFrame(data) runs pandas' constructor
    (Reduce(pd.DataFrame, {"x": [1]}), "directly"),
    (Reduce(_new_Index, pd.DataFrame, {"data": np.zeros(1)}), "_new_Index"),  # any class through _new_Index
    (Reduce(_new_Index, pd.Index, {"data": np.zeros(1), "copy": True}), "_new_Index"),
    (Reduce(_new_Index, pd.Index, {"data": [os.sep]}), "1-D numpy"),
    (Reduce(slice, slice(0, 1), 2), "slice"),  # slices of slices nest, and hash, in Python 3.12
    (Reduce(os.system, "true"), "system"),
])
def test_a_pickle_abusing_an_allowed_class_is_refused(abuse, refused):
    data = pickle.dumps({"tomo": abuse}, protocol=4)
    with pytest.raises(CsptInputError, match=refused):
        safe_loads(data, source="x.pkl", dataframes=True)


def test_dataframes_only_where_the_format_needs_them(tmp_path):
    """A track-data or CTF pickle holding a DataFrame is still refused; the metadata reader takes it."""
    data = pickle.dumps({"tomo": FRAME})
    with pytest.raises(CsptInputError, match="pandas"):
        safe_loads(data)
    assert safe_loads(data, dataframes=True)["tomo"].equals(FRAME)


def test_damaged_dataframe_pickles_are_refused_cleanly(tmp_path):
    """pyp's own pickle with bytes flipped, cut or repeated: read, or refused with CsptInputError naming the file;
    never another exception (pandas' reconstructors raise many kinds)."""
    good = pyp_written_pickle(tmp_path).read_bytes()
    rng = np.random.default_rng(0)
    path = tmp_path / "bad.pkl"
    outcomes = {"read": 0, "refused": 0}
    for trial in range(600):
        data = bytearray(good)
        if trial % 3 == 0:
            data = data[: rng.integers(1, len(data))]
        elif trial % 3 == 1:
            at = int(rng.integers(0, len(data)))
            data[at:at] = data[at:at + int(rng.integers(1, 40))]
        for at in rng.integers(0, len(data), int(rng.integers(1, 4))):
            data[at] = int(rng.integers(0, 256))
        path.write_bytes(bytes(data))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                read_metadata(path)
                read_metadata_tilts(path)
            outcomes["read"] += 1
        except CsptInputError as exc:
            assert exc.file == str(path), exc
            outcomes["refused"] += 1
    assert outcomes["refused"] > 200


def test_array_states_that_crash_numpy_are_refused(tmp_path):
    """Found by damaging pickles: an object array whose list is shorter than its shape, and an object dtype whose
    pickled flags differ from numpy's, crash the process in numpy's ``__setstate__``. Run in a subprocess so that a
    regression shows as a failed test."""
    code = textwrap.dedent("""
        import pickle, sys
        import numpy as np
        from napari_cspt2d.errors import CsptInputError
        from napari_cspt2d.io.safe_pickle import safe_loads
        rebuild = np.ndarray.__reduce__(np.zeros(1))[0]

        class Short:
            def __reduce__(self):
                return rebuild, (np.ndarray, (0,), b"b"), (1, (116,), np.dtype("O"), False, ["x", "y", "z"])

        class Flags:
            def __reduce__(self):
                return np.dtype, ("O8", False, True), (3, "|", None, None, None, -1, -1, 163)

        for bad in (Short(), [Flags()]):
            try:
                safe_loads(pickle.dumps(bad, protocol=4), dataframes=True)
                print("loaded")
            except CsptInputError as exc:
                print("refused:", exc.reason)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"crashed (exit {run.returncode}): {run.stderr[-400:]}"
    assert run.stdout.count("refused:") == 2, run.stdout
