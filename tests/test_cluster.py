"""cluster.py without a SLURM: local clients, an existing scheduler, bundling, settings checks, and the SLURM job
script written through a stand-in ``sbatch`` (the real SLURM runs are in test_slurm.py)."""

from __future__ import annotations

import os
import socket
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path

import dask
import pytest
from distributed import LocalCluster

from napari_cspt2d import cluster
from napari_cspt2d.cluster import bundle, dashboard_link, make_client, slurm_job_extra
from napari_cspt2d.errors import CsptInputError, CsptRunError


# ------------------------------------------------------------------------------------------------ bundle
@pytest.mark.parametrize("n_items", [0, 1, 5, 6, 7])
@pytest.mark.parametrize("size", [1, 2, 3, 10])
def test_bundle_keeps_every_item_once_in_order(n_items, size):
    items = [f"p{i}" for i in range(n_items)]
    bundles = bundle(items, size)
    assert [x for b in bundles for x in b] == items
    assert len(bundles) == -(-n_items // size)
    assert all(len(b) == size for b in bundles[:-1])
    assert all(1 <= len(b) <= size for b in bundles)


def test_bundle_takes_any_iterable():
    assert bundle((i * i for i in range(5)), 2) == [[0, 1], [4, 9], [16]]


@pytest.mark.parametrize("size", [0, -2, 1.5, True, "2", None])
def test_bundle_rejects_bad_size_naming_the_key(size):
    with pytest.raises(CsptInputError) as err:
        bundle(range(4), size)
    assert err.value.field == "slurm_bundle_size"


# ------------------------------------------------------------------------------------------------ local
def test_local_client_runs_tasks_in_single_threaded_worker_processes():
    with make_client({"cluster_backend": "local", "workers": 2}) as client:
        workers = client.scheduler_info()["workers"].values()
        assert len(workers) == 2 and all(w["nthreads"] == 1 for w in workers)
        pids = set(client.gather(client.map(lambda _: os.getpid(), range(8), pure=False)))
        assert os.getpid() not in pids and 1 <= len(pids) <= 2
        sums = client.gather(client.map(sum, bundle(range(10), 3)))
        assert sums == [3, 12, 21, 9]
    assert client.status == "closed"


def _preloaded() -> tuple[bool, int]:
    import sys

    from napari_cspt2d.recon import backproject

    return "napari_cspt2d.recon.worker_preload" in sys.modules, len(backproject._divide.signatures)


def test_local_workers_start_with_the_pipeline_loaded():
    """Workers are forked from a server that imported the pipeline and loaded its kernels (WORKER_PRELOAD)."""
    with make_client({"cluster_backend": "local", "workers": 2}) as client:
        found = client.run(_preloaded)
    assert len(found) == 2 and all(imported and kernels >= 1 for imported, kernels in found.values()), found


def test_worker_preload_leaves_one_thread_and_loaded_kernels():
    """A process that forks workers must hold no threads after the warm-up."""
    import subprocess
    import sys

    code = ("import threading; from napari_cspt2d.recon import backproject, refine, worker_preload; "
            "print(threading.active_count(), len(backproject._divide.signatures), backproject.WORKERS)")
    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], capture_output=True, text=True,
                         timeout=300, check=True)
    threads, kernels, workers = map(int, out.stdout.split())
    assert threads == 1 and kernels >= 1 and workers == 1, out


def test_workers_default_to_cores_and_never_exceed_tasks():
    cores = len(os.sched_getaffinity(0))
    with make_client({"cluster_backend": "local"}) as client:
        assert len(client.scheduler_info()["workers"]) == cores
    with make_client({"cluster_backend": "local", "workers": 3}, workers=2, tasks=1) as client:
        assert len(client.scheduler_info()["workers"]) == 1


def test_dashboard_link_points_at_the_schedulers_http_server():
    with make_client({"cluster_backend": "local", "workers": 1}) as client:
        link = dashboard_link(client)
        port = client.scheduler_info()["services"]["dashboard"]
        assert link is not None and link.startswith("http://") and f":{port}/" in link
        assert port != 8787  # an ephemeral port: two runs on one machine do not clash
        with urllib.request.urlopen(link, timeout=10) as page:
            assert page.status == 200
    with make_client({"cluster_backend": "local", "workers": 1}, dashboard=False) as client:  # as the pipeline
        link = dashboard_link(client)  # the scheduler's HTTP server, without the dashboard's pages
        assert client.scheduler_info()["services"]["dashboard"] != 8787
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(link, timeout=10)


def test_a_worker_that_dies_mid_task_is_a_run_error():
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with pytest.raises(CsptRunError, match="died while running task") as err:
            with make_client({"cluster_backend": "local", "workers": 1}) as client:
                client.submit(os._exit, 3).result()
    assert err.value.log_path is None


# ------------------------------------------------------------------------------------------------ address
def test_existing_scheduler_is_used_and_left_running():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as external:
        params = {"cluster_backend": "address", "cluster_address": external.scheduler_address}
        with make_client(params) as client:
            assert client.submit(sum, [1, 2, 3]).result() == 6
        # the argument wins over cluster_backend
        with make_client({"cluster_backend": "local"}, scheduler_address=external.scheduler_address) as client:
            assert client.scheduler.address == external.scheduler_address
        assert external.status.name == "running"


def test_unreachable_scheduler_names_the_key(monkeypatch):
    monkeypatch.setattr(cluster, "_CONNECT_TIMEOUT_S", 1)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CsptInputError) as err:
        with make_client({"cluster_backend": "address", "cluster_address": f"tcp://127.0.0.1:{port}"}):
            pass
    assert err.value.field == "cluster_address"


# ------------------------------------------------------------------------------------------------ bad settings
@pytest.mark.parametrize(
    "params, kwargs, field",
    [
        ({"cluster_backend": "pbs"}, {}, "cluster_backend"),
        ({"cluster_backend": "address"}, {}, "cluster_address"),
        ({"cluster_address": "not an address"}, {}, "cluster_address"),
        ({"workers": -1}, {}, "workers"),
        ({}, {"workers": "2"}, "workers"),
        ({}, {"workers": 1.5}, "workers"),
        ({}, {"tasks": 0}, "tasks"),
        ({}, {"scheduler_address": "host name:1"}, "scheduler_address"),
        ({"cluster_backend": "slurm", "slurm_tasks": 0}, {}, "slurm_tasks"),
        ({"cluster_backend": "slurm", "slurm_memory": "lots"}, {}, "slurm_memory"),
        ({"cluster_backend": "slurm", "slurm_walltime": "2h"}, {}, "slurm_walltime"),
        ({"cluster_backend": "slurm", "slurm_queue": "a b"}, {}, "slurm_queue"),
        ({"cluster_backend": "slurm", "slurm_bundle_size": 0}, {}, "slurm_bundle_size"),
    ],
)
def test_bad_settings_name_the_key(params, kwargs, field):
    with pytest.raises(CsptInputError) as err:
        with make_client(params, **kwargs):
            pass
    assert field in (err.value.field or "")


def test_slurm_job_extra_is_split_on_semicolons():
    assert slurm_job_extra({"slurm_job_extra": " --gres=gpu:1; #SBATCH --constraint=avx2 ;;"}) == [
        "--gres=gpu:1", "--constraint=avx2"]
    assert slurm_job_extra({"slurm_job_extra": ""}) == []
    with pytest.raises(CsptInputError) as err:
        slurm_job_extra({"slurm_job_extra": "--exclusive; gres=gpu:1"})
    assert err.value.field == "slurm_job_extra"


def test_slurm_backend_needs_sbatch(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(CsptInputError, match="sbatch") as err:
        with make_client({"cluster_backend": "slurm"}):
            pass
    assert err.value.field == "cluster_backend"


# ------------------------------------------------------------------------------------------------ SLURM job script
def _fake_slurm(bin_dir: Path, refuse: str = "") -> Path:
    """Stand-in sbatch/scancel: `--test-only` answers like SLURM (refusing with ``refuse`` if given); a submission
    keeps the job script in ``bin_dir/jobs`` and prints a job id."""
    jobs = bin_dir / "jobs"
    jobs.mkdir(parents=True)
    scripts = {
        "sbatch": f"""#!/bin/sh
if [ "$1" = "--test-only" ]; then
  [ -n "{refuse}" ] && {{ echo "sbatch: error: {refuse}" >&2; exit 1; }}
  echo "sbatch: Job 1 to start at now" >&2; exit 0
fi
cp "$1" {jobs}/$$.sh; echo "Submitted batch job $$"
""",
        "scancel": "#!/bin/sh\nexit 0\n",
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return jobs


def _wait_for_files(folder: Path, n: int, timeout_s: float = 20.0) -> list[Path]:
    deadline = time.monotonic() + timeout_s
    while len(files := sorted(folder.iterdir())) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    return files


def test_slurm_settings_become_sbatch_directives(monkeypatch, tmp_path):
    jobs = _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    params = {"cluster_backend": "slurm", "data_set": "demo", "slurm_queue": "short", "slurm_account": "lab",
              "slurm_walltime": "02:00:00", "slurm_tasks": 2, "slurm_memory": 6,
              "slurm_job_extra": "--gres=gpu:1;--constraint=avx2", "slurm_bundle_size": 3}
    with make_client(params, tasks=5, project_dir=tmp_path / "project"):
        scripts = _wait_for_files(jobs, 5)
    assert len(scripts) == 5  # workers = 0: one job per task (bundle)
    lines = set(scripts[0].read_text().splitlines())
    log = (tmp_path / "project" / "log").resolve()
    for expected in ["#SBATCH -J cspt2d-demo", f"#SBATCH -e {log}/cspt2d-demo-%J.err", "#SBATCH -p short",
                     "#SBATCH -A lab", "#SBATCH -t 02:00:00", "#SBATCH --cpus-per-task=2", "#SBATCH --mem=6G",
                     "#SBATCH --gres=gpu:1", "#SBATCH --constraint=avx2"]:
        assert expected in lines
    worker_cmd = next(line for line in lines if "dask_worker" in line)
    assert "--nworkers 2" in worker_cmd and "--nthreads 1" in worker_cmd  # slurm_tasks processes per job


def test_fixed_job_count_and_sbatch_refusal(monkeypatch, tmp_path):
    jobs = _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with make_client({"cluster_backend": "slurm", "workers": 2}, tasks=9, project_dir=tmp_path):
        assert len(_wait_for_files(jobs, 2)) == 2
    time.sleep(0.5)
    assert len(list(jobs.iterdir())) == 2

    refusing = tmp_path / "refusing"
    _fake_slurm(refusing, refuse="invalid account or account/partition combination specified")
    monkeypatch.setenv("PATH", f"{refusing}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(CsptInputError, match="invalid account") as err:
        with make_client({"cluster_backend": "slurm", "slurm_account": "nobody"}, project_dir=tmp_path):
            pass
    assert err.value.field == "slurm_account"
    assert not list((refusing / "jobs").iterdir())  # nothing submitted
