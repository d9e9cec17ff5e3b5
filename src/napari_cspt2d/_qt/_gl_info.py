"""Which OpenGL renders this process's canvases, and whether it is a software rasterizer.

On a software renderer (Mesa llvmpipe/softpipe, SwiftShader, Windows' "GDI Generic", Apple's "Software Renderer")
a 3D ray-cast of a 128³ map takes 0.3–1 s per draw on the GUI thread, where a GPU takes milliseconds; views choose
what they draw from this (:class:`._qt.results.MapPanel`). The name is read once per process (``GL_RENDERER``)
through a small offscreen context of Qt's, so it does not depend on a canvas having been shown (~40 ms, once), with
``GL_VERSION`` (the driver's release: :mod:`._gl_warmup` keys what it warmed on both).
"""

from __future__ import annotations

import functools

__all__ = ["SOFTWARE_RENDERERS", "gl_renderer", "gl_strings", "is_software_renderer"]

#: Lower-case fragments of ``GL_RENDERER`` names of software rasterizers.
SOFTWARE_RENDERERS = ("llvmpipe", "softpipe", "swiftshader", "software rasterizer", "software renderer",
                      "gdi generic")


def is_software_renderer(renderer: str) -> bool:
    """Whether ``renderer`` (a ``GL_RENDERER`` string) names a software rasterizer."""
    name = renderer.lower()
    return any(fragment in name for fragment in SOFTWARE_RENDERERS)


def gl_renderer() -> str:
    """The process's ``GL_RENDERER`` (e.g. ``"llvmpipe (LLVM 15.0.6, 256 bits)"``); ``""`` when no OpenGL context
    can be made (then views assume a GPU, napari's default)."""
    return gl_strings()[0]


@functools.lru_cache(maxsize=1)
def gl_strings() -> tuple[str, str]:
    """The process's ``(GL_RENDERER, GL_VERSION)`` (the version names the driver's release, e.g.
    ``"4.5 (Compatibility Profile) Mesa 22.3.6"``); ``("", "")`` when no OpenGL context can be made."""
    from qtpy.QtGui import QOffscreenSurface, QOpenGLContext
    from vispy.gloo import gl

    context = QOpenGLContext()
    if not context.create():
        return "", ""
    surface = QOffscreenSurface()
    surface.setFormat(context.format())
    surface.create()
    try:
        if not context.makeCurrent(surface):
            return "", ""
        names = (gl.glGetParameter(gl.GL_RENDERER), gl.glGetParameter(gl.GL_VERSION))
        return tuple(name.decode() if isinstance(name, bytes) else str(name or "") for name in names)
    finally:
        context.doneCurrent()
        surface.destroy()
