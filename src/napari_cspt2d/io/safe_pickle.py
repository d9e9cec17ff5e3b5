"""Restricted unpickling: plain containers, numbers, strings and numpy arrays only.

``pickle.load`` runs whatever a pickle asks for (``os.system`` included), so every pickle this project reads
(``{name}.pkl`` metadata, the seed's track-data pickles, CTF pickles) goes through :func:`safe_load`. A pickle may
refer only to the globals in :data:`ALLOWED_GLOBALS`: a few builtin containers and the numpy functions that pickled
arrays, dtypes and scalars need (under both the numpy 1 ``numpy.core`` and numpy 2 ``numpy._core`` names). Anything
else raises :class:`~napari_cspt2d.errors.CsptInputError` naming the file and the refused global, before that
global is imported or called. pandas objects (pyp writes its own ``.pkl`` files with pandas) are refused too.
"""

from __future__ import annotations

import builtins
import codecs
import importlib
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CsptInputError

__all__ = ["ALLOWED_GLOBALS", "SafeUnpickler", "safe_load", "safe_loads"]

_BUILTINS = ("set", "frozenset", "complex", "bytearray", "slice", "range")
_NUMPY_MULTIARRAY = ("_reconstruct", "scalar")
_NUMPY_NUMERIC = ("_frombuffer",)

#: Every ``(module, name)`` a pickle may refer to.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [(mod, name) for mod in ("builtins", "__builtin__") for name in _BUILTINS]
    + [(f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in _NUMPY_MULTIARRAY]
    + [(f"numpy.{core}.numeric", name) for core in ("core", "_core") for name in _NUMPY_NUMERIC]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")]
)


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
    if module in ("builtins", "__builtin__"):
        return getattr(builtins, name)
    if module == "numpy":
        return getattr(np, name)
    if module == "_codecs":
        return _latin1_encode
    sub = module.rsplit(".", 1)[1]  # multiarray / numeric
    return getattr(_numpy_core_module(sub), name)


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS`; ``source`` names the file in errors."""

    def __init__(self, file: io.BufferedIOBase, source: str | os.PathLike[str] | None = None) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise CsptInputError(
                f"refers to the global '{module}.{name}', which is refused",
                file=self.source,
                field="pickle",
                expected="only plain dicts/lists/tuples/sets, numbers, strings and numpy arrays",
            )
        return _resolve(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise CsptInputError("uses persistent ids", file=self.source, field="pickle", expected="a plain pickle")


def safe_loads(data: bytes, source: str | os.PathLike[str] | None = None) -> Any:
    """Unpickle ``data`` with :class:`SafeUnpickler`; a corrupt pickle raises :class:`CsptInputError`."""
    try:
        return SafeUnpickler(io.BytesIO(data), source).load()
    except CsptInputError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, UnicodeDecodeError, OverflowError, MemoryError) as exc:
        raise CsptInputError(f"is not a readable pickle ({type(exc).__name__}: {exc})", file=source,
                             field="pickle") from exc


def safe_load(path: str | os.PathLike[str]) -> Any:
    """Read a pickle file with :func:`safe_loads`; a missing file raises :class:`CsptInputError`."""
    path = Path(path)
    if not path.is_file():
        raise CsptInputError("does not exist", file=path, expected="a pickle file")
    return safe_loads(path.read_bytes(), path)
