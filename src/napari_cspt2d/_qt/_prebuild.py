"""Build a layer's shader programs before its first draw, one visual per event-loop turn.

The first time vispy draws a visual it builds its shader program in Python on the GUI thread, inside the canvas's
paint: its shader functions are compiled into GLSL (``Compiler.compile``) and the variables parsed out of the source
by regular expressions (``Program._parse_variables_from_code``). In software OpenGL with Mesa's shader cache warm
(every napari session after the first), that Python work is most of a first draw: 15–45 ms per program (the text
program, which napari makes for every Points layer even without text and for the canvas's text overlay, is the
largest). A layer that shows several visuals at once (napari's Points: two marker programs and a text program) or a
paint that shows a layer and the tilt label together froze the window for their sum.

:func:`build_in_turns` builds the programs of a layer added hidden (or of a canvas overlay not shown yet) in turns of
their own (:func:`._stages.in_own_turn`), a piece per turn; the paint that shows it then only sends the built programs
to OpenGL. The build is vispy's own (``ModularProgram.build_if_needed``, which the draw calls anyway: a program whose
code changes before the draw is built again there, as without this). A visual that fills some of its shader's
``$placeholders`` only when it prepares a draw (a text's or a line's colours) has that preparation run first, in a turn
of its own (vispy's ``Visual._prepare_draw``: it only queues GL commands, for its canvas, made the current one);
one whose code is still not complete then (an image not sliced yet) is left to its first draw. It reaches vispy's
visuals through napari's private ``canvas.layer_to_visual`` and ``canvas._viewer_overlay_to_visual`` (napari 0.9);
where they are missing nothing is built ahead.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator

from ._stages import in_own_turn

__all__ = ["build_in_turns", "programs_to_build"]

_LOG = logging.getLogger(__name__)


def _canvas(viewer):
    """napari's vispy canvas of ``viewer`` (a ``Viewer``, or a ``QtViewer`` of a ``ViewerModel``; private, and not
    through the proxy napari hands plugins, which warns at every attribute), or None."""
    try:
        with warnings.catch_warnings():  # napari 0.9 warns of private access from a plugin's code
            warnings.simplefilter("ignore", FutureWarning)
            canvas = getattr(viewer, "canvas", None)
            if not hasattr(canvas, "layer_to_visual"):  # (a Viewer's ``canvas`` is its model's)
                canvas = viewer.window._qt_viewer.canvas
    except Exception:  # noqa: BLE001 - a private path: without it the programs are built when first drawn
        return None
    return getattr(canvas, "__wrapped__", canvas)


def _nodes(viewer, what) -> list:
    """The vispy nodes drawing ``what`` (a layer of ``viewer`` or one of its canvas overlays; ``viewer``: see
    :func:`_canvas`)."""
    canvas = _canvas(viewer)
    if canvas is None:
        return []
    layer_visual = getattr(canvas, "layer_to_visual", {}).get(what)
    if layer_visual is not None:
        return [layer_visual.node]
    overlays = getattr(canvas, "_viewer_overlay_to_visual", {}).get(what, [])
    return [overlay.node for overlay in overlays]


def _leaves(node) -> Iterator:
    """``node``'s visuals that draw with a program of their own (a compound visual's shown parts, recursively;
    ``node`` itself may be hidden: the layer is shown once they are built)."""
    parts = getattr(node, "_subvisuals", None)
    if parts is None:
        yield node
        return
    for part in parts:
        if getattr(part, "visible", True):
            yield from _leaves(part)


def _complete(program) -> bool:
    """Whether every ``$placeholder`` of ``program``'s shader functions is filled (a visual fills some only in its
    first draw, e.g. an image's interpolation and colour transform: its program is built then)."""
    for shader in (program.vert, program.frag, getattr(program, "geom", None)):
        if shader is None:
            continue
        for function in [shader, *shader.dependencies()]:
            placeholders = getattr(function, "template_vars", None)
            if placeholders and not set(placeholders) <= set(getattr(function, "_expressions", {})):
                return False
    return True


def _to_build(visual) -> bool:
    """Whether ``visual`` draws with a program still to be built (an empty text is never drawn)."""
    program = getattr(visual, "_program", None)
    text = getattr(visual, "text", None)
    return program is not None and getattr(program, "_need_build", False) and (text is None or len(text) > 0)


def programs_to_build(viewer, what) -> list:
    """The visuals of ``what`` (a layer of ``viewer`` or a canvas overlay) whose programs are still to be built."""
    return [visual for node in _nodes(viewer, what) for visual in _leaves(node) if _to_build(visual)]


def _prepare(viewer, visual) -> None:
    """What ``visual`` does before each draw (fills its shader's placeholders from its data), with ``viewer``'s canvas
    the current one: the GL commands it makes are queued for that canvas's next paint, as in a draw."""
    from vispy.gloo.context import set_current_canvas

    scene_canvas = getattr(_canvas(viewer), "_scene_canvas", None)
    if scene_canvas is None:
        return
    set_current_canvas(scene_canvas)
    visual._prepare_draw(view=visual)


def _advance(viewer, todo: list, prepared: set) -> None:
    """One piece of work on ``todo[0]``: its program built (if its code is complete), else its draw prepared (the
    build is then the next piece), else it is left to its first draw."""
    visual = todo[0]
    program = visual._program
    if not program._need_build:
        todo.pop(0)
    elif _complete(program):
        todo.pop(0)
        program.build_if_needed()
    elif id(visual) not in prepared:
        prepared.add(id(visual))
        _prepare(viewer, visual)
    else:
        todo.pop(0)


def build_in_turns(viewer, what, then: Callable[[], object] | None = None, *, first: bool = True) -> None:
    """Build the programs of ``what``'s visuals (a layer of ``viewer``, or a canvas overlay), one per event-loop turn,
    then run ``then()`` in a turn of its own. ``first``: the turns go before other queued steps
    (:func:`._stages.in_own_turn`); the visuals are listed in the first turn (after what the caller's turn did)."""
    todo: list | None = None
    prepared: set[int] = set()

    def step() -> None:
        nonlocal todo
        if todo is None:
            todo = programs_to_build(viewer, what)
        if todo:
            try:
                _advance(viewer, todo, prepared)
            except Exception:  # noqa: BLE001 - then built when first drawn, as without this
                _LOG.debug("building a program ahead failed", exc_info=True)
                todo.pop(0)
            in_own_turn(step, first=first)
        elif then is not None:
            then()

    in_own_turn(step, first=first)
