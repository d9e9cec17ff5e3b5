"""make_client on a real SLURM (one node on this machine, started by `bash .ci/slurm start`).

Skipped, with the reason, when ``sinfo`` is missing or the node is not up. Jobs are counted from SLURM itself:
``squeue`` while they live, and the job-completion file (``JobCompLoc``, jobcomp/filetxt; no slurmdbd for sacct).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from napari_cspt2d.cluster import JOB_NAME, bundle, make_client
from napari_cspt2d.errors import CsptInputError, CsptRunError

pytestmark = pytest.mark.slurm


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout


@pytest.fixture(scope="module")
def partition() -> str:
    """The default partition of a SLURM whose node is up."""
    if shutil.which("sinfo") is None:
        pytest.skip("SLURM is not installed (no sinfo); `bash .ci/slurm start` installs and starts a one-node SLURM")
    try:
        states = _run("sinfo", "-h", "-N", "-o", "%T").split()
    except subprocess.TimeoutExpired:
        states = []
    if not {"idle", "mixed"} & set(states):
        pytest.skip(f"no idle SLURM node (sinfo node states: {states or 'none, controller not answering'}); "
                    "run `bash .ci/slurm start`")
    names = _run("sinfo", "-h", "-o", "%P").split()
    return next((n.rstrip("*") for n in names if n.endswith("*")), names[0])


@pytest.fixture()
def params(partition: str) -> dict:
    """Small jobs (1 core, 1 GB, 10 min) under a job name unique to the test."""
    return {"cluster_backend": "slurm", "data_set": f"t{uuid.uuid4().hex[:8]}", "slurm_queue": partition,
            "slurm_memory": 1, "slurm_walltime": "10", "slurm_tasks": 1}


def _queued(job_name: str) -> list[str]:
    return _run("squeue", "-h", "-n", job_name, "-o", "%i").split()


def _completed(job_name: str) -> list[str]:
    """Job ids recorded under ``job_name`` in the job-completion file ([] when SLURM keeps no such file)."""
    config = _run("scontrol", "show", "config")
    loc = next((line.split("=", 1)[1].strip() for line in config.splitlines() if line.startswith("JobCompLoc")), "")
    if not loc or not Path(loc).is_file():
        return []
    records = [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in Path(loc).read_text().splitlines()]
    return [r["JobId"] for r in records if r.get("Name") == job_name]


def _wait(predicate, timeout_s: float = 30.0, step_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(step_s)
    return value


def test_tasks_run_inside_slurm_jobs(params, tmp_path):
    with make_client(params, workers=1, project_dir=tmp_path) as client:
        job_ids = set(client.gather(client.map(os.getenv, ["SLURM_JOB_ID"] * 4, pure=False)))
        sums = client.gather(client.map(sum, bundle(range(20), 7)))
        queued = _queued(f"{JOB_NAME}-{params['data_set']}")
    assert sums == [21, 70, 99]
    assert len(job_ids) == 1 and job_ids == set(queued)  # the tasks ran in the one job SLURM lists
    (job_id,) = job_ids
    logs = {p.name for p in (tmp_path / "log").iterdir()}
    assert {f"{JOB_NAME}-{params['data_set']}-{job_id}.err", f"{JOB_NAME}-{params['data_set']}-{job_id}.out"} <= logs


@pytest.mark.parametrize("n_items, bundle_size, expected_jobs", [(6, 3, 2), (5, 5, 1)])
def test_one_job_per_bundle(params, tmp_path, n_items, bundle_size, expected_jobs):
    name = f"{JOB_NAME}-{params['data_set']}"
    bundles = bundle(range(n_items), bundle_size)
    with make_client({**params, "slurm_bundle_size": bundle_size}, tasks=len(bundles), project_dir=tmp_path) as client:
        assert client.gather(client.map(len, bundles)) == [len(b) for b in bundles]
        queued = _wait(lambda: len(_queued(name)) >= expected_jobs and _queued(name), 10)
        time.sleep(1)  # a job submitted late would show up now
        queued = _queued(name)
    assert len(queued) == expected_jobs
    completed = _wait(lambda: len(_completed(name)) >= expected_jobs and _completed(name), 20)
    if completed:  # jobcomp/filetxt (the .ci/slurm setup) records every ended job, cancelled ones included
        assert sorted(completed) == sorted(queued)


def test_processes_per_job_follow_slurm_tasks(params, tmp_path):
    if int(_run("sinfo", "-h", "-o", "%c").split()[0].rstrip("+")) < 2:
        pytest.skip("the SLURM node has fewer than 2 CPUs")
    with make_client({**params, "slurm_tasks": 2}, workers=1, project_dir=tmp_path) as client:
        client.wait_for_workers(2, timeout=60)
        pids = set(client.gather(client.map(lambda _: os.getpid(), range(6), pure=False)))
        assert len(client.scheduler_info()["workers"]) == 2
        assert len(_queued(f"{JOB_NAME}-{params['data_set']}")) == 1
    assert 1 <= len(pids) <= 2


def test_cancelled_job_is_reported_with_its_log(params, tmp_path):
    name = f"{JOB_NAME}-{params['data_set']}"
    with pytest.raises(CsptRunError) as err:
        with make_client(params, workers=1, project_dir=tmp_path) as client:
            future = client.submit(time.sleep, 120)
            assert _wait(lambda: any(client.processing().values()), 60), "the task never started"
            (job_id,) = _queued(name)
            subprocess.run(["scancel", job_id], check=True)
            future.result(timeout=60)
    log = Path(err.value.log_path)
    assert log == (tmp_path / "log" / f"{name}-{job_id}.err").resolve()
    assert f"SLURM job {job_id}" in str(err.value) and str(log) in str(err.value)
    assert _wait(lambda: "CANCELLED" in log.read_text(), 10)  # slurmstepd's own line says why


def test_partition_slurm_refuses_names_the_key(params, tmp_path):
    with pytest.raises(CsptInputError, match="partition") as err:
        with make_client({**params, "slurm_queue": "no_such_partition"}, project_dir=tmp_path):
            pass
    assert err.value.field == "slurm_queue"
    assert not _queued(f"{JOB_NAME}-{params['data_set']}")


@pytest.mark.slow
def test_csp_split_on_slurm_matches_the_local_run(small_sample, params, tmp_path):
    from napari_cspt2d import pyp
    from napari_cspt2d.io.mrc import read_image
    from napari_cspt2d.sample import write_sample

    name = params["data_set"]
    bundle_size = 6  # 12 particles: 2 bundles, so 2 SLURM jobs
    results = {}
    for backend in ("local", "slurm"):
        root = tmp_path / backend
        write_sample(small_sample, root, name)
        project = pyp.load_parameters(root)
        project.update({**params, "cluster_backend": backend, "slurm_bundle_size": bundle_size,
                        "refine_maxiter": 2})
        pyp.save_parameters(project, root)
        results[backend] = pyp.csp_split(pyp.load_parameters(root), 2, project_dir=root)
    (local_par,), (slurm_par,) = results["local"]["parameters"], results["slurm"]["parameters"]
    assert Path(slurm_par).parent.parent.parent == tmp_path / "slurm"
    a, b = pyp.Parameters.from_file(local_par).data, pyp.Parameters.from_file(slurm_par).data
    assert a.shape == b.shape and np.allclose(a, b, rtol=1e-6, atol=1e-4)
    map_local, map_slurm = read_image(results["local"]["map"]), read_image(results["slurm"]["map"])
    assert np.allclose(map_local, map_slurm, atol=1e-5 * float(np.abs(map_local).max()))
    job_logs = sorted((tmp_path / "slurm" / "log").glob(f"{JOB_NAME}-{name}-*.err"))
    assert len(job_logs) == 2  # one job per bundle
    completed = _wait(lambda: len(_completed(f"{JOB_NAME}-{name}")) >= 2 and _completed(f"{JOB_NAME}-{name}"), 20)
    assert not completed or len(completed) == 2
