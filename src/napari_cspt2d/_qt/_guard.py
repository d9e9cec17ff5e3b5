"""A widget never crashes napari: every slot, key binding and layer callback reports its errors as a notification."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from napari.utils.notifications import show_error

from ..errors import CsptError

__all__ = ["report_errors"]

_log = logging.getLogger("napari_cspt2d")
F = TypeVar("F", bound=Callable[..., Any])


def report_errors(what: str) -> Callable[[F], F]:
    """Decorate a callback so that an exception becomes ``show_error("<what>: <message>")`` instead of propagating.

    Expected errors (:class:`CsptError`, which name file, field and expectation) are shown as they are; anything else
    is shown with its type and logged with its traceback."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            except CsptError as exc:
                show_error(f"{what}: {exc}")
            except Exception as exc:  # noqa: BLE001 - the point is to keep napari running
                _log.exception("%s failed", what)
                show_error(f"{what} failed: {type(exc).__name__}: {exc}")
            return None

        return wrapper  # type: ignore[return-value]

    return decorate
