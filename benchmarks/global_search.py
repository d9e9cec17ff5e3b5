"""Global orientation search from a low-resolution reference: accuracy and time on the synthetic sample.

The sample (``napari_cspt2d.sample.make_sample``: by default 40 particles × 41 tilts, 1024², box 64, 4 Å/px,
SNR 0.1 and 2 px pick error, as the ±10° refinement test) has known orientations. The reference is the true map
low-passed to 30 Å (cosine edge 2 Fourier px wide, centred on 1/30 Å⁻¹); every particle starts with the "unknown"
orientation (all Euler angles 0), which makes :func:`napari_cspt2d.recon.refine.refine_tracks` search globally.
The rounds then follow pyp's schedule (``refine_rhref``, default ``"20:15:12"``, one round per entry; options from
:func:`arguments.refine_options` of iterations 2, 3, ...): round 1 refines against the low-passed reference, every
later round against the map reconstructed from the previous round's tracks (local search from there on).

Reported per round: the orientation error of each particle against the truth, the angle of ``R_est · R_trueᵀ``
(matrices from :func:`geometry.euler_to_matrix`, the project's one convention; the object is asymmetric, so no
symmetry is factored out), as median, 90th percentile, maximum and the fraction above 15° (particles the search put
in a wrong basin); the RMS position error; and seconds (refinement; reconstruction separately). Goal: median ≤ 5°
after the global round. A table is printed and JSON written to ``benchmarks/results/global_search.json``.

Usage: ``python benchmarks/global_search.py [--particles 40] [--tilts 41] [--snr 0.1] [--rhref 20:15:12]``
(smoke test: ``--particles 6 --tilts 21 --rhref 20``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from napari_cspt2d.model.tracks import ParticleTable, TrackSet
from napari_cspt2d import geometry
from napari_cspt2d.model.settings import Settings
from napari_cspt2d.recon import arguments
from napari_cspt2d.recon.reconstruct import reconstruct_tracks
from napari_cspt2d.recon.refine import RefineOptions, refine_tracks, rotation_angle_deg
from napari_cspt2d.sample import make_sample

HERE = Path(__file__).resolve().parent
WRONG_BASIN_DEG = 15.0


def lowpass(volume: np.ndarray, pixel_A: float, cutoff_A: float, edge_px: float = 2.0) -> np.ndarray:
    """``volume`` (n, n, n) low-passed to ``cutoff_A``: 1 below, 0 above, a cosine edge ``edge_px`` Fourier pixels
    wide centred on ``1 / cutoff_A``."""
    n = volume.shape[0]
    k = np.fft.fftfreq(n) * n
    kr = np.fft.rfftfreq(n) * n
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kr[None, None, :] ** 2)
    x = np.clip((radius - n * pixel_A / cutoff_A) / edge_px + 0.5, 0.0, 1.0)
    filt = 0.5 * (1.0 + np.cos(np.pi * x))
    return np.fft.irfftn(np.fft.rfftn(volume) * filt, s=volume.shape, axes=(0, 1, 2)).astype(np.float32)


def without_angles(tracks: TrackSet) -> TrackSet:
    """``tracks`` with every particle's Euler angles 0 (the "unknown" orientation)."""
    p = tracks.particles
    return tracks.replace(particles=ParticleTable(p.id, p.xyz_px, np.zeros_like(p.euler_deg)))


def orientation_error_deg(tracks: TrackSet, truth: TrackSet) -> np.ndarray:
    """Per-particle angle (°) of ``R_est · R_trueᵀ`` (same particle order in both)."""
    def mats(t: TrackSet) -> np.ndarray:
        e = t.particles.euler_deg
        return geometry.euler_to_matrix(e[:, 2], e[:, 1], e[:, 0])

    return rotation_angle_deg(mats(tracks), mats(truth))


def summary(error_deg: np.ndarray, tracks: TrackSet, truth: TrackSet) -> dict:
    pos = np.linalg.norm(tracks.positions_px() - truth.positions_px(), axis=1)
    return {"median_deg": float(np.median(error_deg)), "p90_deg": float(np.percentile(error_deg, 90)),
            "max_deg": float(error_deg.max()), "wrong_basin_fraction": float(np.mean(error_deg > WRONG_BASIN_DEG)),
            "rms_position_px": float(np.sqrt(np.mean(pos * pos)))}


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    sample = make_sample(n_particles=args.particles, n_tilts=args.tilts, box=args.box, snr=args.snr,
                         pick_error_px=args.pick_error, seed=args.seed)
    sample_s = time.perf_counter() - t0
    params = dict(sample.params, refine_rhref=args.rhref)
    settings = Settings.parse(params)
    imaging = arguments.imaging(settings)
    truth = sample.truth_tracks
    reference = lowpass(sample.truth_map, sample.pixel_A, args.lowpass_A)
    start = without_angles(sample.tracks)
    tracks = start
    rounds = []
    for i in range(len(args.rhref.split(":"))):
        recon_s = 0.0
        if i > 0:
            t0 = time.perf_counter()
            reference = reconstruct_tracks(sample.stack, tracks, **arguments.reconstruction_options(settings)).map
            recon_s = time.perf_counter() - t0
        options = arguments.refine_options(settings, 2 + i, global_step_deg=args.global_step)
        t0 = time.perf_counter()
        out = refine_tracks(sample.stack, tracks, reference, options, imaging, origin_px=start.positions_px())
        refine_s = time.perf_counter() - t0
        tracks = out.tracks
        error = orientation_error_deg(tracks, truth)
        rounds.append({"round": i + 1, "resolution_A": options.resolution_A,
                       "global_particles": int(out.searched_globally.sum()), "refine_s": refine_s,
                       "reconstruct_s": recon_s, **summary(error, tracks, truth),
                       "errors_deg": np.round(error, 2).tolist()})
    return {"particles": args.particles, "tilts": args.tilts, "box": args.box, "pixel_A": sample.pixel_A,
            "snr": args.snr, "pick_error_px": args.pick_error, "seed": args.seed, "reference_lowpass_A": args.lowpass_A,
            "refine_rhref": args.rhref, "global_step_deg": args.global_step, "sample_s": sample_s,
            "rounds": rounds, "total_s": sum(r["refine_s"] + r["reconstruct_s"] for r in rounds)}


def print_table(result: dict) -> None:
    print(f"{result['particles']} particles × {result['tilts']} tilts, box {result['box']}, "
          f"{result['pixel_A']:g} Å/px, SNR {result['snr']:g}; reference: truth low-passed to "
          f"{result['reference_lowpass_A']:g} Å; global grid {result['global_step_deg']:g}°")
    head = ("round", "res Å", "global", "median °", "p90 °", "max °", f">{WRONG_BASIN_DEG:g}°", "pos px",
            "refine s", "recon s")
    print(("{:>9}" * len(head)).format(*head))
    for r in result["rounds"]:
        print(f"{r['round']:>9}{r['resolution_A']:>9.1f}{r['global_particles']:>9}{r['median_deg']:>9.2f}"
              f"{r['p90_deg']:>9.2f}{r['max_deg']:>9.1f}{r['wrong_basin_fraction']:>9.0%}"
              f"{r['rms_position_px']:>9.2f}{r['refine_s']:>9.1f}{r['reconstruct_s']:>9.1f}")
    print(f"total {result['total_s']:.1f} s (+ {result['sample_s']:.1f} s to make the sample)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=40)
    parser.add_argument("--tilts", type=int, default=41)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--pick-error", type=float, default=2.0, help="px (standard deviation per axis)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--lowpass-A", type=float, default=30.0)
    parser.add_argument("--rhref", default="20:15:12", help="pyp's refine_rhref, one round per entry")
    parser.add_argument("--global-step", type=float, default=RefineOptions.global_step_deg)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "global_search.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    result = run(args)
    result.update(load_average_before=load_before, load_average_after=os.getloadavg(), cpu_count=os.cpu_count(),
                  machine=platform.platform(), python=platform.python_version())
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
