"""Which OpenGL renders this process's canvases, and whether it is a software rasterizer.

On a software renderer (Mesa llvmpipe/softpipe, SwiftShader, Windows' "GDI Generic", Apple's "Software Renderer")
a 3D ray-cast of a 128³ map takes 0.3–1 s per draw on the GUI thread, where a GPU takes milliseconds; views choose
what they draw from this (:class:`._qt.results.MapPanel`). The name is read once per process (``GL_RENDERER``)
through a small offscreen context of Qt's, so it does not depend on a canvas having been shown (~40 ms, once).
"""

from __future__ import annotations

import functools

__all__ = ["SOFTWARE_RENDERERS", "gl_renderer", "is_software_renderer"]

#: Lower-case fragments of ``GL_RENDERER`` names of software rasterizers.
SOFTWARE_RENDERERS = ("llvmpipe", "softpipe", "swiftshader", "software rasterizer", "software renderer",
                      "gdi generic")


def is_software_renderer(renderer: str) -> bool:
    """Whether ``renderer`` (a ``GL_RENDERER`` string) names a software rasterizer."""
    name = renderer.lower()
    return any(fragment in name for fragment in SOFTWARE_RENDERERS)


@functools.lru_cache(maxsize=1)
def gl_renderer() -> str:
    """The process's ``GL_RENDERER`` (e.g. ``"llvmpipe (LLVM 15.0.6, 256 bits)"``); ``""`` when no OpenGL context
    can be made (then views assume a GPU, napari's default)."""
    from qtpy.QtGui import QOffscreenSurface, QOpenGLContext
    from vispy.gloo import gl

    context = QOpenGLContext()
    if not context.create():
        return ""
    surface = QOffscreenSurface()
    surface.setFormat(context.format())
    surface.create()
    try:
        if not context.makeCurrent(surface):
            return ""
        name = gl.glGetParameter(gl.GL_RENDERER)
        return name.decode() if isinstance(name, bytes) else str(name or "")
    finally:
        context.doneCurrent()
        surface.destroy()
