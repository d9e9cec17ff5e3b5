"""cryoDRGN pose and CTF pickles for the projections of a TrackSet (for heterogeneity analysis after CSPT).

Layout (as ``cryodrgn parse_pose_star`` / ``parse_ctf_star`` write them; one entry per TrackSet row, in row order):

* poses: a pickled tuple ``(rot, trans)``: ``rot`` float64 ``(N, 3, 3)`` RELION rotation matrices of each tilt image,
  ``A_pt = R_z(axis) R_y(tilt) A_particle`` (:func:`napari_cspt2d.geometry.projection_matrices`); ``trans``
  float64 ``(N, 2)`` = RELION ``rlnOrigin`` (px) / box, i.e. minus the particle centre's offset from the box centre,
  as a fraction of the box. Boxes are taken to be cut at the projection of the 3D point (pyp's convention), so the
  offset is the projection's shift, in extracted pixels.
* ctf: float32 ``(N, 9)`` ``[D, Apix, dfU, dfV, dfAng, kV, Cs, w, phase]``: box (px), extracted pixel size (Å),
  defocus U/V (Å, underfocus positive), astigmatism angle (deg), voltage (kV), Cs (mm), amplitude contrast, phase
  shift (deg). Per-projection defocus includes the particle's height in the tilted specimen
  (:func:`napari_cspt2d.recon.ctf.projection_defocus_A`) unless ``height_defocus=False``.

Files are written atomically; :func:`read_poses` / :func:`read_ctf` read them back with the restricted unpickler.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import CsptInputError
from ..model.tracks import TrackSet
from .. import geometry
from ..recon import ctf
from .atomic import atomic_open
from .safe_pickle import safe_load

__all__ = ["poses", "ctf_params", "write_poses", "write_ctf", "read_poses", "read_ctf"]


def _positive(value: float, name: str) -> float:
    if not (np.isfinite(value) and value > 0):
        raise CsptInputError(f"is {value}", field=name, expected="> 0")
    return float(value)


def poses(
    tracks: TrackSet, *, box_px: int, binning: float = 1.0, offset_px: ArrayLike | None = None
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``(rot (N, 3, 3), trans (N, 2))`` of every projection (see the module docstring).

    ``box_px``: extracted box size; ``binning``: extracted pixel / tilt-stack pixel; ``offset_px`` (N, 2): the
    particle centre's offset from its box centre in tilt-stack pixels (default: the projections' shifts)."""
    box = int(_positive(box_px, "box_px"))
    binning = _positive(binning, "binning")
    trow = tracks.tilt_rows()
    e = tracks.particles.euler_deg[tracks.particle_rows()]  # (psi, theta, phi)
    rot = geometry.projection_matrices(e[:, 2], e[:, 1], e[:, 0], tracks.tilts.angle_deg[trow],
                                       tracks.tilts.axis_deg[trow])
    offset = tracks.shift_px if offset_px is None else np.asarray(offset_px, dtype=np.float64)
    if offset.shape != (len(tracks), 2) or not np.all(np.isfinite(offset)):
        raise CsptInputError(f"has shape {offset.shape}", field="offset_px", expected=f"finite ({len(tracks)}, 2)")
    return rot.reshape(-1, 3, 3), -offset / binning / box


def ctf_params(
    tracks: TrackSet,
    *,
    box_px: int,
    pixel_A: float,
    tilt_pixel_A: float,
    voltage_kV: float = 300.0,
    cs_mm: float = 2.7,
    amp_contrast: float = 0.07,
    phase_shift_deg: float = 0.0,
    astigmatism_A: ArrayLike = 0.0,
    astigmatism_angle_deg: ArrayLike = 0.0,
    height_defocus: bool = True,
    defocus_A: ArrayLike | None = None,
) -> NDArray[np.float32]:
    """cryoDRGN CTF array ``(N, 9)`` of every projection (see the module docstring).

    ``pixel_A``: extracted pixel size; ``tilt_pixel_A``: tilt-stack pixel size (turns heights into Å);
    ``astigmatism_A`` = dfU - dfV and its angle, scalars or per projection (N,); ``defocus_A`` (N,) replaces the
    mean defocus computed from the tilts and heights (e.g. per-particle values from a star file)."""
    box = _positive(box_px, "box_px")
    pixel = _positive(pixel_A, "pixel_A")
    tilt_pixel = _positive(tilt_pixel_A, "tilt_pixel_A")
    n = len(tracks)
    trow = tracks.tilt_rows()
    if defocus_A is None:
        height = tracks.projected_px()[:, 2] if height_defocus else np.zeros(n)
        mean = ctf.projection_defocus_A(tracks.tilts.defocus_um[trow], height, tilt_pixel)
    else:
        mean = np.asarray(defocus_A, dtype=np.float64)
        if mean.shape != (n,):
            raise CsptInputError(f"has shape {mean.shape}", field="defocus_A", expected=f"({n},) Å")
    astig = np.broadcast_to(np.asarray(astigmatism_A, dtype=np.float64), (n,))
    out = np.empty((n, 9), dtype=np.float32)
    out[:, 0], out[:, 1] = box, pixel
    out[:, 2], out[:, 3] = mean + 0.5 * astig, mean - 0.5 * astig
    out[:, 4] = np.broadcast_to(np.asarray(astigmatism_angle_deg, dtype=np.float64), (n,))
    out[:, 5], out[:, 6], out[:, 7], out[:, 8] = voltage_kV, cs_mm, amp_contrast, phase_shift_deg
    if not np.all(np.isfinite(out)):
        raise CsptInputError("gives non-finite CTF parameters", field="ctf", expected="finite optics and defocus")
    return out


def write_poses(path: str | os.PathLike[str], rot: ArrayLike, trans: ArrayLike) -> None:
    """Pickle ``(rot, trans)`` the way cryoDRGN reads poses (float64 ``(N, 3, 3)`` and ``(N, 2)``)."""
    rot = np.ascontiguousarray(rot, dtype=np.float64)
    trans = np.ascontiguousarray(trans, dtype=np.float64)
    if rot.ndim != 3 or rot.shape[1:] != (3, 3) or trans.shape != (len(rot), 2):
        raise CsptInputError(f"are {rot.shape} and {trans.shape}", field="poses", expected="(N, 3, 3) and (N, 2)")
    with atomic_open(path, "wb") as fh:
        pickle.dump((rot, trans), fh, protocol=4)


def write_ctf(path: str | os.PathLike[str], params: ArrayLike) -> None:
    """Pickle the float32 ``(N, 9)`` CTF array the way cryoDRGN reads it."""
    params = np.ascontiguousarray(params, dtype=np.float32)
    if params.ndim != 2 or params.shape[1] != 9:
        raise CsptInputError(f"has shape {params.shape}", field="ctf", expected="(N, 9)")
    with atomic_open(path, "wb") as fh:
        pickle.dump(params, fh, protocol=4)


def _numbers(value: object, path: str | os.PathLike[str], field: str, expected: str) -> NDArray[np.float64]:
    """``value`` (an unpickled array or nested lists) as a float64 array; anything else (strings, objects, ragged
    lists) is refused naming ``path`` and ``field``."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise CsptInputError(f"is not an array ({exc})", file=path, field=field, expected=expected) from None
    if arr.dtype.kind not in "iuf":
        raise CsptInputError(f"holds {arr.dtype} values", file=path, field=field, expected=expected)
    return arr.astype(np.float64, copy=False)


def read_poses(path: str | os.PathLike[str]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Read a cryoDRGN pose pickle ``(rot, trans)``; denormal translations (seen in real files) become 0."""
    data = safe_load(path)
    if not (isinstance(data, tuple) and len(data) == 2):
        raise CsptInputError(f"holds a {type(data).__name__}", file=path, field="poses",
                             expected="a (rot, trans) tuple")
    rot, trans = (_numbers(v, path, "poses", "(N, 3, 3) and (N, 2) number arrays") for v in data)
    if rot.ndim != 3 or rot.shape[1:] != (3, 3) or trans.shape != (len(rot), 2):
        raise CsptInputError(f"has shapes {rot.shape}, {trans.shape}", file=path, field="poses",
                             expected="(N, 3, 3) and (N, 2)")
    trans = np.where(np.abs(trans) < np.finfo(np.float64).tiny, 0.0, trans)
    return rot, trans


def read_ctf(path: str | os.PathLike[str]) -> NDArray[np.float32]:
    """Read a cryoDRGN CTF pickle (float32 ``(N, 9)``)."""
    data = _numbers(safe_load(path), path, "ctf", "a numeric (N, 9) array")
    if data.ndim != 2 or data.shape[1] != 9:
        raise CsptInputError(f"has shape {data.shape}", file=path, field="ctf", expected="a numeric (N, 9) array")
    return data.astype(np.float32, copy=False)
