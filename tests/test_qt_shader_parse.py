"""vispy's shader parsing with the linear comment strip (:mod:`._shader_parse`) finds exactly the variables vispy's own
regular expression finds, on napari's real shaders; watching a viewer installs it."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_cspt2d._qt import _shader_parse  # noqa: E402
from napari_cspt2d._qt._prebuild import _canvas, _leaves  # noqa: E402
from napari_cspt2d._qt._viewer_watch import watch_viewer  # noqa: E402


def vispy_strip(code: str) -> str:
    return re.sub(_shader_parse.COMMENT_PATTERN, r"\1", code, flags=re.M)


@pytest.mark.parametrize("code", [
    "", "\n", "a // b", "a // b // c\nd", "// all\n\n x = 1; // y\r\nz//\n//", "no comment\n", "a/ /b // c/",
    "  uniform vec4 u_color; // colour\nattribute vec2 a_pos;\n// uniform float gone;\nvarying float v; // // x",
])
def test_the_strip_is_vispy_s_substitution(code):
    assert _shader_parse.strip_line_comments(code) == vispy_strip(code)


@pytest.mark.gui
def test_napari_s_programs_parse_the_same_variables(make_napari_viewer, qtbot, monkeypatch):
    """Every program of a viewer showing an image, points (markers and text), vectors and tracks: the stripped source
    and the variables found are vispy's."""
    viewer = make_napari_viewer(show=True)
    rng = np.random.default_rng(1)
    viewer.add_image(rng.random((3, 32, 32)).astype(np.float32))
    viewer.add_points(rng.random((6, 3)) * 30, features={"id": np.arange(6)}, text="{id}")
    viewer.add_vectors(rng.random((4, 2, 3)) * 10)
    viewer.add_tracks(np.column_stack([np.repeat([0, 1], 3), np.tile([0, 1, 2], 2), rng.random((6, 2)) * 30]))
    qtbot.wait(200)
    from vispy.gloo import program as vispy_program

    programs = [leaf._program for layer_visual in _canvas(viewer).layer_to_visual.values()
                for leaf in _leaves(layer_visual.node)
                if getattr(leaf, "_program", None) is not None and leaf._program._shaders[0] is not None]
    assert len(programs) >= 5
    sources = ["\n\n".join(shader.code for shader in program._shaders) for program in programs]
    assert max(len(code) for code in sources) > 50_000  # (the text shader)
    for code in sources:
        assert _shader_parse.strip_line_comments(code) == vispy_strip(code)
    for program in programs:
        monkeypatch.setattr(vispy_program, "re", re)
        program._parse_variables_from_code(update_variables=False)
        found_by_vispy = dict(program._code_variables)
        monkeypatch.setattr(vispy_program, "re", _shader_parse._ReWithLinearCommentStrip())
        program._parse_variables_from_code(update_variables=False)
        assert program._code_variables == found_by_vispy and found_by_vispy


@pytest.mark.gui
def test_watching_a_viewer_installs_it(make_napari_viewer, monkeypatch):
    from vispy.gloo import program as vispy_program

    monkeypatch.setattr(vispy_program, "re", re)
    assert not _shader_parse.installed()
    watch_viewer(make_napari_viewer(show=True))
    assert _shader_parse.installed()
    assert vispy_program.re.finditer is re.finditer  # everything else is Python's re
