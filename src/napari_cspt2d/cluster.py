"""Where the per-particle work runs: a dask ``Client`` on local processes, an existing scheduler, or SLURM jobs.

The backend comes from the project's cluster parameters (:data:`~napari_cspt2d.model.params.PARAMS`, group
"cluster"):

* ``cluster_backend = "local"``: a ``LocalCluster`` of single-threaded worker processes, ``workers`` of them
  (0 = one per CPU core).
* ``cluster_backend = "address"``: the dask scheduler at ``cluster_address`` (its workers are someone else's).
* ``cluster_backend = "slurm"``: ``dask_jobqueue.SLURMCluster``. Each SLURM job asks for ``slurm_tasks`` cores and
  ``slurm_memory`` GB for ``slurm_walltime`` in ``slurm_queue`` / ``slurm_account`` (plus the ``;``-separated
  ``slurm_job_extra`` directives) and runs ``slurm_tasks`` single-threaded dask worker processes. ``workers`` jobs
  are submitted (0 = one per bundle of ``slurm_bundle_size`` tasks, see :func:`bundle`). Every job writes
  ``log/cspt2d[-{data_set}]-{job id}.err`` (worker log, and SLURM's own "CANCELLED"/"TIME LIMIT" line) and ``.out``
  in the project folder. The job settings are checked with ``sbatch --test-only`` before anything is submitted.

A worker that dies while running a task (a SLURM job cancelled, out of memory or out of time; a local process
killed) ends the run with :class:`~napari_cspt2d.errors.CsptRunError` naming the task and, on SLURM, the job's log.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import dask
from distributed import Client, LocalCluster
from distributed.scheduler import KilledWorker
from distributed.utils import format_dashboard_link

from .errors import CsptInputError, CsptRunError
from .model.params import PARAMS
from .model.settings import Settings

__all__ = ["make_client", "bundle", "dashboard_link", "slurm_job_extra", "JOB_NAME"]

T = TypeVar("T")

#: SLURM job name of every worker job (``-{data_set}`` is appended when the project has one).
JOB_NAME = "cspt2d"

_CONNECT_TIMEOUT_S = 10
_SBATCH_TIMEOUT_S = 60
_ADDRESS = PARAMS["cluster_address"].pattern or ""
#: The scheduler's HTTP server (and dashboard, when bokeh is installed) on a free port: never clash with 8787.
_DASHBOARD = ":0"
#: Words of an ``sbatch`` error and the parameter that most likely caused it.
_SBATCH_FIELDS = (
    ("account", "slurm_account"),  # before "partition": "invalid account or account/partition combination"
    ("partition", "slurm_queue"),
    ("time limit", "slurm_walltime"),
    ("memory", "slurm_memory"),
    ("node configuration", "slurm_tasks, slurm_memory"),
    ("cpu", "slurm_tasks"),
)


def bundle(items: Iterable[T], bundle_size: int) -> list[list[T]]:
    """``items`` cut in order into consecutive bundles of ``bundle_size`` (the last one may be shorter).

    One bundle is one dask task, i.e. the items one worker processes one after the other (pyp's
    ``slurm_bundle_size``). ``bundle(range(5), 2) == [[0, 1], [2, 3], [4]]``; no items give no bundles."""
    if isinstance(bundle_size, bool) or not isinstance(bundle_size, int) or bundle_size < 1:
        raise CsptInputError(f"is {bundle_size!r}", field="slurm_bundle_size", expected="an integer >= 1")
    items = list(items)
    return [items[i : i + bundle_size] for i in range(0, len(items), bundle_size)]


def dashboard_link(client: Client) -> str | None:
    """URL of the scheduler's dask dashboard (task stream, progress, worker memory), or None when it has none
    (the dashboard needs the ``bokeh`` package on the scheduler's machine)."""
    info = client.scheduler_info()
    port = info.get("services", {}).get("dashboard")
    if port is None:
        return None
    host = info["address"].split("://")[-1].rsplit(":", 1)[0]
    return format_dashboard_link(host, port)


def slurm_job_extra(settings: Settings | Mapping[str, Any]) -> list[str]:
    """The ``;``-separated ``slurm_job_extra`` as a list of sbatch options (each must start with ``-``; a leading
    ``#SBATCH`` is dropped)."""
    directives = []
    for item in Settings.parse(settings).cluster.slurm_job_extra.split(";"):
        item = re.sub(r"^#SBATCH\s+", "", item.strip())
        if not item:
            continue
        if not item.startswith("-") or "\n" in item:
            raise CsptInputError(f"has {item!r}", field="slurm_job_extra",
                                 expected="sbatch options separated by ';', like '--gres=gpu:1;--constraint=avx2'")
        directives.append(item)
    return directives


@contextmanager
def make_client(
    settings: Settings | Mapping[str, Any],
    *,
    workers: int | None = None,
    scheduler_address: str | None = None,
    tasks: int | None = None,
    project_dir: str | os.PathLike[str] | None = None,
    dashboard: bool = True,
) -> Iterator[Client]:
    """A dask ``Client`` for the settings' cluster backend; the cluster it started is closed on exit.

    Parameters
    ----------
    settings:
        The project's :class:`Settings` (or pyp keys, parsed by :meth:`Settings.parse`); its ``cluster`` group is
        used, and ``data.data_set`` names SLURM jobs.
    workers:
        Overrides ``cluster.workers``: local worker processes, or SLURM jobs (0 = automatic, see module doc).
    scheduler_address:
        Connect to this dask scheduler whatever ``cluster_backend`` says (same form as ``cluster_address``).
    tasks:
        Number of tasks (bundles) the caller will submit: sizes the SLURM job count when ``workers`` is 0 and caps
        the number of workers started (no idle workers or jobs).
    project_dir:
        Project folder; SLURM job logs go to ``project_dir/log``. Default: the folder of the parameters'
        ``.pyp_config.toml``, else the current folder.
    dashboard:
        Serve the scheduler's dashboard (:func:`dashboard_link`) when this starts the scheduler; False keeps only
        its HTTP health and metrics routes (on a free port too) and saves ~0.6 s of start-up (importing bokeh).

    Raises :class:`CsptInputError` naming the key for bad settings, and :class:`CsptRunError` (with the job's log
    path on SLURM) when a worker dies while running a task.
    """
    settings = Settings.parse(settings)
    workers = _check_count(settings.cluster.workers if workers is None else workers, "workers", 0)
    tasks = None if tasks is None else _check_count(tasks, "tasks", 1)
    if scheduler_address is not None:
        _check_address(scheduler_address, "scheduler_address")
    backend = "address" if scheduler_address is not None else settings.cluster.cluster_backend
    with _start(backend, settings, workers, tasks, scheduler_address, project_dir, dashboard) as (client, job_of):
        try:
            yield client
        except KilledWorker as exc:
            raise _killed_worker_error(exc, job_of) from exc


def _check_count(value: Any, field: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CsptInputError(f"is {value!r}", field=field, expected=f"an integer >= {minimum}")
    return value


def _check_address(address: str, field: str) -> str:
    if not isinstance(address, str) or not address or not re.fullmatch(_ADDRESS, address):
        raise CsptInputError(f"is {address!r}", field=field, expected="a dask scheduler address like tcp://host:8786")
    return address


def _worker_count(workers: int, default: int, tasks: int | None) -> int:
    """``workers`` (0 = ``default``), never more than ``tasks``."""
    n = workers or default
    return min(n, tasks) if tasks else n


def _no_job(worker: str) -> None:
    return None


#: Finds the SLURM job (id, log path) of a dask worker name, None when the worker is not a SLURM job.
JobLookup = Callable[[str], tuple[str, Path] | None]


@contextmanager
def _start(backend: str, settings: Settings, workers: int, tasks: int | None, scheduler_address: str | None,
           project_dir: str | os.PathLike[str] | None, dashboard: bool) -> Iterator[tuple[Client, JobLookup]]:
    if backend == "local":
        n = _worker_count(workers, len(os.sched_getaffinity(0)), tasks)
        with dask.config.set({"distributed.worker.multiprocessing-method": _local_start_method()}):
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=_DASHBOARD,
                                   scheduler_kwargs={"dashboard": dashboard}, silence_logs=logging.ERROR)
        with cluster, Client(cluster) as client:
            yield client, _no_job
    elif backend == "address":
        address = scheduler_address or _check_address(settings.cluster.cluster_address, "cluster_address")
        try:
            client = Client(address, timeout=_CONNECT_TIMEOUT_S)
        except OSError as exc:
            raise CsptInputError(f"no dask scheduler answered at {address!r} within {_CONNECT_TIMEOUT_S} s ({exc})",
                                 field="scheduler_address" if scheduler_address else "cluster_address",
                                 expected="the address of a running dask scheduler") from exc
        with client:
            yield client, _no_job
    elif backend == "slurm":
        with _slurm_client(settings, workers, tasks, _log_dir(settings, project_dir), dashboard) as started:
            yield started
    else:  # Settings only let the three choices through; kept as the last line of defence
        raise CsptInputError(f"is {backend!r}", field="cluster_backend", expected="'local', 'address' or 'slurm'")


#: What the server that local worker processes are forked from imports once (:func:`_local_start_method`).
WORKER_PRELOAD = ("distributed", "napari_cspt2d.recon.worker_preload")


def _local_start_method() -> str:
    """How local worker processes start: forked from a server process that has imported :data:`WORKER_PRELOAD`
    (``forkserver``), where the platform has it. The server starts with the first cluster of this process and lives
    as long as it does: later clusters (the next run in a napari session) start their workers in a fraction of the
    time, and no worker imports the pipeline again. Elsewhere ``spawn``, dask's default."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    from distributed.utils import get_mp_context

    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        context = get_mp_context()  # dask sets its own preload list once; ours replaces it (no effect once started)
    context.set_forkserver_preload(list(WORKER_PRELOAD))
    return "forkserver"


def _log_dir(settings: Settings, project_dir: str | os.PathLike[str] | None) -> Path:
    if project_dir is not None:
        root = Path(project_dir)
    elif settings.source is not None:
        root = Path(settings.source).parent
    else:
        root = Path.cwd()
    return (root / "log").resolve()


@contextmanager
def _slurm_client(settings: Settings, workers: int, tasks: int | None, log_dir: Path,
                  dashboard: bool) -> Iterator[tuple[Client, JobLookup]]:
    from dask_jobqueue import SLURMCluster

    if shutil.which("sbatch") is None:
        raise CsptInputError("is 'slurm' but sbatch is not on PATH", field="cluster_backend",
                             expected="a machine that can submit SLURM jobs, or 'local' / 'address'")
    n_jobs = _worker_count(workers, tasks or 1, tasks)
    cluster_settings, data_set = settings.cluster, settings.data.data_set
    cores = cluster_settings.slurm_tasks
    name = f"{JOB_NAME}-{data_set}" if data_set else JOB_NAME
    log_dir.mkdir(parents=True, exist_ok=True)
    # allowed-failures 0: a task whose job dies fails at once (KilledWorker -> CsptRunError with the job's log)
    # instead of being retried on the next job, which would hide why the job died.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = SLURMCluster(
            queue=cluster_settings.slurm_queue or None,
            account=cluster_settings.slurm_account or None,
            walltime=cluster_settings.slurm_walltime,
            cores=cores,
            processes=cores,
            memory=f"{cluster_settings.slurm_memory}GiB",
            job_extra_directives=slurm_job_extra(settings),
            log_directory=str(log_dir),
            job_name=name,
            python=sys.executable,
            scheduler_options={"dashboard_address": _DASHBOARD, "dashboard": dashboard},
            silence_logs=logging.ERROR,
        )
    with cluster:
        _sbatch_test(cluster.job_script())
        cluster.scale(jobs=n_jobs)

        def job_of(worker: str) -> tuple[str, Path] | None:
            # jobqueue names a job's worker "{job}", or "{job}-{i}" when the job runs several processes
            job = cluster.workers.get(worker) or cluster.workers.get(worker.rsplit("-", 1)[0])
            job_id = getattr(job, "job_id", None)
            return None if job_id is None else (str(job_id), log_dir / f"{name}-{job_id}.err")

        with Client(cluster) as client:
            yield client, job_of


def _sbatch_test(script: str) -> None:
    """Let SLURM check the job script (``sbatch --test-only``, nothing is submitted); CsptInputError naming the
    likely key when it refuses."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as fh:
        fh.write(script)
    try:
        result = subprocess.run(["sbatch", "--test-only", fh.name], capture_output=True, text=True,
                                timeout=_SBATCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise CsptRunError(f"sbatch did not answer within {_SBATCH_TIMEOUT_S} s: is the SLURM controller up?") from exc
    finally:
        os.unlink(fh.name)
    if result.returncode == 0:
        return
    message = (result.stderr or result.stdout).strip()
    low = message.lower()
    field = next((f for word, f in _SBATCH_FIELDS if word in low), "slurm_job_extra")
    raise CsptInputError(f"SLURM refused the job settings: {message}", field=field,
                         expected="a partition, account, walltime, cores and memory this SLURM accepts")


def _killed_worker_error(exc: KilledWorker, job_of: JobLookup) -> CsptRunError:
    worker = getattr(exc.last_worker, "name", None)
    worker = str(worker) if worker is not None else str(getattr(exc.last_worker, "address", "?"))
    job = job_of(worker)
    if job is None:
        return CsptRunError(f"dask worker {worker} died while running task {exc.task!r}")
    job_id, log = job
    return CsptRunError(f"SLURM job {job_id} (dask worker {worker}) ended while running task {exc.task!r}; "
                        "its log says why (cancelled, out of time or out of memory)", log_path=log)

