"""Atomic file writes: write to a temporary file in the same folder, flush, fsync, then rename.

A reader never sees a file with its final name half-written, even if the process is killed mid-write. A killed
write leaves its temporary file (``.{name}.<random>.part`` beside ``name``); :func:`remove_stale_temp_files` removes
those of a project folder when a run starts.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO


#: Suffix of the temporary files of :func:`atomic_path` (their names are ``.{final name}.<random>{TEMP_SUFFIX}``).
TEMP_SUFFIX = ".part"
#: A temporary file not modified for this long (s) before a run started belongs to no live writer.
STALE_TEMP_AGE_S = 60.0
_TEMP_NAME = re.compile(rf"\..+\.[a-z0-9_]{{8}}{re.escape(TEMP_SUFFIX)}")  # mkstemp's 8 random characters


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on failure removed.

    Use this for libraries that insist on opening the file themselves (e.g. ``mrcfile.new``)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=TEMP_SUFFIX, dir=final.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; final files get the usual permissions
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", **kwargs) -> Iterator[IO]:
    """Open a temporary file for writing; it replaces ``path`` only when the ``with`` block ends without error."""
    if not any(m in mode for m in "wa"):
        raise ValueError(f"atomic_open is for writing, got mode {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode.replace("a", "w"), **kwargs) as fh:
        yield fh
        fh.flush()


def remove_stale_temp_files(folder: str | os.PathLike[str], *, started: float | None = None,
                            min_age_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Remove the temporary files that writes killed before their rename left anywhere under ``folder``: the
    ``.{name}.<random>.part`` files of :func:`atomic_path` last modified at least ``min_age_s`` seconds before
    ``started`` (epoch seconds, default now), so that the files of writers still at work are kept. Returns the
    removed paths."""
    cutoff = (time.time() if started is None else started) - min_age_s
    removed = []
    for path in Path(folder).rglob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):  # another cleanup, or its writer, got there first
            if (_TEMP_NAME.fullmatch(path.name) and path.is_file() and not path.is_symlink()
                    and path.stat().st_mtime < cutoff):
                path.unlink()
                removed.append(path)
    return removed
