"""The best any fit of per-tilt geometry to measured positions can do: the Cramér-Rao bound of the tilt-angle error.

Model (IMOD's, the project's): a particle at ``X`` appears in tilt ``t`` at ``R_z(axis_t) R_y(angle_t) X + s_t``;
unknowns: every particle's 3D point and every tilt's angle, axis and 2D shift (the reference tilt's angle and
shift held, as :mod:`napari_cspt2d.recon.constrained` does; the metric below does not depend on that choice).
Measurements: every projection's position with independent Gaussian noise ``sigma`` px per axis. The Fisher
information ``JᵀJ / sigma²`` of that model (``J`` the derivatives at the truth, computed here from the formula, not
by the project's code) bounds the covariance of any unbiased estimate; reported: the expected RMS tilt-angle error
after removing the common offset (the metric of ``fidelity.py`` and ``csp_modes.py``), per tilt and overall.

Geometries: ``fidelity`` (``benchmarks/fidelity.py``'s layout: 50 particles on a 5 × 10 grid 1.6 × 1.05 boxes
apart, heights uniform in a slab of 0.75 box = 48 px, 41 tilts ±60°) and ``sample`` (``make_sample``'s 40
particles × 41 tilts). Usage: ``python benchmarks/tilt_bound.py [--sigma 0.4 0.5 0.6] [--geometry fidelity
sample]``; prints a table and writes ``benchmarks/results/tilt_bound.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def fidelity_points(box: int = 64, n_particles: int = 50, seed: int = 0) -> np.ndarray:
    """(P, 3) points of ``fidelity.simulate``'s layout (its grid, jitter and slab; same random draws)."""
    rng = np.random.default_rng(seed)
    rng.normal(0, 0.1, 41)  # simulate() draws the tilts' defocus first
    n_cols = max(1, round(float(np.sqrt(n_particles / 2))))
    n_rows = -(-n_particles // n_cols)
    grid = np.stack(np.meshgrid((np.arange(n_cols) - (n_cols - 1) / 2) * 1.6 * box,
                                (np.arange(n_rows) - (n_rows - 1) / 2) * 1.05 * box), -1).reshape(-1, 2)[:n_particles]
    return np.column_stack([grid + rng.uniform(-0.1, 0.1, grid.shape) * box,
                            rng.uniform(-0.375 * box, 0.375 * box, n_particles)])


def sample_points() -> np.ndarray:
    from napari_cspt2d.sample import make_sample

    return make_sample(n_particles=40, n_tilts=41, snr=0.01, pick_error_px=2.0, seed=11).truth_tracks.particles.xyz_px


def angle_covariance(xyz: np.ndarray, angles_deg: np.ndarray) -> np.ndarray:
    """Covariance (T, T) of the tilt angles (rad², for unit noise per axis) of the model at axis 0, zero shifts."""
    n_p, n_t = len(xyz), len(angles_deg)
    t = np.deg2rad(angles_deg)
    c, s = np.cos(t), np.sin(t)
    ref = int(np.argmin(np.abs(angles_deg)))
    rows = []
    for p in range(n_p):
        x, y, z = xyz[p]
        for k in range(n_t):
            u = x * c[k] + z * s[k]  # position before the axis turn: (u, y)
            jx, jy = np.zeros(3 * n_p + 4 * n_t), np.zeros(3 * n_p + 4 * n_t)
            jx[3 * p:3 * p + 3] = c[k], 0.0, s[k]
            jy[3 * p + 1] = 1.0
            base = 3 * n_p + 4 * k
            jx[base] = -x * s[k] + z * c[k]  # d/d angle
            jx[base + 1], jy[base + 1] = -y, u  # d/d axis (a turn of (u, y) in the image plane)
            jx[base + 2], jy[base + 3] = 1.0, 1.0  # shifts
            rows += [jx, jy]
    jac = np.array(rows)
    held = [3 * n_p + 4 * ref, 3 * n_p + 4 * ref + 2, 3 * n_p + 4 * ref + 3]
    keep = np.setdiff1d(np.arange(jac.shape[1]), held)
    cov = np.zeros((jac.shape[1],) * 2)
    cov[np.ix_(keep, keep)] = np.linalg.inv(jac[:, keep].T @ jac[:, keep])
    angle = 3 * n_p + 4 * np.arange(n_t)
    centred = np.eye(n_t) - 1.0 / n_t  # the metric removes the common offset
    return centred @ cov[np.ix_(angle, angle)] @ centred


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigma", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6])
    parser.add_argument("--geometry", nargs="+", default=["fidelity", "sample"])
    args = parser.parse_args()
    angles = np.linspace(-60.0, 60.0, 41)
    rows = []
    print("| geometry | heights, RMS px | sigma px per axis | tilt angle RMS ° (bound) | "
          "|tilt| <= 9°: RMS ° | |tilt| >= 30°: RMS ° |")
    print("|---|---|---|---|---|---|")
    for name in args.geometry:
        xyz = fidelity_points() if name == "fidelity" else sample_points()
        cov = angle_covariance(xyz, angles)
        sd_deg = np.rad2deg(np.sqrt(np.diag(cov)))
        for sigma in args.sigma:
            sd = sigma * sd_deg
            row = {"geometry": name, "heights_rms_px": float(np.std(xyz[:, 2])), "sigma_px": sigma,
                   "tilt_angle_rms_deg": float(np.sqrt(np.mean(sd**2))),
                   "low_tilts_rms_deg": float(np.sqrt(np.mean(sd[np.abs(angles) <= 9] ** 2))),
                   "high_tilts_rms_deg": float(np.sqrt(np.mean(sd[np.abs(angles) >= 30] ** 2))),
                   "per_tilt_sd_deg": sd.tolist()}
            rows.append(row)
            print(f"| {name} | {row['heights_rms_px']:.1f} | {sigma:g} | {row['tilt_angle_rms_deg']:.3f} | "
                  f"{row['low_tilts_rms_deg']:.3f} | {row['high_tilts_rms_deg']:.3f} |")
    out = HERE / "results" / "tilt_bound.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
