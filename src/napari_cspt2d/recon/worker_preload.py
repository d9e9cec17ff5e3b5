"""What local dask workers load before they are forked: importing this module runs :func:`skip_user_main` and
:func:`warm_up`.

The fork server that local worker processes start from (:func:`napari_cspt2d.cluster.WORKER_PRELOAD`) imports it
once. Every worker forked from it then starts with the pipeline imported and its numba kernels loaded, instead of
each worker paying that (about 1 s on 2 cores) in its first job, and never runs the user's main module (the script,
``python -c`` text or notebook that called ``csp_split``). Nothing else imports it. A warm-up that fails only
warns: the server must still start, and the workers then load the kernels in their first job.
"""

from __future__ import annotations

import warnings
from multiprocessing import spawn

from ..errors import CsptInputWarning
from .jobs import use_one_thread
from .warmup import warm_kernels

__all__ = ["skip_user_main", "warm_up"]

#: What multiprocessing sends a new process so that it can import the parent's main module before the task.
_MAIN_KEYS = ("init_main_from_name", "init_main_from_path")


def skip_user_main() -> None:
    """Make the processes this fork server forks skip multiprocessing's import of the parent's ``__main__``.

    multiprocessing normally runs the parent's main script again (as ``__mp_main__``) in every worker, so that
    functions defined there can be unpickled. Worker tasks here are all functions of this package, and a script
    that calls ``csp_split`` at its top level, with no ``if __name__ == "__main__":`` guard, would start a
    second cluster inside every worker ("An attempt has been made to start a new process before the current process
    has finished its bootstrapping phase"). Only the fork server runs this, so the user's own process and any
    other multiprocessing use in it are unchanged; every other part of the preparation (``sys.path``, working
    folder, authentication key) still applies."""
    prepare = spawn.prepare

    def prepare_without_main(data: dict) -> None:
        prepare({key: value for key, value in data.items() if key not in _MAIN_KEYS})

    spawn.prepare = prepare_without_main


def warm_up() -> None:
    """Load the kernels a job calls (:func:`.warmup.warm_kernels`) single threaded: a process that forks must not
    hold threads."""
    use_one_thread()
    warm_kernels()

skip_user_main()
# The process that starts the workers checked the same parameters and files, and said what it had to say about them.
warnings.filterwarnings("ignore", category=CsptInputWarning)
try:
    warm_up()
except Exception as exc:  # noqa: BLE001 - an optimisation: never keep the workers from starting
    warnings.warn(f"the workers' warm-up failed ({type(exc).__name__}: {exc}); they load the kernels in their first "
                  "job instead", RuntimeWarning, stacklevel=1)
