"""Build the fuzz corpus: the nastiest inputs found while fuzzing the readers, one small file each.

Run ``python tests/fuzz_corpus/make_corpus.py`` to (re)write the files beside this script; ``test_fuzz_readers``
checks that the files on disk are exactly what :func:`build` makes and that each one is refused with a
``CsptInputError`` naming the file, without allocating more than a few MB.

File names are ``<reader>.<case>.<suffix>``; ``<reader>`` selects the reader in ``test_fuzz_readers.CORPUS_READERS``.
Every case is hand-made from the documented formats (nothing is copied from real data).
"""

from __future__ import annotations

import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------ pickles
def _str(text: str) -> bytes:
    """SHORT_BINUNICODE."""
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def _global(module: str, name: str) -> bytes:
    """Protocol-2 GLOBAL."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _int(value: int) -> bytes:
    """LONG1/LONG4 of any Python int."""
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return (b"\x8a" + bytes([len(raw)]) if len(raw) < 256 else b"\x8b" + struct.pack("<i", len(raw))) + raw


def _dict(*pairs: tuple[bytes, bytes]) -> bytes:
    return b"}(" + b"".join(k + v for k, v in pairs) + b"u"


_TOMO = _dict((_str("x"), b"]K\x04a"), (_str("y"), b"]K\x04a"), (_str("z"), b"]K\x02a"))
_EMPTY_TRACKS = ((_str("tilts"), b"}"), (_str("projections"), b"]"))


def _metadata_with(value: bytes) -> bytes:
    """``{name}.pkl`` with a valid 'tomo' entry and ``frames`` set to the given opcodes."""
    return b"\x80\x02" + _dict((_str("tomo"), _TOMO), (_str("frames"), value)) + b"."


def _pickles() -> dict[str, bytes]:
    ndarray, dtype_o = _global("numpy", "ndarray"), _global("numpy", "dtype") + _str("O") + b"\x85R"
    reconstruct = _global("numpy._core.multiarray", "_reconstruct")
    return {
        # the C unpickler sizes its memo array from the index: 5 bytes asked for 4 GB
        "metadata.memo_index_2e8.pkl": b"\x80\x02]r\xf9\x00\xc6\x0e.",
        "metadata.memo_index_max.pkl": b"\x80\x02]r\xff\xff\xff\xff.",
        # allowed callables fed with data that is not in the pickle
        "metadata.set_of_range.pkl": _metadata_with(
            _global("builtins", "set") + _global("builtins", "range") + _int(10**12) + b"\x85R\x85R"),
        "metadata.frozenset_of_range.pkl": _metadata_with(
            _global("builtins", "frozenset") + _global("builtins", "range") + _int(10**12) + b"\x85R\x85R"),
        "metadata.bytearray_of_int.pkl": _metadata_with(_global("builtins", "bytearray") + _int(2**40) + b"\x85R"),
        "metadata.ndarray_call.pkl": _metadata_with(ndarray + b"(" + _int(10**9) + b"\x85" + dtype_o + b"tR"),
        "metadata.reconstruct_huge.pkl": _metadata_with(
            reconstruct + b"(" + ndarray + _int(10**9) + b"\x85" + dtype_o + b"tR"),
        "metadata.setstate_huge.pkl": _metadata_with(
            reconstruct + b"(" + ndarray + b"K\x00\x85C\x01btR"
            + b"(K\x01" + _int(10**9) + b"\x85" + dtype_o + b"\x89]tb"),
        "metadata.bytearray8_2e40.pkl": b"\x80\x05\x96" + struct.pack("<Q", 2**40) + b"xyz.",
        # BUILD on a shared callable would change it for the rest of the process
        "metadata.build_on_function.pkl": _metadata_with(
            _global("_codecs", "encode") + b"N}" + _str("__defaults__") + _str("rot13") + b"\x85s\x86b"),
        "metadata.inst_opcode.pkl": b"(" + b"I5\n" + b"ibuiltins\nbytearray\n.",
        # hashing a deeply nested tuple used to overflow the C stack (this one is shallow enough to be safe)
        "track.tuple_key_depth_150.pkl": b"\x80\x02" + _dict(
            (_str("particles"), b"})" + b"\x85" * 150 + b"}s"), *_EMPTY_TRACKS) + b".",
        "track.int_key_4400_digits.pkl": b"\x80\x02" + _dict(
            (_str("particles"), b"}" + _int(10**4400) + b"}s"), *_EMPTY_TRACKS) + b".",
        "track.shift_2e1100.pkl": b"\x80\x02" + _dict(
            (_str("particles"), b"}K\x01}(" + b"".join(_str(k) + b"G" + struct.pack(">d", 0.0)
                                                    for k in ("x_3d", "y_3d", "z_3d")) + b"us"),
            (_str("tilts"), b"}K\x00}" + _str("angle") + b"K\x00ss"),
            (_str("projections"), b"]}(" + _str("pind") + b"K\x01" + _str("tind") + b"K\x00" + _str("shift_x")
             + _int(2**1100) + _str("shift_y") + b"K\x00ua")) + b".",
        "track.shape_deep_list.pkl": b"\x80\x02" + _dict(
            (_str("particles"), b"}"), *_EMPTY_TRACKS, (_str("image_shape_yx"), b"]" * 300 + b"a" * 299)) + b".",
    }


# ------------------------------------------------------------------------------------------------ binaries, text
def _mrc(nx: int, ny: int, nz: int, *, nsymbt: int = 0, mode: int = 2, data_bytes: int | None = None) -> bytes:
    """An MRC2014 header (little-endian) followed by ``data_bytes`` zero bytes (default: what the header says)."""
    header = bytearray(1024)
    struct.pack_into("<4i", header, 0, nx, ny, nz, mode)
    struct.pack_into("<3i", header, 28, nx, ny, nz)
    struct.pack_into("<3f", header, 40, float(nx), float(ny), float(nz))
    struct.pack_into("<3i", header, 64, 1, 2, 3)
    struct.pack_into("<ii", header, 88, 0, nsymbt)
    header[208:216] = b"MAP DA\x00\x00"
    size = nx * ny * nz * 4 if data_bytes is None else data_bytes
    return bytes(header) + bytes(size)


def _cistem_header(n_rows: int) -> bytes:
    """A .cistem header with one FLOAT column (X_SHIFT, code 8)."""
    return struct.pack("<ii", 1, n_rows) + struct.pack("<qb", 8, 3)


def _others() -> dict[str, bytes]:
    return {
        "mrc.nsymbt_2e31.mrc": _mrc(2, 2, 1, nsymbt=2**31 - 1),
        "mrc.nsymbt_negative.mrc": _mrc(2, 2, 1, nsymbt=-1024),
        "mrc.nz_zero.mrc": _mrc(4, 4, 0),
        "mrc.data_truncated.mrc": _mrc(8, 8, 2, data_bytes=300),
        "cistem.rows_2e31.cistem": _cistem_header(2**31 - 1) + bytes(64),
        "cistem.rows_negative.cistem": _cistem_header(-1),
        "cistem.nan_shift.cistem": _cistem_header(1) + struct.pack("<f", float("nan")),
        "extended.rows_2e31.cistem": struct.pack("<q", 15) + _cistem_header(2**31 - 1) + bytes(16),
        "extended.block_code.cistem": struct.pack("<q", 2**62) + _cistem_header(0),
        "track.nested_arrays_1100.json": b"[" * 1100 + b"]" * 1100,
        "track.top_level_string.json": b'"format"',
        "track.id_twice.json": b'{"particles": {"1": {"x_3d": 0, "y_3d": 0, "z_3d": 0}, "01": {}}, "tilts": {}, '
                               b'"projections": []}',
        "track.key_twice.json": b'{"particles": {}, "particles": {}, "tilts": {}, "projections": []}',
        "track.float_1e999.json": b'{"particles": {"1": {"x_3d": 1e999, "y_3d": 0, "z_3d": 0}}, "tilts": {}, '
                                  b'"projections": []}',
        "toml.nested_arrays_1100.toml": b"refine_rhref = " + b"[" * 1100 + b"]" * 1100 + b"\n",
        "toml.not_utf8.toml": b"data_set = \"\xff\xfe\"\n",
        "toml.nan_pixel.toml": b"scope_pixel = nan\nextract_box = inf\n",
    }


def build() -> dict[str, bytes]:
    """Every corpus file: name -> content."""
    return {**_pickles(), **_others()}


def main() -> None:
    for old in HERE.iterdir():
        if old.suffix != ".py":
            old.unlink()
    for name, data in build().items():
        (HERE / name).write_bytes(data)
    print(f"wrote {len(build())} files, {sum(map(len, build().values()))} bytes, to {HERE}")


if __name__ == "__main__":
    main()
