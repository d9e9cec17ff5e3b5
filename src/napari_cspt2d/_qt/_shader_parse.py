"""vispy's shader-variable parsing without its quadratic comment-stripping regular expression.

Every time vispy sets a program's shaders (a visual's first draw, and whenever its shader code changes) it parses the
source for its variables (``vispy.gloo.program.Program._parse_variables_from_code``), first stripping ``//``
comments with ``re.sub(r'(.*)(//.*)', r'\\1', code, flags=re.M)``. On a line without ``//`` that pattern is tried
from every position of the line, each try running to the line's end: quadratic in the line length. napari's text
shader is ~86 kB (1,841 lines): the substitution alone takes ~20 ms of the GUI thread (the whole parse ~24 ms), the
marker shader's ~3.4 ms, each time one is built (vispy 0.14–0.15).

:func:`install` gives ``vispy.gloo.program`` a stand-in for its ``re`` module whose ``sub`` does that one
substitution line by line with ``str.rfind`` — the same result: on each line, from the *last* ``//`` to the line's end
is removed (the pattern's first group is greedy) — in ~0.2 ms; every other call, and every other pattern, goes to
Python's ``re`` unchanged. vispy's own method is kept. Installed once per process, when a viewer is watched.
"""

from __future__ import annotations

import re

__all__ = ["COMMENT_PATTERN", "install", "installed", "strip_line_comments"]

#: The pattern vispy strips comments with (and its replacement: the first group).
COMMENT_PATTERN = r"(.*)(//.*)"
_REPLACEMENT = r"\1"


def strip_line_comments(code: str) -> str:
    """``re.sub(COMMENT_PATTERN, r'\\1', code, flags=re.M)``: each line cut at its last ``//``."""
    return "\n".join(line[:line.rfind("//")] if "//" in line else line for line in code.split("\n"))


class _ReWithLinearCommentStrip:
    """Python's ``re`` module, but for ``sub`` of :data:`COMMENT_PATTERN` (see the module docstring)."""

    def __getattr__(self, name: str):
        return getattr(re, name)

    @staticmethod
    def sub(pattern, repl, string, count=0, flags=0):
        if (pattern == COMMENT_PATTERN and repl == _REPLACEMENT and count == 0 and flags == re.M
                and isinstance(string, str)):
            return strip_line_comments(string)
        return re.sub(pattern, repl, string, count=count, flags=flags)


def installed() -> bool:
    """Whether vispy's shader parsing uses :func:`strip_line_comments`."""
    from vispy.gloo import program

    return isinstance(getattr(program, "re", None), _ReWithLinearCommentStrip)


def install() -> None:
    """Make vispy's shader parsing strip comments in linear time (nothing if done, or if vispy no longer uses
    ``re`` there)."""
    from vispy.gloo import program

    if getattr(program, "re", None) is re:
        program.re = _ReWithLinearCommentStrip()
