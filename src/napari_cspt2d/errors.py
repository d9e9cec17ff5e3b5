"""The project's typed errors.

Every reader and public function reports bad input with :class:`CsptInputError`, which names the file (when there is
one), the field and what was expected, so a user can fix the input without reading a traceback.
"""

from __future__ import annotations

import os
import warnings
from typing import Any


class CsptError(Exception):
    """Base class of every error raised on purpose by napari-cspt2d."""


class CsptInputError(CsptError, ValueError):
    """Bad input: a file, a field of a file or an argument is not what was expected.

    Parameters
    ----------
    message:
        What is wrong, in words.
    file:
        Path of the offending file, if any.
    field:
        Name of the offending field, column, key or argument, if any.
    expected:
        What would have been accepted, if it can be said briefly.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | os.PathLike[str] | None = None,
        field: str | None = None,
        expected: str | None = None,
    ) -> None:
        self.file = None if file is None else os.fspath(file)
        self.field = field
        self.expected = expected
        self.reason = message
        parts = []
        if self.file is not None:
            parts.append(f"{self.file}")
        if field is not None:
            parts.append(f"field '{field}'")
        prefix = ": ".join(parts)
        text = f"{prefix}: {message}" if prefix else message
        if expected is not None:
            text += f" (expected {expected})"
        super().__init__(text)


class CsptRunError(CsptError, RuntimeError):
    """A processing step failed; the message says which step and where its log is."""

    def __init__(self, message: str, *, log_path: str | os.PathLike[str] | None = None) -> None:
        self.log_path = None if log_path is None else os.fspath(log_path)
        text = message if self.log_path is None else f"{message} (log: {self.log_path})"
        super().__init__(text)


class CsptCancelled(CsptError):
    """Raised inside a worker when the user cancelled the run."""


class CsptInputWarning(UserWarning):
    """Suspicious but usable input (e.g. particle ids that are not sequential)."""


def warn_input(message: str, *, file: Any = None, field: str | None = None) -> None:
    """Emit a :class:`CsptInputWarning` naming file and field like :class:`CsptInputError` does."""
    prefix = ": ".join(p for p in (None if file is None else os.fspath(file), field and f"field '{field}'") if p)
    warnings.warn(f"{prefix}: {message}" if prefix else message, CsptInputWarning, stacklevel=3)
