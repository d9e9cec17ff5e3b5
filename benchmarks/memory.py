"""Peak memory of the CSPT pipeline on a large project: by default 10,000 particles × 41 tilts (410,000 projections),
box 64, on a 2048² tilt series, with a LocalCluster of 2 workers. Goal (issue 9): under 4 GB, streamed.

The project
    :func:`napari_cspt2d.sample.make_sample` keeps the whole clean stack and the rendered boxes in memory and spaces
    the particles so they do not overlap (10,000 of them would need an ~8k² × 41 stack, 10 GB). So a base sample of
    ``particles / tiles²`` particles is rendered on one tile (``image-size / tiles`` px, particles overlapping, which
    is fine for a memory benchmark) and repeated ``tiles × tiles`` times: the stack is streamed section by section
    (:func:`napari_cspt2d.io.mrc.merge_images`, one 2048² section in memory) and each copy of a particle gets its own
    id and the picks of the original moved by the tile's offset (the picks carry no 3D coordinates, so this is the
    same data at another place). Generation is not measured.

What runs (in a child process, whose process tree is measured)
    ``run_cspt`` of iterations 1..2 of the whole project with ``workers`` dask workers and ``slurm_bundle_size``
    particles per job: the initial reconstruction of all projections (iteration 1), then one refinement iteration
    of all particles with all their tilts (split into one region file pair per particle, refine, merge,
    reconstruct all projections). From smoke runs at 300 and 1,000 particles on a loaded 2-core machine this takes
    about 15 minutes at 10,000 particles (refinement ~60 %, the two reconstructions ~25 %, the split ~10 %), plus
    about a minute to generate the project. ``--refine-tilts D`` refines with the tilts within ±D° only
    (``csp_UseImagesForRefinementMin/Max``; every projection is still extracted and reconstructed), about 25 % less
    refinement time at ±4°.

Measured
    The child's process tree (the run and its dask workers) is sampled every 0.25 s with psutil: the sum of PSS
    (proportional set size: shared pages such as the memory-mapped stack counted once, split between the processes
    that map them; this is the goal's number), the sum of USS (private memory) and the sum of RSS (shared pages
    counted in every process), the peak of each per pipeline stage (from the run's progress), plus the largest
    single-process peak RSS (``getrusage`` of the children). A table is printed and JSON written to
    ``benchmarks/results/memory.json``.

Usage: ``python benchmarks/memory.py [--particles 10000] [--tilts 41] [--image-size 2048] [--tiles 4] [--workers 2]
[--bundle-size 50] [--refine-tilts 90] [--workdir DIR]``; smoke test: ``--particles 300 --image-size 1024 --tiles 2
--out /tmp/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MB = 1024 * 1024
BOX = 64


# ------------------------------------------------------------------------------------------------ the project
def write_project(root: Path, particles: int, tilts: int, image_size: int, tiles: int) -> dict:
    """A project of ``particles`` particles: a rendered base tile repeated ``tiles × tiles`` times (module
    docstring). Returns the sample's parameters."""
    from napari_cspt2d.io.mrc import merge_images
    from napari_cspt2d.model.tracks import ParticleTable, TrackSet
    from napari_cspt2d.pyp import create_project
    from napari_cspt2d.sample import make_sample

    tile = image_size // tiles
    per_tile = math.ceil(particles / tiles**2)
    base = make_sample(n_particles=per_tile, n_tilts=tilts, shape_yx=(tile, tile), box=BOX, thickness_px=20.0)
    offsets = [(j * tile, i * tile) for i in range(tiles) for j in range(tiles)]
    root.mkdir(parents=True, exist_ok=True)
    stack = root / "bench_stack.mrc"
    merge_images(stack, (np.tile(section, (tiles, tiles)) for section in base.stack), tilts, base.pixel_A)
    src = base.tracks
    pid, tid, xy, euler = [], [], [], []
    for copy, (dx, dy) in enumerate(offsets):
        pid.append(src.particle + copy * per_tile)
        tid.append(src.tilt)
        xy.append(src.positions_px() + [dx, dy])
        euler.append(src.particles.euler_deg)
    pid, tid, xy = np.concatenate(pid), np.concatenate(tid), np.concatenate(xy)
    ids = np.unique(pid)[:particles]
    keep = np.isin(pid, ids)
    table = ParticleTable(ids, np.zeros((ids.size, 3)), np.concatenate(euler)[: ids.size])
    tracks = TrackSet.from_positions(pid[keep], tid[keep], xy[keep], src.tilts, (tile * tiles,) * 2,
                                     particles=table)
    create_project(root, "bench", stack, tracks, dict(base.params, data_set="bench"), angles=src.tilts)
    return base.params


# ------------------------------------------------------------------------------------------------ the run (child)
def run_child(root: Path, stage_file: Path, result_file: Path, workers: int, bundle_size: int,
              refine_tilts_deg: float) -> None:
    """Iterations 1..2 of the project (module docstring); the current stage goes to ``stage_file``."""
    from napari_cspt2d import pyp
    from napari_cspt2d.recon.pipeline import run_cspt

    params = pyp.load_parameters(root)
    params.update({"refine_maxiter": 2, "slurm_bundle_size": bundle_size, "workers": workers,
                   "csp_UseImagesForRefinementMin": -refine_tilts_deg,
                   "csp_UseImagesForRefinementMax": refine_tilts_deg})
    last = [""]

    def progress(stage: str, done: int, total: int) -> None:
        if stage != last[0]:
            last[0] = stage
            stage_file.write_text(stage)

    started = time.perf_counter()
    run = run_cspt(params, project_dir=root, workers=workers, stop_when_converged=False, progress=progress)
    result = {"seconds": time.perf_counter() - started, "timings_s": run.timings,
              "iterations": [{k: float(v) for k, v in it.items()} for it in run.iterations]}
    result_file.write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------ measuring
class TreeSampler:
    """Samples the memory of a process and its descendants every ``interval_s`` (PSS, USS and RSS summed over the
    tree), keeping the peak of each per stage label read from ``stage_file``."""

    def __init__(self, pid: int, stage_file: Path, interval_s: float = 0.25) -> None:
        self.pid, self.stage_file, self.interval_s = pid, stage_file, interval_s
        self.peaks: dict[str, dict[str, float]] = {}
        self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> dict[str, float]:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return {}
        total = {"pss": 0.0, "uss": 0.0, "rss": 0.0}
        for proc in procs:
            try:
                info = proc.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for key in total:
                total[key] += getattr(info, key) / MB
        self.processes = max(self.processes, len(procs))
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            sample = self._sample()
            if sample:
                stage = _stage_name(self.stage_file.read_text() if self.stage_file.exists() else "start")
                peak = self.peaks.setdefault(stage, dict.fromkeys(sample, 0.0))
                for key, value in sample.items():
                    peak[key] = max(peak[key], value)
            self._stop.wait(self.interval_s)

    def overall(self) -> dict[str, float]:
        return {key: max((p[key] for p in self.peaks.values()), default=0.0) for key in ("pss", "uss", "rss")}


def _stage_name(label: str) -> str:
    """``"iteration 2: refine"`` from a progress label (counts and details dropped)."""
    return label.split(" (")[0].strip()


def measure(root: Path, workers: int, bundle_size: int, refine_tilts_deg: float) -> dict:
    """Run :func:`run_child` in a child process and sample its tree; returns the run's result and the peaks."""
    stage_file, result_file = root / "bench_stage.txt", root / "bench_result.json"
    command = [sys.executable, __file__, "--child", str(root), "--workers", str(workers),
               "--bundle-size", str(bundle_size), "--refine-tilts", str(refine_tilts_deg)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    child = subprocess.Popen(command)
    with TreeSampler(child.pid, stage_file) as sampler:
        code = child.wait()
    if code != 0:
        raise SystemExit(f"the pipeline run failed (exit {code})")
    result = json.loads(result_file.read_text())
    result.update(peaks_mb=sampler.peaks, peak_mb=sampler.overall(), processes=sampler.processes,
                  largest_process_rss_mb=max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) / 1024)
    return result


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=10_000)
    parser.add_argument("--tilts", type=int, default=41)
    parser.add_argument("--image-size", type=int, default=2048, help="tilt images are image-size² px")
    parser.add_argument("--tiles", type=int, default=4, help="the base sample is repeated tiles × tiles times")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bundle-size", type=int, default=50, help="particles per dask job (slurm_bundle_size)")
    parser.add_argument("--refine-tilts", type=float, default=90.0,
                        help="refine with the tilts within ± this many degrees (default 90: all)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the project here (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "memory.json")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        run_child(args.child, args.child / "bench_stage.txt", args.child / "bench_result.json", args.workers,
                  args.bundle_size, args.refine_tilts)
        return

    with tempfile.TemporaryDirectory(prefix="cspt2d-memory-") as tmp:
        root = (args.workdir or Path(tmp)) / "project"
        t0 = time.perf_counter()
        write_project(root, args.particles, args.tilts, args.image_size, args.tiles)
        generate_s = time.perf_counter() - t0
        stack_mb = (root / "bench_stack.mrc").stat().st_size / MB
        load = os.getloadavg()
        result = measure(root, args.workers, args.bundle_size, args.refine_tilts)

    n = args.particles * args.tilts
    print(f"CSPT pipeline memory: {args.particles} particles × {args.tilts} tilts = {n} projections, box {BOX}, "
          f"{args.image_size}² stack ({stack_mb:.0f} MB, generated in {generate_s:.0f} s), {args.workers} workers, "
          f"{args.bundle_size} particles per job, refinement tilts ±{args.refine_tilts:g}°; load before "
          f"{load[0]:.1f}; up to {result['processes']} processes")
    header = f"{'stage':<34}{'Σ PSS MB':>10}{'Σ USS MB':>10}{'Σ RSS MB':>10}"
    print(header)
    print("-" * len(header))
    for stage, peak in result["peaks_mb"].items():
        print(f"{stage[:33]:<34}{peak['pss']:>10.0f}{peak['uss']:>10.0f}{peak['rss']:>10.0f}")
    print("-" * len(header))
    overall = result["peak_mb"]
    print(f"{'peak':<34}{overall['pss']:>10.0f}{overall['uss']:>10.0f}{overall['rss']:>10.0f}")
    print(f"largest single process: {result['largest_process_rss_mb']:.0f} MB RSS; run {result['seconds']:.0f} s: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in result["timings_s"].items()))
    print(f"goal: peak memory (Σ PSS) < 4 GB: {'met' if overall['pss'] < 4096 else 'NOT met'} "
          f"({overall['pss'] / 1024:.2f} GB)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "particles": args.particles, "tilts": args.tilts, "projections": n, "box": BOX,
        "image_size": args.image_size, "tiles": args.tiles, "stack_mb": stack_mb, "workers": args.workers,
        "bundle_size": args.bundle_size, "refine_tilts_deg": args.refine_tilts, "generate_s": generate_s,
        "load_average_before": load, "load_average_after": os.getloadavg(), "cpu_count": os.cpu_count(),
        "machine": platform.platform(), "python": platform.python_version(), **result}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
