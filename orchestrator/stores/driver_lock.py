"""One driver per sweep: the process running a sweep (``launch``, ``resume``) holds an
exclusive lock on ``<sweep>/driver.lock`` while it runs.

Two drivers on one sweep would both restore Tune's state, run the same trials and delete
each other's checkpoints, and write the same MLflow runs. The lock is the operating
system's (``flock``), so it goes with the process however that ends, SIGKILL included: a
sweep whose driver was killed resumes at once. Spawned helper processes (the sampler, the
MLflow writer) and Ray's do not inherit it. Shared storage on NFS locks across nodes; on a
file system without locks (some FUSE mounts) the sweep runs without the guard.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from orchestrator.entities.names import DRIVER_LOCK_FILE
from trainer.config import ConfigError

__all__ = ["driver_running", "driving"]

_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # the file system has no flock


@contextlib.contextmanager
def driving(directory: Path, advice: str | None = None) -> Iterator[None]:
    """Hold the driver lock of the sweep in `directory` (named after it) for the block;
    ConfigError (one line) when another process holds it, naming that process, then
    `advice` (by default: wait, or stop it and resume)."""
    name = directory.name
    advice = advice or f"wait for it to end, or stop it and `orchestrate resume {name}`"
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / DRIVER_LOCK_FILE).open("a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise ConfigError(f"sweep {name!r} is running ({holder}): {advice}") from None
        except OSError as err:
            if err.errno not in _NO_LOCKS:
                raise  # else storage without locks: run unguarded, as before the lock
        else:
            lock.seek(0)
            lock.truncate()
            lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            lock.flush()
        yield


def driver_running(directory: Path) -> bool:
    """Whether a process runs the sweep in `directory` now: a probe that takes a shared lock
    and drops it at once (a `resume` starting in that instant would be refused, and can be
    run again). False for a sweep recorded before the lock existed, or on storage without
    locks."""
    try:
        fd = os.open(directory / DRIVER_LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError as err:
        if err.errno not in _NO_LOCKS:
            raise
    finally:
        os.close(fd)  # and with it the probe's lock
    return False
