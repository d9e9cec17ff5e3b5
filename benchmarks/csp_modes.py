"""Free vs constrained refinement (pyp's CSP modes) against a map: projection position errors and tilt geometry.

Data: the synthetic sample (``napari_cspt2d.sample.make_sample``: 40 particles × 41 tilts ±60°, 1024², box 64,
4 Å/px, extract_bin 1, so stack px = extracted px), picks with 2 px Gaussian error per axis. Scenario
``tracking``: that error only. Scenario ``geometry``: in addition, the tilt table given to the program has tilt
angles off by ±1° (random signs, the reference tilt exact), a tilt axis off by 1°, and the picks carry a per-tilt
shift of 3 px RMS (the reference tilt exact): the tilt images are shifted by it (a stack misalignment the tilt
table does not know) and the picks follow the images.

Each mode runs ``--rounds`` rounds (default 3, the issue's "seed Option A, 3 iterations") of: reconstruct the map
from the current projections (:func:`reconstruct.reconstruct_tracks`), refine every projection against it
(:func:`refine.refine_tracks`, the free measurement, search disc around the picks; the sample's refinement range
-60..60°, so a tilt whose wrong angle passes 60° is measured for its geometry only, as in pyp), then, for the
constrained modes, solve and place as a run does (:func:`csp_run.place`). Modes: ``free`` (the seed's settings),
``micrographs+particles`` (per-projection residuals kept: csp_frame_refinement without csp_transreg),
``+transreg`` (residuals regularised, pyp's default sigmas) and ``pure`` (csp_frame_refinement off: projections at
the prediction). Reported: RMS length of the position error against the truth (stack px) after each round; for
the geometry scenario the tilt-angle error (RMS after removing the common offset, which only turns the map), the
axis error and the per-tilt shift error (RMS length after removing what a common 3D translation explains).

This is the project's own simulator (analytic Gaussian-blob projections, not the Fourier machinery it tests);
``benchmarks/fidelity.py`` uses an independent one. Usage: ``python benchmarks/csp_modes.py [--snr 0.1 0.01]
[--rounds 3] [--particles 40]``; JSON goes to ``benchmarks/results/csp_modes.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import scipy.ndimage

from napari_cspt2d.model.tracks import TiltTable, TrackSet
from napari_cspt2d.recon.constrained import start_constrained
from napari_cspt2d.model.settings import Settings
from napari_cspt2d.recon import arguments, csp_run
from napari_cspt2d.recon.reconstruct import reconstruct_tracks
from napari_cspt2d.recon.refine import refine_tracks
from napari_cspt2d.sample import make_sample

HERE = Path(__file__).resolve().parent
BOTH = {"csp_refine_micrographs": True, "csp_refine_particles": True}
MODES = {  # pyp parameters on top of the sample's
    "free": {},
    "micrographs+particles": BOTH,
    "+transreg": {**BOTH, "csp_transreg": True},
    "pure": {**BOTH, "csp_frame_refinement": False},
}


def with_geometry_errors(sample, rng):
    """The sample with its tilt images shifted per tilt (a stack misalignment the tilt table does not know), the
    picks following the images, and a wrong tilt table (module docstring). Returns the shifted stack, the picks,
    the true positions (a TrackSet) and the injected errors."""
    tilts = sample.tracks.tilts
    ref = int(np.argmin(np.abs(tilts.angle_deg)))
    angle_error = rng.choice([-1.0, 1.0], len(tilts))
    angle_error[ref] = 0.0
    shift = rng.normal(0.0, 1.0, (len(tilts), 2))
    shift *= 3.0 / np.sqrt(np.mean(np.sum(shift**2, axis=1)))
    shift[ref] = 0.0
    stack = np.stack([scipy.ndimage.shift(image, (dy, dx), order=3, mode="nearest")
                      for image, (dx, dy) in zip(sample.stack, shift[np.argsort(tilts.id)])])
    wrong = TiltTable(tilts.id, tilts.angle_deg + angle_error, tilts.defocus_um, tilts.axis_deg + 1.0, tilts.dose,
                      tilts.order)
    truth = sample.truth_tracks.with_positions(np.arange(len(sample.truth_tracks)),
                                               sample.truth_tracks.positions_px()
                                               + shift[sample.truth_tracks.tilt_rows()])
    picks = sample.tracks.positions_px() + shift[sample.tracks.tilt_rows()]
    tracks = TrackSet.from_positions(sample.tracks.particle, sample.tracks.tilt, picks, wrong,
                                     sample.tracks.image_shape_yx, particles=sample.tracks.particles)
    return stack, tracks, truth, {"angle_error_deg": angle_error, "shift_px": shift}


def geometry_errors(state, truth_tilts, injected):
    g = state.geometry
    angle = g.angle_deg - truth_tilts.angle_deg
    angle -= angle.mean()
    t = np.deg2rad(truth_tilts.angle_deg)
    design = np.zeros((2 * t.size, 3))
    design[0::2, 0], design[0::2, 2], design[1::2, 1] = np.cos(t), np.sin(t), 1.0
    diff = (g.shift_px - injected["shift_px"]).reshape(-1)
    a, *_ = np.linalg.lstsq(design, diff, rcond=None)
    rest = (diff - design @ a).reshape(-1, 2)
    return {"tilt_angle_rms_deg": float(np.sqrt(np.mean(angle**2))),
            "axis_max_deg": float(np.max(np.abs(g.axis_deg - truth_tilts.axis_deg))),
            "tilt_shift_rms_px": float(np.sqrt(np.mean(np.sum(rest**2, axis=1))))}


def position_rms(tracks, truth):
    return float(np.sqrt(np.mean(np.sum((tracks.positions_px() - truth.positions_px()) ** 2, axis=1))))


def run(sample, stack, picks, truth, mode: dict, rounds: int):
    settings = Settings.parse({**sample.params, **mode})
    imaging = arguments.imaging(settings)
    rec = arguments.reconstruction_options(settings)
    options = arguments.refine_options(settings, 2, refine_angles=False)
    origin = picks.positions_px()
    constrained = arguments.csp_modes(settings).constrained
    anchors, state = start_constrained(picks) if constrained else (picks, None)
    tracks = anchors
    errors = []
    for _ in range(rounds):
        reference = reconstruct_tracks(stack, tracks, **rec).map
        tracks = refine_tracks(stack, tracks, reference, options, imaging, origin_px=origin).tracks
        if constrained:
            tracks, state = csp_run.place(tracks, state, anchors, options, settings)
        errors.append(position_rms(tracks, truth))
    return tracks, state, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snr", type=float, nargs="+", default=[0.1, 0.01])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--particles", type=int, default=40)
    parser.add_argument("--tilts", type=int, default=41)
    parser.add_argument("--scenario", nargs="+", default=["tracking", "geometry"])
    args = parser.parse_args()
    rows = []
    for snr in args.snr:
        sample = make_sample(n_particles=args.particles, n_tilts=args.tilts, snr=snr, pick_error_px=2.0, seed=11)
        for scenario in args.scenario:
            stack, picks, truth, injected = sample.stack, sample.tracks, sample.truth_tracks, None
            if scenario == "geometry":
                stack, picks, truth, injected = with_geometry_errors(sample, np.random.default_rng(12))
            start_rms = position_rms(picks, truth)
            for name, modes in MODES.items():
                t0 = time.perf_counter()
                _, state, errors = run(sample, stack, picks, truth, modes, args.rounds)
                row = {"snr": snr, "scenario": scenario, "mode": name, "start_rms_px": start_rms,
                       "rms_px_per_round": errors, "seconds": time.perf_counter() - t0}
                if injected is not None and state is not None:
                    row.update(geometry_errors(state, sample.truth_tracks.tilts, injected))
                rows.append(row)
                geo = (f"  tilt {row['tilt_angle_rms_deg']:.3f}° axis {row['axis_max_deg']:.3f}° "
                       f"shift {row['tilt_shift_rms_px']:.3f} px") if "tilt_angle_rms_deg" in row else ""
                print(f"SNR {snr:<5g} {scenario:<9} {name:<22} {start_rms:5.2f} -> "
                      + " -> ".join(f"{e:.3f}" for e in errors) + f" px RMS{geo}  ({row['seconds']:.0f} s)",
                      flush=True)
    out = HERE / "results" / "csp_modes.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
