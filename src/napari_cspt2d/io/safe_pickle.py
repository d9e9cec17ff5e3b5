"""Restricted unpickling: plain containers, numbers, strings and numpy arrays (and, where a format needs them, pandas
DataFrames).

``pickle.load`` runs whatever a pickle asks for (``os.system`` included), so every pickle this project reads
(``{name}.pkl`` metadata, the seed's track-data pickles, CTF pickles) goes through :func:`safe_load`. A pickle may
refer only to the globals in :data:`ALLOWED_GLOBALS`: a few builtin containers and the numpy functions that pickled
arrays, dtypes and scalars need (under both the numpy 1 ``numpy.core`` and numpy 2 ``numpy._core`` names). Anything
else raises :class:`~napari_cspt2d.errors.CsptInputError` naming the file and the refused global, before that
global is imported or called.

DataFrames (``dataframes=True``; pyp's ``{name}.pkl`` is a dict of them, :mod:`napari_cspt2d.io.metadata`): the
globals of :data:`DATAFRAME_GLOBALS` are allowed too, which are exactly what pandas 2 and 3 pickle a DataFrame of
numeric or object columns with (a DataFrame is made empty by ``NEWOBJ`` and filled by ``BUILD`` with a dict holding a
``BlockManager`` of blocks made by ``_unpickle_block``, its axes by ``_new_Index``). Each is checked before it is
called: ``NEWOBJ`` only of ``DataFrame`` and without arguments; ``BUILD`` of a DataFrame only with pandas' own state
keys, a ``BlockManager`` and plain values; ``_new_Index`` only for ``Index``/``RangeIndex`` with their pickled
keys and a numpy array or integers; ``_unpickle_block`` only on a numpy array with a slice or integer placement;
``BlockManager`` only on those blocks and indexes; ``slice`` only of integers (so it cannot nest). Extension
arrays (categoricals, Arrow strings), Series and other pandas classes are refused.

Nothing a pickle declares may allocate more than the pickle's own size (a few bytes must not become gigabytes): the
unpickler is the pure-Python one, whose memo is a dict (the C unpickler sizes its memo array from whatever index a
pickle names); array shapes and ``BYTEARRAY8`` lengths are checked before anything is allocated; ``set``,
``frozenset``, ``bytes`` and ``bytearray`` may only be called on data already in the pickle (not on
``range(10**12)``); ``numpy.dtype`` only with ``copy=True``; ``BUILD`` may only set the state of numpy arrays and
dtypes, an array's data must fill it exactly (a list of one object per element for object dtypes) and a dtype's
state must give the flags and size numpy itself gives that dtype (numpy trusts both, and crashes otherwise); the
opcodes that instantiate classes (``INST``, ``OBJ``, ``NEWOBJ``, ``NEWOBJ_EX``), which plain data never needs, are
refused. Tuples may nest at most :data:`MAX_TUPLE_DEPTH` deep: hashing a deeper one (as a dict key or set
item) overflows the C stack and kills the process.
"""

from __future__ import annotations

import builtins
import codecs
import importlib
import io
import math
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CsptInputError

__all__ = ["ALLOWED_GLOBALS", "DATAFRAME_GLOBALS", "SafeUnpickler", "safe_load", "safe_loads"]

_BUILTINS = ("set", "frozenset", "complex", "bytes", "bytearray", "range")  # not slice: hashable, so nestable, in 3.12
_NUMPY_MULTIARRAY = ("_reconstruct", "scalar")
_NUMPY_NUMERIC = ("_frombuffer",)

#: Every ``(module, name)`` a pickle may refer to.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [(mod, name) for mod in ("builtins", "__builtin__") for name in _BUILTINS]
    + [(f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in _NUMPY_MULTIARRAY]
    + [(f"numpy.{core}.numeric", name) for core in ("core", "_core") for name in _NUMPY_NUMERIC]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")]
)
#: What a DataFrame pickle may refer to besides :data:`ALLOWED_GLOBALS` (pandas 2 names, then pandas 3's).
DATAFRAME_GLOBALS: frozenset[tuple[str, str]] = frozenset([
    ("pandas.core.frame", "DataFrame"), ("pandas", "DataFrame"),
    ("pandas.core.indexes.base", "Index"), ("pandas", "Index"),
    ("pandas.core.indexes.range", "RangeIndex"), ("pandas", "RangeIndex"),
    ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.internals.managers", "BlockManager"),
    ("pandas._libs.internals", "_unpickle_block"),
    ("builtins", "slice"),
])
_FRAME_STATE_KEYS = frozenset({"_mgr", "_typ", "_metadata", "attrs", "_attrs", "_flags"})
_INDEX_KEYS = {"Index": frozenset({"data", "name", "dtype"}),
               "RangeIndex": frozenset({"start", "stop", "step", "name"})}


def _numpy_core_module(sub: str) -> Any:
    """``numpy._core.<sub>`` (numpy 2) or ``numpy.core.<sub>`` (numpy 1), without numpy 2's deprecation warning."""
    try:
        return importlib.import_module(f"numpy._core.{sub}")
    except ImportError:  # pragma: no cover - numpy 1.x
        return importlib.import_module(f"numpy.core.{sub}")


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes`` (latin-1 only: no codec lookups by name)."""
    if encoding.replace("-", "").lower() != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


def _resolve(module: str, name: str) -> Any:
    if module.startswith("pandas"):
        return getattr(importlib.import_module(module), name)
    if module in ("builtins", "__builtin__"):
        return getattr(builtins, name)
    if module == "numpy":
        return getattr(np, name)
    if module == "_codecs":
        return _latin1_encode
    sub = module.rsplit(".", 1)[1]  # multiarray / numeric
    return getattr(_numpy_core_module(sub), name)


_MATERIALIZED = (list, tuple, set, frozenset, str, bytes, bytearray)
#: Deepest tuple nesting a pickle may build.
MAX_TUPLE_DEPTH = 100
_RECONSTRUCT = _numpy_core_module("multiarray")._reconstruct


class SafeUnpickler(pickle._Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS`; ``source`` names the file in errors, ``size`` (bytes
    of the pickle) bounds what it may allocate (see the module docstring)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: io.BufferedIOBase, source: str | os.PathLike[str] | None = None,
                 size: int | None = None, *, dataframes: bool = False) -> None:
        super().__init__(file)
        self.source = source
        self.allowed = ALLOWED_GLOBALS | DATAFRAME_GLOBALS if dataframes else ALLOWED_GLOBALS
        self._pandas = _pandas_callables() if dataframes else {}
        if size is None:  # a BytesIO or a real file
            size = len(file.getbuffer()) if hasattr(file, "getbuffer") else os.fstat(file.fileno()).st_size
        self.size = size
        self._tuple_depth: dict[int, int] = {}  # id of each tuple built -> its nesting depth

    def _refuse(self, what: str) -> CsptInputError:
        frames = " (and pandas DataFrames of numbers or strings)" if self._pandas else ""
        return CsptInputError(what, file=self.source, field="pickle",
                              expected=f"only plain dicts/lists/tuples/sets, numbers, strings and numpy arrays{frames}")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise self._refuse(f"refers to the global '{module}.{name}', which is refused")
        return _resolve(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise CsptInputError("uses persistent ids", file=self.source, field="pickle", expected="a plain pickle")

    def _check_array(self, shape: Any, dtype: Any) -> None:
        """Refuse an array larger than the pickle could hold (object arrays: one element per pickle byte)."""
        try:
            count, dtype = math.prod(int(n) for n in shape), np.dtype(dtype)
        except (TypeError, ValueError, OverflowError) as exc:
            raise pickle.UnpicklingError(f"malformed array state ({exc})") from None
        if (count if dtype.hasobject else count * max(dtype.itemsize, 1)) > self.size:
            raise self._refuse(f"declares an array of {count} {dtype} elements, more than the {self.size}-byte "
                               "pickle can hold")

    def load_reduce(self) -> None:
        func, args = self.stack[-2], self.stack[-1]
        if func is np.ndarray:
            raise self._refuse("calls numpy.ndarray directly (numpy pickles arrays through _reconstruct)")
        if func is _RECONSTRUCT:
            if len(args) != 3 or args[0] is not np.ndarray:
                raise self._refuse("calls numpy's _reconstruct with unexpected arguments")
            self._check_array(args[1], args[2])
        if func is np.dtype and (len(args) != 3 or args[2] != 1):  # numpy pickles dtype(obj, align, copy=True)
            raise self._refuse("calls numpy.dtype without copy=True (that returns numpy's shared dtype objects)")
        consumer = any(func is kind for kind in (set, frozenset, bytes, bytearray))
        if consumer and args and not isinstance(args[0], _MATERIALIZED):
            raise self._refuse(f"calls {func.__name__}() on a {type(args[0]).__name__}")
        if func is slice and not (isinstance(args, tuple) and 1 <= len(args) <= 3
                                  and all(a is None or type(a) is int for a in args)):
            raise self._refuse("calls slice() on something other than integers")
        if any(func is f for f in self._pandas.values()):
            self._check_pandas_call(func, args)
        pickle._Unpickler.load_reduce(self)

    def _check_pandas_call(self, func: Any, args: Any) -> None:
        """The pandas reconstructors, only with the arguments a DataFrame pickle gives them (module docstring)."""
        pd = self._pandas
        if not isinstance(args, tuple):
            raise self._refuse("calls a pandas reconstructor without an argument tuple")
        if func is pd["DataFrame"] or func is pd["Index"] or func is pd["RangeIndex"]:
            raise self._refuse(f"calls pandas' {func.__name__} directly (pandas pickles it otherwise)")
        if func is pd["_new_Index"]:
            if len(args) != 2 or not isinstance(args[1], dict):
                raise self._refuse("calls pandas' _new_Index with unexpected arguments")
            cls, state = args
            kind = next((k for k in _INDEX_KEYS if cls is pd[k]), None)
            if kind is None or not set(state) <= _INDEX_KEYS[kind]:
                raise self._refuse(f"calls pandas' _new_Index for {getattr(cls, '__name__', cls)!r} with keys "
                                   f"{sorted(map(str, state))}")
            if state.get("name") is not None and not isinstance(state["name"], (str, int)):
                raise self._refuse("gives a pandas index a name that is not a string or integer")
            if kind == "Index" and not (isinstance(state.get("data"), np.ndarray) and state["data"].ndim == 1
                                        and isinstance(state.get("dtype", state["data"].dtype), np.dtype)):
                raise self._refuse("gives a pandas Index data that is not a 1-D numpy array")
            if kind == "RangeIndex" and not all(type(state.get(k, 0)) is int for k in ("start", "stop", "step")):
                raise self._refuse("gives a pandas RangeIndex bounds that are not integers")
        elif func is pd["_unpickle_block"]:
            if (len(args) != 3 or not isinstance(args[0], np.ndarray) or args[0].ndim != 2 or type(args[2]) is not int
                    or not (isinstance(args[1], slice) or (isinstance(args[1], np.ndarray)
                                                           and args[1].dtype.kind in "iu"))):
                raise self._refuse("calls pandas' _unpickle_block with unexpected arguments")
        elif func is pd["BlockManager"]:
            blocks, axes = args if len(args) == 2 else (None, None)
            if not (isinstance(blocks, (tuple, list)) and all(isinstance(b, pd["Block"]) for b in blocks)
                    and isinstance(axes, (tuple, list)) and all(isinstance(a, pd["Index"]) for a in axes)):
                raise self._refuse("calls pandas' BlockManager with unexpected arguments")

    def load_newobj(self) -> None:
        args, cls = self.stack[-1], self.stack[-2]
        if not (self._pandas and cls is self._pandas["DataFrame"] and args == ()):
            self.load_refused()
        pickle._Unpickler.load_newobj(self)

    def load_build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]
        if self._pandas and type(inst) is self._pandas["DataFrame"]:
            self._check_frame_state(state)
            pickle._Unpickler.load_build(self)
            return
        if not isinstance(inst, (np.ndarray, np.dtype)):
            raise self._refuse(f"sets the state of a {type(inst).__name__}")
        if isinstance(inst, np.ndarray):
            self._check_array_state(state)
        pickle._Unpickler.load_build(self)
        if isinstance(inst, np.dtype):
            self._check_dtype(inst)

    def _check_dtype(self, dtype: np.dtype) -> None:
        """A dtype whose pickled state set flags or a layout numpy would not give it (arrays of such dtypes crash
        the process) is refused; so are structured dtypes with object fields, which no format here needs."""
        try:
            if dtype.names is not None:
                fields = [dtype.fields[n] for n in dtype.names]
                if any(f[0].hasobject for f in fields):
                    raise self._refuse("declares a structured dtype with object fields")
                ref = np.dtype({"names": list(dtype.names), "formats": [f[0] for f in fields],
                                "offsets": [f[1] for f in fields], "itemsize": dtype.itemsize},
                               align=bool(dtype.flags & 0x80))
            elif dtype.subdtype is not None:
                ref = np.dtype(dtype.subdtype)
            else:
                ref = np.dtype(dtype.str)
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            raise self._refuse(f"declares a malformed dtype ({exc})") from None
        if (dtype.flags, dtype.itemsize, dtype.hasobject) != (ref.flags, ref.itemsize, ref.hasobject):
            raise self._refuse(f"declares a dtype with flags {dtype.flags} and size {dtype.itemsize} where numpy "
                               f"gives {ref.flags} and {ref.itemsize}")

    def _check_array_state(self, state: Any) -> None:
        """An array's state ``([version,] shape, dtype, is_fortran, data)``: ``data`` exactly fills the array, a
        list of one object per element for object dtypes (numpy trusts a list's length there: a short one crashes
        the process)."""
        if not (isinstance(state, tuple) and len(state) in (4, 5)):
            raise self._refuse("sets an array's state to something numpy does not pickle")
        shape, dtype, data = state[-4], state[-3], state[-1]
        self._check_array(shape, dtype)
        count, dtype = math.prod(int(n) for n in shape), np.dtype(dtype)
        if dtype.hasobject:
            if not (isinstance(data, list) and len(data) == count):
                raise self._refuse(f"gives an object array of {count} elements "
                                   f"{len(data) if isinstance(data, list) else type(data).__name__} values")
        elif not (isinstance(data, (bytes, bytearray)) and len(data) == count * dtype.itemsize):
            raise self._refuse(f"gives an array of {count * dtype.itemsize} bytes "
                               f"{len(data) if isinstance(data, (bytes, bytearray)) else type(data).__name__} bytes")

    def load_bytearray8(self) -> None:
        (size,) = struct.unpack("<Q", self.read(8))
        if size > self.size:
            raise self._refuse(f"declares a {size}-byte bytearray, larger than the {self.size}-byte pickle")
        data = self.read(size)
        if len(data) != size:
            raise pickle.UnpicklingError("pickle data was truncated")
        self.append(bytearray(data))

    def _check_tuple(self) -> None:
        """Record the nesting depth of the tuple just built (ids of tuples freed since are overwritten when reused)."""
        built = self.stack[-1]
        depth = 1 + max((self._tuple_depth.get(id(t), 1) for t in built if type(t) is tuple), default=0)
        if depth > MAX_TUPLE_DEPTH:
            raise self._refuse(f"nests tuples more than {MAX_TUPLE_DEPTH} deep")
        self._tuple_depth[id(built)] = depth

    def _check_frame_state(self, state: Any) -> None:
        """A DataFrame's pickled state: pandas' own keys only, a BlockManager, plain metadata."""
        pd = self._pandas
        if not (isinstance(state, dict) and set(state) <= _FRAME_STATE_KEYS and "_mgr" in state):
            keys = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
            raise self._refuse(f"sets a DataFrame's state to {keys}")
        flags = state.get("_flags", {})
        attrs = [state.get(k, {}) for k in ("attrs", "_attrs")]
        if (type(state["_mgr"]) is not pd["BlockManager"] or state.get("_typ", "dataframe") != "dataframe"
                or not isinstance(state.get("_metadata", []), list) or any(not isinstance(a, dict) for a in attrs)
                or not isinstance(flags, dict) or not set(flags) <= {"allows_duplicate_labels"}
                or not all(type(v) is bool for v in flags.values())):
            raise self._refuse("sets a DataFrame's state to values pandas does not pickle")

    def load_refused(self) -> None:
        raise self._refuse("instantiates classes (INST/OBJ/NEWOBJ opcodes), which plain data never needs")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    for _opcode in (pickle.INST, pickle.OBJ, pickle.NEWOBJ_EX):
        dispatch[_opcode[0]] = load_refused
    for _opcode in (pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3):
        dispatch[_opcode[0]] = lambda self, _load=dispatch[_opcode[0]]: (_load(self), self._check_tuple())
    del _opcode


def _pandas_callables() -> dict[str, Any]:
    """The pandas objects a DataFrame pickle refers to (and the Block class its blocks are), by short name."""
    import pandas as pd
    from pandas._libs.internals import _unpickle_block
    from pandas.core.indexes.base import _new_Index
    from pandas.core.internals.blocks import Block
    from pandas.core.internals.managers import BlockManager

    return {"DataFrame": pd.DataFrame, "Index": pd.Index, "RangeIndex": pd.RangeIndex, "_new_Index": _new_Index,
            "_unpickle_block": _unpickle_block, "BlockManager": BlockManager, "Block": Block}


def safe_loads(data: bytes, source: str | os.PathLike[str] | None = None, *, dataframes: bool = False) -> Any:
    """Unpickle ``data`` with :class:`SafeUnpickler` (``dataframes``: pandas DataFrames allowed too); a corrupt
    pickle raises :class:`CsptInputError`."""
    try:
        return SafeUnpickler(io.BytesIO(data), source, len(data), dataframes=dataframes).load()
    except CsptInputError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, UnicodeDecodeError, OverflowError, MemoryError, struct.error, RecursionError,
            AssertionError, NotImplementedError, SystemError) as exc:
        raise CsptInputError(f"is not a readable pickle ({type(exc).__name__}: {exc})", file=source,
                             field="pickle") from exc


def safe_load(path: str | os.PathLike[str], *, dataframes: bool = False) -> Any:
    """Read a pickle file with :func:`safe_loads`; a missing file raises :class:`CsptInputError`."""
    path = Path(path)
    if not path.is_file():
        raise CsptInputError("does not exist", file=path, expected="a pickle file")
    return safe_loads(path.read_bytes(), path, dataframes=dataframes)
