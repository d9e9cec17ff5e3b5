"""The restricted unpickler, through every reader that takes a pickle: nothing in a pickle runs, nothing explodes.

tests/test_trackdata.py already covers the basics (os.system refused in a track pickle, protocol-0 eval, codec
lookups, pandas, corrupt bytes, numpy/builtins allowed); this module adds: other dangerous callables (subprocess,
exec/eval, numpy.load with allow_pickle, import machinery, copyreg) reached through every pickle reader with a
marker file proving nothing ran, the opcodes that instantiate classes, state-setting abuse, and pickles that would
crash or exhaust the process (a deeply nested tuple key segfaulted CPython's hash; run in a subprocess here).
Allocation bombs through files are in tests/fuzz_corpus/ (run by test_fuzz_readers.test_corpus).
"""

from __future__ import annotations

import builtins
import copyreg
import importlib
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from test_fuzz_readers import make_project, seed_metadata, seed_tracks

from napari_cspt2d import CsptInputError
from napari_cspt2d.io.metadata import read_metadata, read_metadata_tilts
from napari_cspt2d.io.safe_pickle import MAX_TUPLE_DEPTH, safe_load, safe_loads
from napari_cspt2d.io.trackdata import read_track_data
from napari_cspt2d.model.tiltseries import TiltSeries, read_angles


class Payload:
    """Pickles as ``func(*args)``: what an attacker would put in a pickle."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker, tmp_path) -> dict[str, object]:
    """Objects whose unpickling would create ``marker``."""
    evil = tmp_path / "evil.npy"
    np.save(evil, np.array([Payload(os.system, f"touch {marker}")], dtype=object), allow_pickle=True)
    return {
        "os.system": Payload(os.system, f"touch {marker}"),
        "subprocess.Popen": Payload(subprocess.Popen, ["touch", str(marker)]),
        "subprocess.run": Payload(subprocess.run, ["touch", str(marker)]),
        "builtins.eval": Payload(builtins.eval, f"open({str(marker)!r}, 'w')"),
        "builtins.exec": Payload(builtins.exec, f"open({str(marker)!r}, 'w')"),
        "builtins.open": Payload(builtins.open, str(marker), "w"),
        "numpy.load": Payload(np.load, str(evil), None, True),  # allow_pickle=True: would run the .npy's pickle
        "importlib.import_module": Payload(importlib.import_module, "antigravity"),
        "copyreg._reconstructor": Payload(copyreg._reconstructor, Payload, object, None),
        "object array": np.array([Payload(os.system, f"touch {marker}")], dtype=object),
    }


READERS = {
    "read_metadata": read_metadata,
    "read_metadata_tilts": read_metadata_tilts,
    "read_angles": read_angles,
    "TiltSeries.open": lambda path: TiltSeries.open(path.with_name("ts_stack.mrc"), angles=path),
    "read_track_data": read_track_data,
    "safe_load": safe_load,
}


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("reader", READERS)
def test_dangerous_globals_are_refused_and_never_run(tmp_path, reader, protocol):
    make_project(tmp_path)
    marker = tmp_path / "pwned"
    meta = seed_metadata()
    for name, payload in payloads(marker, tmp_path).items():
        content = {**meta, **seed_tracks(), "frames": [{"note": payload}]}  # otherwise valid for every reader
        path = tmp_path / "ts.pkl"
        path.write_bytes(pickle.dumps(content, protocol=protocol))
        with pytest.raises(CsptInputError) as err:
            READERS[reader](path)
        assert err.value.file == str(path), name
        assert "refers to the global" in str(err.value) or "instantiates" in str(err.value), (name, err.value)
        assert not marker.exists(), f"{name} ran while {reader} read it"


@pytest.mark.parametrize("data, refused", [
    (b"(S'touch pwned'\nios\nsystem\n.", "instantiates"),  # INST: refused before the class is even looked up
    (b"(cos\nsystem\nS'touch pwned'\no.", "os.system"),  # OBJ
    (b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c\x0btouch pwned\x85R.", "os.system"),  # STACK_GLOBAL
    (b"\x80\x02cbuiltins\ncomplex\n)\x81.", "instantiates"),  # NEWOBJ, even of an allowed class
    (b"\x80\x02cbuiltins\nslice\nK\x01\x85R.", "builtins.slice"),  # hashable in Python 3.12, so nestable
    (b"\x80\x02cbuiltins\ngetattr\ncos\nsystem\n\x86R.", "builtins.getattr"),
    (b"\x80\x02P1\n.", "persistent"),
])
def test_opcodes_and_globals_beyond_plain_data(tmp_path, monkeypatch, data, refused):
    monkeypatch.chdir(tmp_path)  # a payload that ran would touch ./pwned
    with pytest.raises(CsptInputError, match=refused) as err:
        safe_loads(data, source="x.pkl")
    assert err.value.file == "x.pkl" and not (tmp_path / "pwned").exists()


def test_build_cannot_change_shared_objects():
    """BUILD on a global (a function, a type, numpy's float64 dtype) would change it for the whole process."""
    for target in (b"c_codecs\nencode\n", b"cbuiltins\nset\n", b"cnumpy\nndarray\n"):
        with pytest.raises(CsptInputError, match="sets the state"):
            safe_loads(b"\x80\x02" + target + b"N}X\x0c\x00\x00\x00__defaults__)s\x86b.")
    shared_float64 = b"cnumpy\ndtype\nX\x02\x00\x00\x00f8\x89\x89\x87R"  # dtype('f8', False, False) is numpy's own
    state = b"(K\x03X\x01\x00\x00\x00>NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    with pytest.raises(CsptInputError, match="copy=True"):
        safe_loads(b"\x80\x02" + shared_float64 + state + b".")
    assert np.dtype("f8").byteorder == "=" and np.zeros(1).dtype.str == "<f8"


def test_deeply_nested_tuple_key_does_not_crash_the_process(tmp_path):
    """Hashing a tuple nested 300 000 deep overflows the C stack (segfault); the reader must refuse it first.
    Run in a subprocess so that a regression shows as a failed test, not a dead test run."""
    path = tmp_path / "deep.pkl"
    path.write_bytes(b"\x80\x02}q\x00)" + b"\x85" * 300_000 + b"K\x01s.")  # {((((),),),): 1}
    code = textwrap.dedent(f"""
        from napari_cspt2d.errors import CsptInputError
        from napari_cspt2d.io.trackdata import read_track_data
        try:
            read_track_data({str(path)!r})
        except CsptInputError as exc:
            print("refused:", exc)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"reader crashed (exit {run.returncode}): {run.stderr[-500:]}"
    assert f"more than {MAX_TUPLE_DEPTH} deep" in run.stdout


def test_tuples_up_to_the_depth_limit_load():
    nested = ()
    for _ in range(MAX_TUPLE_DEPTH - 1):
        nested = (nested,)
    assert safe_loads(pickle.dumps({nested: 1}, protocol=2)) == {nested: 1}
    with pytest.raises(CsptInputError, match="deep"):
        safe_loads(pickle.dumps({(nested,): 1}, protocol=2))


@pytest.mark.parametrize("protocol", range(6))
def test_plain_data_loads_exactly_as_pickle_does(protocol):
    """Everything a seed script, pyp's metadata or a cryoDRGN CTF pickle may hold, under every protocol, comes back
    as plain ``pickle.loads`` gives it (trusted here: we made the bytes)."""
    obj = {
        "sets": ({1, 2}, frozenset({"a"}), set()), "bytes": (b"\x00\xff", b"", bytearray(b"ab"), bytearray()),
        "numbers": (1, -(2**70), 1.5, float("inf"), 1 - 2j, True, None),
        "arrays": [np.arange(12.0).reshape(3, 4), np.zeros((2, 3), order="F"), np.arange(3, dtype=">i4"),
                   np.array(5.0), np.array([(1, 2.0)], dtype=[("a", "<i2"), ("b", ">f8")]),
                   np.array([None, {"k": 1}], object), np.zeros((0, 3)), np.array(["abc", "d"]),
                   np.arange(4, dtype=np.float16)],
        "scalars": [np.float32(1.5), np.int64(-3), np.bool_(True), np.complex64(1j), np.str_("s")],
        (1, (2, 3)): "tuple key", 7: [[[]]],
    }
    data = pickle.dumps(obj, protocol=protocol)
    back, want = safe_loads(data), pickle.loads(data)
    assert back.keys() == want.keys()
    for key in ("sets", "bytes", "numbers", "scalars", (1, (2, 3)), 7):
        assert back[key] == want[key] and [type(v) for v in back[key]] == [type(v) for v in want[key]]
    for got, exp in zip(back["arrays"], want["arrays"]):
        assert (got.dtype, got.shape, got.strides) == (exp.dtype, exp.shape, exp.strides)
        assert got.tolist() == exp.tolist()
