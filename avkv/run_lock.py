"""The one-writer lock of a run directory: an OS lock (``flock``) on ``<run dir>/run.lock`` naming its holder.

Part of the results contract (:mod:`avkv.results`, which re-exports every name here): :class:`RunLock` is held by
the process writing a run directory, :func:`lock_holder` tells ``avkv missing`` whether a run is in progress.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Mapping

from avkv.measure import epoch, wall

LOCK = "run.lock"


class RunLocked(RuntimeError):
    """The run directory is held by another process; ``holder`` is what it wrote into ``run.lock``."""

    def __init__(self, run_dir: Path, holder: dict):
        self.run_dir, self.holder = Path(run_dir), holder
        super().__init__(f"run directory {run_dir} is in use by {describe_holder(holder)}. One run directory has "
                         f"one writer: wait for that process to finish (or stop it) and run again to resume.")


def describe_holder(holder: Mapping | None) -> str:
    if not holder:
        return "another process (it has not written its name into run.lock yet)"
    s = f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
    jobs = [f"{k}={holder[k]}" for k in ("slurm_job", "submitit_job") if holder.get(k)]
    return s + (f" ({', '.join(jobs)})" if jobs else "")


def _holder_info() -> dict:
    env = os.environ
    slurm = env.get("SLURM_ARRAY_JOB_ID") and f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "started_unix": epoch(),
            "slurm_job": slurm or env.get("SLURM_JOB_ID"), "submitit_job": env.get("SUBMITIT_LOCAL_JOB_ID"),
            "argv": " ".join(sys.argv)[:300]}


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 65536, 0)
        return json.loads(data.decode()) if data.strip() else {}
    except (OSError, ValueError):
        return {}


class RunLock:
    """An OS lock (``flock``) on ``<run dir>/run.lock``, held for the life of the run.

    ``flock`` is released by the kernel when the process dies (kill -9 included), so a stale lock cannot block a
    resume. The holder writes its pid, host, start time and SLURM/submitit job into the file; :func:`lock_holder`
    reads it for ``avkv missing`` (running vs missing). On NFS, Linux emulates ``flock`` with POSIX locks, which
    the server arbitrates across nodes.
    """

    #: how long to retry when the lock is busy: only a probe (``lock_holder``) holds it that briefly
    RETRY_S = 1.0

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = wall() + self.RETRY_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if wall() > deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise RunLocked(self.dir, holder) from None
                time.sleep(0.05)
        info = json.dumps(_holder_info()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)             # no stale name left behind
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(run_dir: str | Path) -> dict | None:
    """The holder of a run directory's lock (its ``run.lock`` info), or None when no process holds it."""
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return _read_holder(fd) or {"pid": None}
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
