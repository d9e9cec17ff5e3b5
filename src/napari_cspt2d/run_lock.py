"""One run per project at a time: ``{project}/.cspt2d.lock``.

A run (CLI, Python or napari) holds an exclusive ``flock`` on the lock file while it works, and the file says who
holds it: pid, host, start time and what runs. The kernel releases the lock when the process ends, however it ends,
so a run killed with SIGKILL never blocks the project: the next run takes the lock over and warns that the previous
one (named) did not finish. A second run while the first is alive — in another process, or in another thread of
the same one (a second napari run) — is refused with :class:`ProjectBusyError` naming the running one. The thread
that holds the lock may take it again (a napari run that calls the pipeline), which nests.

The lock is advisory and works on local file systems and on NFS with lock support (Linux emulates ``flock`` with
POSIX locks there). A lock whose holder is on another host is reported with that host. On a file system without
locks the run goes on with a warning; a project folder that cannot be written is bad input.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import CsptInputError, warn_input

__all__ = ["LOCK_NAME", "LockHolder", "ProjectBusyError", "project_lock", "lock_holder", "one_run_per_project"]

F = TypeVar("F", bound=Callable[..., Any])

#: Name of the lock file in the project folder.
LOCK_NAME = ".cspt2d.lock"

#: Locks this process holds: lock path -> (holding thread, nesting depth, holder).
_HELD: dict[Path, tuple[int, int, LockHolder]] = {}
_HELD_GUARD = threading.Lock()


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or last held) a project's lock: ``started`` is a Unix time (s)."""

    pid: int
    host: str
    started: float
    what: str

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.started))
        return f"{self.what} (pid {self.pid} on {self.host}, started {when})"


class ProjectBusyError(CsptInputError):
    """Another run holds the project's lock; ``holder`` says which."""

    def __init__(self, path: Path, holder: LockHolder | None) -> None:
        self.holder = holder
        who = holder.describe() if holder else "another run (it has not written its name yet)"
        super().__init__(f"another run is working on this project: {who}", file=path, field="lock",
                         expected="one run per project at a time: wait for it to finish or stop it")


def _read_holder(fd: int) -> LockHolder | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace")
    try:
        data = json.loads(text)
        return LockHolder(int(data["pid"]), str(data["host"]), float(data["started"]), str(data["what"]))
    except (ValueError, KeyError, TypeError):
        return None


def lock_holder(project_dir: str | os.PathLike[str]) -> LockHolder | None:
    """The run that holds the project's lock now, None when no run does."""
    path = Path(project_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        except OSError:  # no locks on this file system: nobody can be seen holding one
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _open_locked(path: Path) -> int:
    """A descriptor of ``path`` holding its exclusive lock (:class:`ProjectBusyError` when another run has it)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError as exc:
            raise CsptInputError(f"cannot be written ({exc.strerror})", file=path.parent,
                                 expected="a project folder this user may write to") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ProjectBusyError(path, holder) from None
        except OSError as exc:  # a file system without locks (some network mounts): run, but say so
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            warn_input(f"the file system does not support locks ({exc.strerror}): this run cannot keep a second "
                       "one off the project", file=path, field="lock")
            return fd
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            return fd
        os.close(fd)  # the previous holder removed the file between our open and lock: lock the new one


def _command_line() -> str:
    """This process's command line, short (``cspt2d run demo-project``, ``python script.py``, ``napari``)."""
    words = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    text = " ".join(words)
    return text if len(text) <= 120 else text[:117] + "..."


@contextlib.contextmanager
def project_lock(project_dir: str | os.PathLike[str], what: str = "run") -> Iterator[LockHolder]:
    """Hold ``project_dir``'s lock for the duration of the block; yields this run's :class:`LockHolder` (``what`` =
    ``"{what}: {this process's command line}"``).

    Raises :class:`ProjectBusyError` (a :class:`CsptInputError`, exit code 2 in the CLI) when another live run
    holds it; warns when taking over from a run that ended without releasing it (killed)."""
    path = Path(project_dir).resolve() / LOCK_NAME
    if not path.parent.is_dir():
        raise CsptInputError("does not exist", file=path.parent, expected="a project folder")
    with _HELD_GUARD:
        held = _HELD.get(path)
        if held is not None and held[0] != threading.get_ident():
            raise ProjectBusyError(path, held[2])
        if held is not None:
            _HELD[path] = (held[0], held[1] + 1, held[2])
    if held is not None:  # this thread holds it already: nest
        try:
            yield held[2]
        finally:
            with _HELD_GUARD:
                thread, depth, holder = _HELD[path]
                _HELD[path] = (thread, depth - 1, holder)
        return
    fd = _open_locked(path)
    try:
        previous = _read_holder(fd)
        if previous is not None:
            warn_input(f"taking over the lock of {previous.describe()}, which ended without finishing (killed?); "
                       "its unfinished files are redone", file=path, field="lock")
        me = LockHolder(os.getpid(), socket.gethostname(), time.time(), f"{what}: {_command_line()}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(me)).encode("utf-8"), 0)
        os.fsync(fd)
        with _HELD_GUARD:
            _HELD[path] = (threading.get_ident(), 1, me)
        try:
            yield me
        finally:
            with _HELD_GUARD:
                del _HELD[path]
            os.unlink(path)  # while still locked: a run waiting on this file then locks a new one
    finally:
        os.close(fd)


def one_run_per_project(what: str) -> Callable[[F], F]:
    """Decorator: the function runs holding the lock (:func:`project_lock`) of the project folder given as its
    ``project_dir`` keyword argument (None or absent: the current folder, as the seed's scripts run)."""

    def wrap(function: F) -> F:
        @functools.wraps(function)
        def locked(*args: Any, **kwargs: Any) -> Any:
            with project_lock(kwargs.get("project_dir") or Path.cwd(), what):
                return function(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return wrap
