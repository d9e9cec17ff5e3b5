"""Fuzzing of every reader: corrupt, truncated and absurd inputs raise CsptInputError naming the file, nothing else.

Property checked for every input (:func:`check`): the reader returns, or raises :class:`CsptInputError` whose
``file`` (or message) names the input; any other exception fails the test. ``deadline`` catches hangs; the corpus
test also bounds memory (a header claiming 10^12 rows must not allocate). Budgets are fixed and derandomized, so CI
runs the same inputs every time; the module runs in well under a minute on 2 cores. The nastiest inputs found are
kept in ``tests/fuzz_corpus/`` (written by ``make_corpus.py``) and run by :func:`test_corpus`.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import pickletools
import struct
import subprocess
import sys
import tracemalloc
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_cspt2d import CsptInputError, TrackSet
from napari_cspt2d.io import cistem, cryodrgn, imod, mdoc, metadata, mrc, star, toml, trackdata
from napari_cspt2d.model.params import PARAMS, PypParameters
from napari_cspt2d.model.tiltseries import TiltSeries, read_angles
from napari_cspt2d.pyp import Parameters, create_cistem_from_2d_tracks

CORPUS = Path(__file__).parent / "fuzz_corpus"
FUZZ = settings(max_examples=150, deadline=5000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
TRIED: Counter[str] = Counter()  # inputs tried per reader; printed at the end of the module (pytest -s)

PARAMS_SEED = {"csp_no_3d_points": True, "data_mode": "tomo", "csp_frame_refinement": True, "scope_pixel": 1.35,
               "extract_box": 256, "extract_bin": 2, "particle_rad": 100, "data_set": "ts"}


def seed_tracks(n_particles: int = 3, n_tilts: int = 4) -> dict:
    """The seed's track_data dict, small."""
    return {
        "particles": {p: {"x_3d": 1.5 * p, "y_3d": -2.0, "z_3d": 0.25 * p} for p in range(1, n_particles + 1)},
        "tilts": {t: {"angle": -30.0 + 15 * t, "defocus": 2.5} for t in range(n_tilts)},
        "projections": [{"pind": p, "tind": t, "shift_x": 0.5 * p, "shift_y": -1.0 * t, "score": 0.8,
                         "occupancy": 1.0} for p in range(1, n_particles + 1) for t in range(n_tilts)],
    }


# ------------------------------------------------------------------------------------------------ readers
def _parameters(path: Path) -> None:
    par = Parameters.from_file(path)
    par.to_trackset((32, 40))
    par.get_num_tilts(), par.get_num_frames()


def _metadata(path: Path) -> None:
    metadata.metadata_shape(metadata.read_metadata(path))


def _metadata_tilts(path: Path) -> None:
    read_angles(path)
    TiltSeries.open(path.with_name("ts_stack.mrc"), angles=path)


def _stack(path: Path) -> None:
    data, _ = mrc.open_stack(path)
    series = TiltSeries.open(path, angles=np.linspace(-40, 40, min(4, data.shape[0])))
    series.contrast_limits()
    series.section(series.data.shape[0] - 1)


def _fiducials(path: Path) -> None:
    imod.read_fiducial_model(path, tilts=np.linspace(-30, 15, 4))
    imod.read_fiducial_model(path)  # angles 0 and image size from the header


def _resid(path: Path) -> None:
    imod.tracks_from_resid(path, np.linspace(-30, 15, 4), (32, 40))


def _mdoc(path: Path) -> None:
    mdoc.read_mdoc_info(path)
    TiltSeries.open(path.with_name("ts_stack.mrc"), angles=path)


def _relion5(path: Path) -> None:
    series = star.read_relion5_tomograms(path.with_name("tomograms.star"))
    star.read_relion5_particles(path.with_name("particles.star"), series, (32, 40))


#: reader name -> (file it reads in the valid project, the entry points run on it)
READERS: dict[str, tuple[str, tuple[Callable[[Path], object], ...]]] = {
    "cistem": ("ts_r01.cistem", (cistem.read_cistem, _parameters)),
    "extended": ("ts_r01_extended.cistem", (cistem.read_extended,
                                             lambda p: _parameters(p.with_name("ts_r01.cistem")))),
    "toml": ("cfg.toml", (toml.load_params, lambda p: toml.load_params(p, strict=False))),
    "metadata": ("ts.pkl", (_metadata, _metadata_tilts)),
    "track_json": ("tracks.json", (trackdata.read_track_data,)),
    "track_pkl": ("tracks.pkl", (trackdata.read_track_data,)),
    "mrc": ("ts_stack.mrc", (_stack,)),
    "tlt": ("ts.tlt", (imod.read_tlt, read_angles, lambda p: TiltSeries.open(p.with_name("ts_stack.mrc"), angles=p))),
    "xf": ("ts.xf", (imod.read_xf,)),
    "resid": ("ts.resid", (imod.read_resid, _resid)),
    "fid_xyz": ("fid.xyz", (imod.read_fid_xyz,)),
    "fiducial": ("ts.fid", (_fiducials,)),
    "mdoc": ("ts.mrc.mdoc", (_mdoc,)),
    "star_tomograms": ("tomograms.star", (_relion5,)),
    "star_tilt_series": ("tilt_series/ts.star", (lambda p: _relion5(p.parent.parent / "tomograms.star"),)),
    "star_particles": ("particles.star", (_relion5,)),
    "particle_series": ("series.star", (lambda p: star.read_particle_series_star(p, (32, 40)),)),
    "cryodrgn_poses": ("poses.pkl", (cryodrgn.read_poses,)),
    "cryodrgn_ctf": ("ctf.pkl", (cryodrgn.read_ctf,)),
}

MDOC = "PixelSpacing = 1.35\nImageSize = 40 32\n\n[T = SerialEM: fuzz]\n\n[T = Tilt axis angle = 85.3]\n\n" + "".join(
    f"[ZValue = {z}]\nTiltAngle = {a}\nExposureDose = 3\nTargetDefocus = -2.5\nDateTime = 02-Jan-24  10:0{z}:00\n"
    f"SubFramePath = D:\\frames\\ts_{z:03d}.tif\n\n" for z, a in enumerate((-30.0, -15.0, 0.0, 15.0)))
SERIES_STAR = "data_particles\n\nloop_\n" + "".join(f"_{c} #{i + 1}\n" for i, c in enumerate((
    "rlnGroupName", "rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY", "rlnCtfScalefactor", "rlnAngleRot",
    "rlnAngleTilt", "rlnAnglePsi", "rlnDefocusU", "rlnCtfBfactor"))) + "".join(
    f"p{p} ts_{t:03d}.mrc {10 + p + t} {12 - p} {np.cos(np.radians(a)):.6f} 0.0 {90 + a} 0.0 25000 {-12 * t}\n"
    for p in range(3) for t, a in enumerate((-30.0, -15.0, 0.0, 15.0)))


def seed_metadata() -> dict:
    """``ts.pkl`` in the seed's plain form (``tomo`` = image size and tilts), with the plain tilt lists."""
    return {"tomo": {"x": [40], "y": [32], "z": [4]}, "frames": [], "tlt": [-30.0, -15.0, 0.0, 15.0]}


def make_project(folder: Path) -> Path:
    """Valid files of every format (small), in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        create_cistem_from_2d_tracks("ts", seed_tracks(), PARAMS_SEED, folder)
        tracks = TrackSet.from_track_data(seed_tracks(), (32, 40))
        metadata.write_metadata(folder / "ts.pkl", 40, 32, 4, tilts=tracks.tilts)
        toml.save_params(PARAMS_SEED, folder / "cfg.toml")
        trackdata.write_track_data(folder / "tracks.json", tracks)
        trackdata.write_track_data(folder / "tracks.pkl", tracks)
        mrc.write_stack(folder / "ts_stack.mrc", np.arange(4 * 8 * 10, dtype=np.float32).reshape(4, 8, 10), 1.35)
        imod.write_tlt(folder / "ts.tlt", tracks.tilts.angle_deg)
        imod.write_fiducial_model(folder / "ts.fid", tracks)
        (folder / "ts.xf").write_text("".join(f"1.0 0.0 0.0 1.0 {t * 0.5} {-t}\n" for t in range(4)))
        (folder / "ts.resid").write_text("12 residuals\n" + "".join(
            f"{10.5 + p} {12.5 - t} {t} 0.1 -0.2\n" for p in range(3) for t in range(4)))
        (folder / "fid.xyz").write_text("".join(f"{p + 1} {20.0 + p} {16.0 - p} {p - 1.0} 1 {p + 1}"
                                                + (" Pix: 1.35 Dim: 40 32" if p == 0 else "") + "\n"
                                                for p in range(3)))
        (folder / "ts.mrc.mdoc").write_text(MDOC)
        series = star.relion5_series("ts", tracks, 1.35)
        star.write_relion5_tomograms(folder / "tomograms.star", {"ts": series})
        star.write_relion5_particles(folder / "particles.star", {"ts": tracks}, {"ts": series})
        (folder / "series.star").write_text(SERIES_STAR)
        cryodrgn.write_poses(folder / "poses.pkl", *cryodrgn.poses(tracks, box_px=16))
        cryodrgn.write_ctf(folder / "ctf.pkl", cryodrgn.ctf_params(tracks, box_px=16, pixel_A=1.35, tilt_pixel_A=1.35))
    return folder


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, bytes]:
    """The valid files: path relative to the project -> bytes."""
    folder = make_project(tmp_path_factory.mktemp("valid"))
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print("\nfuzz inputs tried per reader:", dict(sorted(TRIED.items())))


def check(reader: str, path: Path, calls: tuple[Callable[[Path], object], ...]) -> None:
    """Run every entry point on ``path``: success or CsptInputError naming a file of the input's folder."""
    for call in calls:
        TRIED[reader] += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                call(path)
        except CsptInputError as exc:
            named = exc.file is not None and Path(exc.file).parent in (path.parent, path.parent.parent)
            assert named or str(path.parent) in str(exc), f"error does not name the file: {exc!r}"


def put(folder: Path, files: dict[str, bytes], name: str, data: bytes) -> Path:
    """Write the valid project into ``folder`` (files it lacks) with ``name`` replaced by ``data``."""
    for other, content in files.items():
        if not (folder / other).exists():
            (folder / other).parent.mkdir(exist_ok=True)
            (folder / other).write_bytes(content)
    (folder / name).write_bytes(data)
    return folder / name


# ------------------------------------------------------------------------------------------------ byte corruption
SPECIAL_INTS = (0, 1, -1, 2, 255, 2**15, 2**31 - 1, -(2**31), 2**32 - 1, 10**12, 2**63 - 1, -(2**63))
SPECIAL_FLOATS = tuple(struct.pack("<f", v) for v in (np.nan, np.inf, -np.inf, 3.4e38, 1e-45)) + tuple(
    struct.pack("<d", v) for v in (np.nan, np.inf, 1e308))
SPECIAL_TOKENS = (b"nan", b"NaN", b"inf", b"-inf", b"1e999", b"-1", b"9" * 40, b"\x00", b"\xff\xfe", b'"', b"'",
                  b"[", b"]", b"{", b"}", b",", b":", b"=", b"\n", b"true", b"null", b"[[[[[[[[", b"\\u0000")


@st.composite
def corrupted(draw, data: bytes) -> bytes:
    """``data`` with 1-3 corruptions: bit flips, truncation, extreme ints (aligned like header fields), NaN/inf
    floats, text tokens, random inserts, deletions, repeated chunks."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(("flip", "truncate", "int", "float", "token", "insert", "delete", "repeat")))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del out[at:]
        elif kind == "int":
            width = draw(st.sampled_from((1, 2, 4, 8)))
            at -= at % width
            out[at:at + width] = (draw(st.sampled_from(SPECIAL_INTS)) % 2 ** (8 * width)).to_bytes(width, "little")
        elif kind == "float":
            value = draw(st.sampled_from(SPECIAL_FLOATS))
            out[at:at + len(value)] = value
        elif kind == "token":
            token = draw(st.sampled_from(SPECIAL_TOKENS))
            out[at:at + draw(st.integers(0, len(token)))] = token
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del out[at:at + draw(st.integers(1, 32))]
        else:
            size = draw(st.integers(1, 64))
            out[at:at] = out[at:at + size]
    return bytes(out)


@pytest.mark.parametrize("reader", READERS)
def test_corrupted_bytes(reader, project, tmp_path):
    name, calls = READERS[reader]

    @settings(FUZZ, max_examples=150)
    @given(data=corrupted(project[name]))
    def run(data):
        check(reader, put(tmp_path, project, name, data), calls)

    run()


def _boundaries(name: str, data: bytes) -> set[int]:
    """Offsets where a structure of the file starts or ends (truncating there must be refused cleanly)."""
    cuts, near = {0, len(data) - 1} | set(range(0, min(len(data), 64))), (-1, 0, 1)
    if name.endswith(".cistem"):
        offset, blocked = 0, name.endswith("_extended.cistem")
        while offset + 8 <= len(data) and data[offset:offset + 8] != cistem.PAIR_MAGIC:  # the pair trailer ends it
            head = offset + (8 if blocked else 0)
            n_cols, n_rows = struct.unpack_from("<ii", data, head)
            cols = head + 8
            row = sum({2: 4, 3: 4, 5: 8, 6: 8, 7: 1, 9: 4}[data[cols + 9 * i + 8]] for i in range(n_cols))
            cuts |= {head, cols} | {cols + 9 * i for i in range(n_cols + 1)}
            rows = cols + 9 * n_cols
            cuts |= {rows + row * k for k in range(n_rows + 1)}
            offset = rows + row * n_rows
    elif name.endswith(".mrc"):
        (nsymbt,) = struct.unpack_from("<i", data, 92)
        section = (len(data) - 1024 - nsymbt) // 4
        cuts |= set(range(0, 224, 4)) | {1024 + nsymbt + section * k for k in range(5)}
    elif name.endswith(".pkl"):
        cuts, near = cuts | {pos for _, _, pos in pickletools.genops(data)}, (0, 1)
    else:
        cuts, near = cuts | {i for i, byte in enumerate(data) if byte in b"{}[]=\n"}, (0, 1)
    return {c + d for c in cuts for d in near if 0 <= c + d < len(data)}


@pytest.mark.parametrize("reader", READERS)
def test_truncated_at_every_boundary(reader, project, tmp_path):
    name, calls = READERS[reader]
    data = project[name]
    for cut in sorted(_boundaries(name, data)):
        check(reader, put(tmp_path, project, name, data[:cut]), calls)


@pytest.mark.parametrize("reader", READERS)
def test_huge_string_and_empty_file(reader, project, tmp_path):
    name, calls = READERS[reader]
    check(reader, put(tmp_path, project, name, b""), calls)
    check(reader, put(tmp_path, project, name, project[name] + b"x" * 2_000_000), calls)
    huge = {"toml": b'data_set = "' + b"x" * 2_000_000 + b'"\n',
            "track_json": project[name].replace(b'"pind": 1,', b'"pind": "' + b"1" * 2_000_000 + b'",', 1),
            "track_pkl": pickle.dumps({**seed_tracks(), "particles": {"x" * 2_000_000: {}}}),
            "metadata": pickle.dumps({"tomo": {"x": ["9" * 2_000_000], "y": [1], "z": [1]}, "tlt": ["1" * 10**6]})}
    if reader in huge:
        check(reader, put(tmp_path, project, name, huge[reader]), calls)


# ------------------------------------------------------------------------------------------------ structured inputs
NASTY = st.one_of(
    st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5), st.none(),
    st.booleans(), st.binary(max_size=3),
    st.sampled_from([[1, 2], {}, (1,), np.float64("nan"), np.int64(-1), np.uint64(2**64 - 1), np.array([1.0, 2.0]),
                     1e308, -0.0, 2**1100, np.float32("inf"), 1 + 2j, "1", [[[[]]]]]),
)
HASHABLE = st.one_of(st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=5), st.none(), st.booleans(),
                     st.sampled_from([(1,), b"x", np.float64("nan"), np.int64(-1), 2**1100, "01", " 1", "-0"]))


@st.composite
def nasty_track_data(draw) -> tuple[dict, object]:
    """The seed's dict with 1-3 fields, ids or tables replaced by nasty values; and an image shape (often None)."""
    td = seed_tracks()
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(("projection", "table_key", "table_field")))
        if where == "projection":
            row = draw(st.sampled_from(td["projections"]))
            row[draw(st.sampled_from(("pind", "tind", "shift_x", "shift_y", "score", "occupancy")))] = draw(NASTY)
        else:
            table = td[draw(st.sampled_from(("particles", "tilts")))]
            key = draw(st.sampled_from(sorted(table, key=repr)))
            if where == "table_key":
                table[draw(HASHABLE)] = table.pop(key) if draw(st.booleans()) else dict(table[key])
            else:
                fields = ("x_3d", "y_3d", "z_3d", "psi", "angle", "defocus", "axis", "dose", "order")
                table[key][draw(st.sampled_from(fields))] = draw(NASTY)
    if draw(st.integers(0, 9)) == 0:
        td[draw(st.sampled_from(("particles", "tilts", "projections")))] = draw(NASTY)
    shape = draw(st.one_of(st.none(), NASTY, st.tuples(st.integers(-5, 2**70), st.integers(-5, 2**70))))
    return td, shape


@FUZZ
@given(case=nasty_track_data())
def test_track_data_dicts(case, tmp_path):
    td, shape = case
    TRIED["TrackSet.from_track_data"] += 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            TrackSet.from_track_data(td, shape)
        except CsptInputError:
            pass
    pkl = tmp_path / "fuzz_tracks.pkl"
    pkl.write_bytes(pickle.dumps({**td, "image_shape_yx": shape}, protocol=4))
    check("track_pkl", pkl, (trackdata.read_track_data,))
    try:
        text = json.dumps({k: ({str(i): v for i, v in t.items()} if isinstance(t, dict) else t)
                           for k, t in td.items()}, default=repr)
    except (TypeError, ValueError):  # keys JSON cannot hold
        return
    (tmp_path / "fuzz_tracks.json").write_text(text)
    check("track_json", tmp_path / "fuzz_tracks.json", (trackdata.read_track_data,))


PLAIN = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**80), 2**80), st.floats(), st.text(max_size=8),
              st.binary(max_size=8), st.sampled_from([np.float32(1.5), np.arange(3.0), np.zeros((2, 0)),
                                                      np.array(["a"]), np.array([None], dtype=object), 1j])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.tuples(inner, inner),
                            st.dictionaries(st.one_of(st.integers(-3, 5), st.text(max_size=3)), inner, max_size=4),
                            st.frozensets(st.integers(0, 5), max_size=3)),
    max_leaves=12,
)


@FUZZ
@given(key=st.sampled_from(("tomo", "x", "tlt", "order", "tilt_ids", "defocus_um", "axis_deg", "dose", "frames",
                            "particles", "tilts", "projections", "image_shape_yx", None)),
       value=PLAIN, protocol=st.integers(0, 5))
def test_plain_pickles(project, tmp_path, key, value, protocol):
    """Any plain data, anywhere in {name}.pkl (the seed's plain form) or a track pickle, pickled with any protocol."""
    meta = seed_metadata()
    tracks = pickle.loads(project["tracks.pkl"])
    if key is None:
        meta = tracks = value
    elif key == "x":
        meta["tomo"]["x"] = value
    else:
        meta[key] = tracks[key] = value
    put(tmp_path, project, "ts.pkl", pickle.dumps(meta, protocol=protocol))
    check("metadata", tmp_path / "ts.pkl", READERS["metadata"][1])
    (tmp_path / "tracks.pkl").write_bytes(pickle.dumps(tracks, protocol=protocol))
    check("track_pkl", tmp_path / "tracks.pkl", READERS["track_pkl"][1])


CISTEM_EXTREMES = {cistem.INTEGER: (0, -1, 1, 7, 2**31 - 1, -(2**31)), cistem.UINT: (0, 1, 2**32 - 1),
                   cistem.FLOAT: (0.0, -1.0, 90.0, 1e30, 3.4e38, -3.4e38, 1e-45, np.nan, np.inf)}


@FUZZ
@given(data=st.data())
def test_cistem_column_values(project, tmp_path, data):
    """Well-formed .cistem pairs whose values are extreme: ids out of range, duplicates, NaN, zero pixel size..."""
    for name in ("ts_r01.cistem", "ts_r01_extended.cistem"):  # valid again: an earlier example changed them
        folder = put(tmp_path, project, name, project[name]).parent
    tables = {"main": cistem.read_cistem(folder / "ts_r01.cistem")}
    tables["particles"], tables["tilts"] = cistem.read_extended(folder / "ts_r01_extended.cistem")
    changed = data.draw(st.sampled_from(sorted(tables)), label="table")
    packed = {}
    for name, table in tables.items():
        arrays = [a.copy() for a in table.arrays]
        if name == changed:
            for _ in range(data.draw(st.integers(1, 3))):
                col = data.draw(st.integers(0, len(arrays) - 1))
                row = data.draw(st.integers(0, len(arrays[col]) - 1))
                choices = CISTEM_EXTREMES[table.types[col]] + (arrays[col][data.draw(st.integers(0, len(table) - 1))],)
                arrays[col][row] = data.draw(st.sampled_from(choices))
        header = np.array(list(zip(table.codes, table.types)), dtype=[("code", "<i8"), ("type", "i1")])
        rows = np.empty(len(table), [(f"c{i}", cistem._FIXED_DTYPES[t]) for i, t in enumerate(table.types)])
        for i, values in enumerate(arrays):
            rows[f"c{i}"] = values
        packed[name] = struct.pack("<ii", len(table.codes), len(table)) + header.tobytes() + rows.tobytes()
    (folder / "ts_r01.cistem").write_bytes(packed["main"])
    (folder / "ts_r01_extended.cistem").write_bytes(
        struct.pack("<q", cistem.PARTICLES_BLOCK) + packed["particles"]
        + struct.pack("<q", cistem.TILTS_BLOCK) + packed["tilts"])
    check("cistem", folder / "ts_r01.cistem", (_parameters,))


#: MRC header fields: byte offset, struct format, values to try
MRC_FIELDS = {"nx": (0, "<i"), "ny": (4, "<i"), "nz": (8, "<i"), "mode": (12, "<i"), "mx": (28, "<i"),
              "mz": (36, "<i"), "cella_x": (40, "<f"), "mapc": (64, "<i"), "ispg": (88, "<i"), "nsymbt": (92, "<i"),
              "map": (208, "<I"), "machst": (212, "<I"), "nlabl": (220, "<i")}
MRC_VALUES = {"<i": (0, -1, 1, 2, 3, 4, 6, 12, 16, 101, 2**31 - 1, -(2**31), 10**6), "<I": (0, 0x4144, 0x1111,
              0x44440000, 0x11110000, 2**32 - 1), "<f": (0.0, -1.0, np.nan, np.inf, 1e38, 1.35)}


@FUZZ
@given(fields=st.lists(st.sampled_from(sorted(MRC_FIELDS)), min_size=1, max_size=3), data=st.data(),
       keep=st.one_of(st.none(), st.integers(0, 2400)))
def test_mrc_header_fields(project, tmp_path, fields, data, keep):
    """Corrupt modes, sizes, extended-header lengths, byte orders; optionally truncated."""
    stack = bytearray(project["ts_stack.mrc"])
    for field in fields:
        offset, fmt = MRC_FIELDS[field]
        struct.pack_into(fmt, stack, offset, data.draw(st.sampled_from(MRC_VALUES[fmt]), label=field))
    check("mrc", put(tmp_path, project, "ts_stack.mrc", bytes(stack[:keep])), READERS["mrc"][1])


@FUZZ
@given(values=st.dictionaries(st.sampled_from(sorted(PARAMS)), NASTY, min_size=1, max_size=4))
def test_parameter_values(tmp_path, values):
    """PypParameters from a dict, and the same values through a .pyp_config.toml when TOML can hold them."""
    TRIED["PypParameters"] += 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            PypParameters({**PARAMS_SEED, **values})
        except CsptInputError:
            pass
    try:
        text = tomli_w.dumps({**PARAMS_SEED, **values})
    except (TypeError, ValueError):
        return
    (tmp_path / "fuzz.toml").write_text(text, encoding="utf-8")
    check("toml", tmp_path / "fuzz.toml", READERS["toml"][1])


# ------------------------------------------------------------------------------------------------ corpus
def _corpus_builder():
    spec = importlib.util.spec_from_file_location("make_corpus", CORPUS / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build()


#: corpus reader prefix -> entry points (each must refuse the file)
CORPUS_READERS = {
    "metadata": (_metadata,), "track": (trackdata.read_track_data,), "mrc": (_stack,),
    "cistem": (cistem.read_cistem,), "extended": (cistem.read_extended,), "toml": (toml.load_params,),
}
CORPUS_FILES = sorted(p for p in CORPUS.iterdir() if p.suffix != ".py")


def test_corpus_is_what_the_script_makes():
    assert {p.name: p.read_bytes() for p in CORPUS_FILES} == _corpus_builder()


@pytest.mark.parametrize("case", CORPUS_FILES, ids=lambda p: p.name)
def test_corpus(case, tmp_path):
    """Each corpus file is refused with CsptInputError naming it, and reading it allocates at most a few MB."""
    reader = case.name.split(".")[0]
    path = tmp_path / f"input{case.suffix}"
    path.write_bytes(case.read_bytes())
    for call in CORPUS_READERS[reader]:
        assert_refused_cheaply(call, path, case.name)


def assert_refused_cheaply(call: Callable[[Path], object], path: Path, what: str) -> None:
    """``call(path)`` raises CsptInputError naming ``path`` and allocates at most 20 MB on the way."""
    tracemalloc.start()
    try:
        with pytest.raises(CsptInputError) as err, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.file == str(path), err.value
    assert peak < 20e6, f"reading {what} allocated {peak / 1e6:.0f} MB"


# ------------------------------------------------------------------------------------------------ fixed bugs
SERIES_HEADER = SERIES_STAR[:SERIES_STAR.index("p0 ")]


def _fiducial_with_point_count(project: dict[str, bytes], count: int) -> bytes:
    """The valid model with the first contour's point count (``psize``) replaced."""
    data = bytearray(project["ts.fid"])
    struct.pack_into(">i", data, data.index(b"CONT") + 4, count)
    return bytes(data)


#: inputs that once escaped the readers (ValueError/TypeError, or imodmodel allocating a 6 GB struct format)
FIXED_BUGS = {
    "series_no_rows": ("series.star", lambda _: SERIES_HEADER.encode(),
                       lambda p: star.read_particle_series_star(p, (32, 40))),
    "series_repeated_column": ("series.star",
                               lambda _: SERIES_STAR.replace("_rlnAngleRot #6", "_rlnCtfScalefactor #6").encode(),
                               lambda p: star.read_particle_series_star(p, (32, 40))),
    "poses_strings": ("poses.pkl", lambda _: pickle.dumps((np.full((1, 3, 3), "a"), np.zeros((1, 2)))),
                      cryodrgn.read_poses),
    "ctf_ragged": ("ctf.pkl", lambda _: pickle.dumps([[1.0] * 9, [1.0]]), cryodrgn.read_ctf),
    "fiducial_point_count_2e31": ("ts.fid", lambda project: _fiducial_with_point_count(project, 2**31 - 1),
                                  _fiducials),
    "fiducial_point_count_negative": ("ts.fid", lambda project: _fiducial_with_point_count(project, -5),
                                      _fiducials),
}


@pytest.mark.parametrize("case", sorted(FIXED_BUGS))
def test_fixed_reader_bugs(project, tmp_path, case):
    """Each input is refused with CsptInputError naming the file, allocating at most a few MB."""
    name, make, call = FIXED_BUGS[case]
    assert_refused_cheaply(call, put(tmp_path, project, name, make(project)), case)


def test_truncated_fiducial_model_does_not_hang(project, tmp_path):
    """Run in a subprocess: the reader must refuse a truncated model within seconds (imodmodel alone loops for ever)."""
    path = put(tmp_path, project, "ts.fid", project["ts.fid"][:-4])  # the final IEOF never arrived
    code = ("from napari_cspt2d.io import imod\nfrom napari_cspt2d.errors import CsptInputError\n"
            f"try:\n    imod.read_fiducial_model({str(path)!r}, tilts=[0.0] * 4)\nexcept CsptInputError:\n    pass\n")
    subprocess.run([sys.executable, "-c", code], timeout=5, check=True)
