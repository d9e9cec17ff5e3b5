"""Backprojection speed, memory and map quality: napari-cspt2d vs cryoDRGN ``backproject_voxel`` on the same data.

For each box (64, 128, 256) the script renders a known object (chiral Gaussian blobs, ``napari_cspt2d.sample``)
at random orientations analytically, applies a CTF (defocus 1-3 µm, 300 kV) and Gaussian noise, and writes the
images (``.mrcs``), poses and CTF (cryoDRGN pickles) to a scratch folder. Then, each in its own process (so peak RSS
is per run):

* ours: images streamed from the memory-mapped ``.mrcs`` in batches → FFT → CTF model → insertion into two half-map
  grids (Wiener reconstruction, FSC), with ``pad`` 1 and 2 (images zero-padded to the grid); pad 2 also with half
  the images (peak RSS must not grow) and with unpadded images (RELION's scheme: faster, less accurate);
* cryoDRGN: ``cryodrgn backproject_voxel images.mrcs --poses --ctf --uninvert-data`` (CTF "mul", half maps on), run
  from its own venv (``/work/venvs/cryodrgn`` or ``--cryodrgn``); its rate is from its own log line.

Reported: images/s of the backprojection (ours: reading + FFT + CTF + insertion; cryoDRGN: its "Backprojected N
images in T s", which includes its data loading), end-to-end seconds, peak RSS, and the resolution where the FSC
between each map and the truth falls below 0.143 and 0.5, without and with a soft mask around the object. Ours is
given for the Wiener-filtered map (the product) and for the unfiltered map (``reconstruct_single``), which is the
like-for-like comparison with cryoDRGN's unfiltered map: a masked FSC vs truth penalises a low-pass filtered map (the
mask's transform mixes strong low-frequency shells into the weak filtered ones). cryoDRGN's map has no gridding
correction, so it is tapered by sinc²(x / box) per axis, which damps the noise near the box edge and favours it on the
unmasked FSC; the last column applies the same taper to our unfiltered map. A table is printed and JSON written to
``benchmarks/results/backproject.json``.

Usage: ``python benchmarks/backproject.py [--boxes 64 128 256] [--images 64:3000 128:1500 256:300] [--no-cryodrgn]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_IMAGES = {64: 3000, 128: 1500, 256: 300}
PIXEL_A = 2.0
SNR = 0.05
BATCH = 256
#: cryoDRGN in its own venv (``pip install torch==2.13.0 cryodrgn``; see the README's benchmark section)
CRYODRGN = Path("/work/venvs/bench/bin/cryodrgn")


# ------------------------------------------------------------------------------------------------ data
def make_dataset(box: int, n: int, folder: Path, seed: int = 0) -> None:
    """Write ``images.mrcs`` (protein dark, CTF applied, noise), ``poses.pkl``, ``ctf.pkl`` and ``truth.npy``."""
    from scipy.spatial.transform import Rotation

    from napari_cspt2d.io import cryodrgn
    from napari_cspt2d.io.mrc import merge_images
    from napari_cspt2d.recon.ctf import ctf_2d
    from napari_cspt2d.sample import blob_model, render_map, render_projections

    rng = np.random.default_rng(seed)
    model = blob_model(radius_px=box * 0.2, n_blobs=24, seed=seed)  # inside 0.38 box: the FSC mask fits
    np.save(folder / "truth.npy", render_map(model, box))
    mats = Rotation.random(n, random_state=seed).as_matrix()
    dfu = rng.uniform(10000, 30000, n)
    dfv = dfu - rng.uniform(0, 500, n)
    ang = rng.uniform(0, 180, n)
    noise_sd = None

    def images():
        nonlocal noise_sd
        for start in range(0, n, BATCH):
            sl = slice(start, min(n, start + BATCH))
            proj = render_projections(model, mats[sl], box)
            c = ctf_2d((box, box), PIXEL_A, dfu[sl], dfv[sl], ang[sl])
            shifted = np.fft.ifftshift(proj, axes=(1, 2))
            clean = np.fft.fftshift(np.fft.irfft2(np.fft.rfft2(shifted) * c, s=(box, box)), axes=(1, 2))
            if noise_sd is None:
                noise_sd = float(np.sqrt(clean.var() / SNR))
            yield from (clean + rng.normal(0, noise_sd, clean.shape)).astype(np.float32)

    merge_images(folder / "images.mrcs", images(), n, PIXEL_A)
    cryodrgn.write_poses(folder / "poses.pkl", mats, np.zeros((n, 2)))
    params = np.zeros((n, 9), np.float32)
    params[:, 0], params[:, 1], params[:, 2], params[:, 3], params[:, 4] = box, PIXEL_A, dfu, dfv, ang
    params[:, 5], params[:, 6], params[:, 7] = 300.0, 2.7, 0.07
    cryodrgn.write_ctf(folder / "ctf.pkl", params)


# ------------------------------------------------------------------------------------------------ workers
def run_ours(folder: Path, pad: int, n_images: int, pad_images: bool = True) -> dict:
    """Stream the images through the backprojector; returns timings, peak RSS and FSC vs truth."""
    from napari_cspt2d.io import cryodrgn
    from napari_cspt2d.io.mrc import open_stack
    from napari_cspt2d.recon.backproject import Backprojector
    from napari_cspt2d.recon.ctf import image_model

    stack, _ = open_stack(folder / "images.mrcs")
    box = stack.shape[1]
    rot, _ = cryodrgn.read_poses(folder / "poses.pkl")
    ctf = cryodrgn.read_ctf(folder / "ctf.pkl")
    truth = np.load(folder / "truth.npy")
    warm = Backprojector(box, PIXEL_A, pad=pad, pad_images=pad_images)  # load the numba kernels outside the timing
    warm.insert(np.zeros((2, box, box), np.float32), rot[:2], half=[0, 1],
                model=image_model(box, PIXEL_A, ctf[:2, 2], exposure_e_A2=[0, 1], scale=[1, 1]))
    warm.close()
    del warm
    started = time.perf_counter()
    bp = Backprojector(box, PIXEL_A, pad=pad, pad_images=pad_images)
    for start in range(0, n_images, BATCH):
        sl = slice(start, min(n_images, start + BATCH))
        images = np.asarray(stack[sl], dtype=np.float32)
        c = ctf[sl]
        model = image_model(box, PIXEL_A, 0.5 * (c[:, 2] + c[:, 3]), astigmatism_A=c[:, 2] - c[:, 3],
                            astig_angle_deg=c[:, 4])
        bp.insert(images, rot[sl], half=np.arange(sl.start, sl.stop) % 2, model=model)
    bp.flush()
    inserted = time.perf_counter()
    res = bp.reconstruct()
    done = time.perf_counter()
    single = bp.reconstruct_single()
    unfiltered = {f"unfiltered_{k}": v for k, v in _vs_truth(single, truth).items()}
    # cryoDRGN's box-sized grid without gridding correction multiplies its map by sinc²(x / box) per axis
    taper = np.sinc((np.arange(box) - box // 2) / box) ** 2
    tapered = single * taper[:, None, None] * taper[None, :, None] * taper[None, None, :]
    unfiltered["unfiltered_tapered_fsc_truth_0143_A"] = _vs_truth(tapered, truth)["fsc_truth_0143_A"]
    bp.close()
    return {
        "images": n_images, "images_per_s": n_images / (inserted - started), "seconds_insert": inserted - started,
        "seconds_total": done - started, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **_vs_truth(res.full, truth), **unfiltered, "half_map_fsc_0143_A": res.fsc.resolution_A(0.143),
    }


def cryodrgn_backproject(folder: Path, exe: Path) -> tuple[np.ndarray, dict]:
    """Run cryoDRGN's ``backproject_voxel`` (from its own venv, ``exe``) on ``folder``'s ``images.mrcs`` (protein
    dark), ``poses.pkl`` and ``ctf.pkl`` in a child process; returns its map (its default output, ``backproject.mrc``)
    and its timings (rate from its own log line, wall seconds, peak RSS of the children)."""
    import mrcfile

    out = folder / "cryodrgn_out"
    cmd = [str(exe), "backproject_voxel", str(folder / "images.mrcs"), "--poses", str(folder / "poses.pkl"),
           "--ctf", str(folder / "ctf.pkl"), "-o", str(out), "--uninvert-data"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"cryoDRGN failed:\n{proc.stderr[-2000:]}")
    log = proc.stdout + proc.stderr
    match = re.search(r"Backprojected ([\d,]+) images in ([\d.]+)s", log)
    n, seconds = int(match.group(1).replace(",", "")), float(match.group(2))
    with mrcfile.open(out / "backproject.mrc", permissive=True) as m:
        vol = np.array(m.data, dtype=np.float32)
    return vol, {"images": n, "images_per_s": n / seconds, "seconds_insert": seconds, "seconds_total": wall,
                 "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def run_cryodrgn(folder: Path, exe: Path) -> dict:
    """:func:`cryodrgn_backproject` and the FSC of its map vs the truth."""
    vol, stats = cryodrgn_backproject(folder, exe)
    return {**stats, **_vs_truth(vol, np.load(folder / "truth.npy"))}


def truth_mask(truth: np.ndarray) -> np.ndarray:
    """Soft mask around the object: truth above 1% of its peak, dilated 3 px, 3 px cosine edge (RELION-style)."""
    from scipy.ndimage import distance_transform_edt

    outside = distance_transform_edt(truth < 0.01 * truth.max())
    return np.where(outside <= 3, 1.0, 0.5 + 0.5 * np.cos(np.pi * np.clip(outside - 3, 0, 3) / 3))


def _vs_truth(vol: np.ndarray, truth: np.ndarray) -> dict:
    """Resolution (Å) where the FSC between a map and the truth falls below 0.143 and 0.5: without a mask, and with
    a soft mask around the object (truth above 1% of its peak, dilated 3 px, 3 px cosine edge), as in RELION's
    post-processing. The mask takes solvent noise out of the comparison, so an implicit taper of the whole box (a
    map without gridding correction, like cryoDRGN's) does not count as resolution."""
    from napari_cspt2d.recon.fsc import fsc_curve

    mask = truth_mask(truth)
    plain, masked = fsc_curve(vol, truth, PIXEL_A), fsc_curve(vol, truth, PIXEL_A, mask=mask)
    return {"fsc_truth_0143_A": plain.resolution_A(0.143), "fsc_truth_05_A": plain.resolution_A(0.5),
            "masked_fsc_truth_0143_A": masked.resolution_A(0.143), "masked_fsc_truth_05_A": masked.resolution_A(0.5)}


def in_child(*args: str) -> dict:
    """Run this script's ``--worker`` mode in a fresh process (its own peak RSS) and return its JSON."""
    proc = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--boxes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--images", nargs="*", default=[], help="box:count overrides, e.g. 128:1000")
    parser.add_argument("--cryodrgn", type=Path, default=CRYODRGN)
    parser.add_argument("--no-cryodrgn", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "backproject.json")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, folder = args.worker[0], Path(args.worker[1])
        result = (run_ours(folder, int(args.worker[2]), int(args.worker[3]), args.worker[4] == "dense")
                  if kind == "ours" else run_cryodrgn(folder, Path(args.worker[2])))
        print(json.dumps(result))
        return

    counts = dict(DEFAULT_IMAGES)
    counts.update({int(k): int(v) for k, v in (item.split(":") for item in args.images)})
    use_cryodrgn = not args.no_cryodrgn and args.cryodrgn.exists()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_bp_") as tmp:
        for box in args.boxes:
            n = counts[box]
            folder = Path(tmp) / str(box)
            folder.mkdir()
            make_dataset(box, n, folder)
            runs = [("ours pad 1", ("ours", str(folder), "1", str(n), "dense")),
                    ("ours pad 2", ("ours", str(folder), "2", str(n), "dense")),
                    ("ours pad 2, half the images", ("ours", str(folder), "2", str(n // 2), "dense")),
                    ("ours pad 2, unpadded images", ("ours", str(folder), "2", str(n), "sparse"))]
            if use_cryodrgn:
                runs.append(("cryoDRGN backproject_voxel", ("cryodrgn", str(folder), str(args.cryodrgn))))
            for label, worker_args in runs:
                result = in_child(*worker_args)
                rows.append({"box": box, "method": label, **result})
                print(f"box {box:4d}  {label:30s} {result['images_per_s']:9.1f} img/s  "
                      f"{result['peak_rss_mb']:7.0f} MB  FSC(truth) 0.143: {result['fsc_truth_0143_A']:.2f} Å",
                      flush=True)

    print("\n| box | method | images | images/s | insert s | total s | peak RSS MB | FSC vs truth 0.143 / 0.5 (Å) |"
          " masked 0.143 / 0.5 (Å) | unfiltered map, masked 0.143 / 0.5 (Å) |"
          " unfiltered × cryoDRGN's taper 0.143 (Å) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        unfiltered = (f"{r['unfiltered_masked_fsc_truth_0143_A']:.2f} / {r['unfiltered_masked_fsc_truth_05_A']:.2f} | "
                      f"{r['unfiltered_tapered_fsc_truth_0143_A']:.2f}" if "unfiltered_masked_fsc_truth_05_A" in r
                      else "- | -")
        print(f"| {r['box']} | {r['method']} | {r['images']} | {r['images_per_s']:.1f} | {r['seconds_insert']:.2f} | "
              f"{r['seconds_total']:.2f} | {r['peak_rss_mb']:.0f} | {r['fsc_truth_0143_A']:.2f} / "
              f"{r['fsc_truth_05_A']:.2f} | {r['masked_fsc_truth_0143_A']:.2f} / {r['masked_fsc_truth_05_A']:.2f} | "
              f"{unfiltered} |")
    speedups: dict[str, dict[int, float]] = {}
    for box in args.boxes:
        theirs = next((r for r in rows if r["box"] == box and r["method"].startswith("cryoDRGN")), None)
        for label in ("ours pad 2", "ours pad 2, unpadded images"):
            ours = next(r for r in rows if r["box"] == box and r["method"] == label)
            if theirs:
                speedups.setdefault(label, {})[box] = ours["images_per_s"] / theirs["images_per_s"]
                print(f"box {box}: {label} rate / cryoDRGN rate = {speedups[label][box]:.1f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "pixel_A": PIXEL_A, "snr": SNR, "batch": BATCH, "load_avg_at_end": os.getloadavg()}
    from napari_cspt2d.io.atomic import atomic_open

    with atomic_open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"meta": meta, "rows": rows, "speedup_vs_cryodrgn": speedups}, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
