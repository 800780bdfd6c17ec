"""A ``hydra/launcher=local`` sweep's children follow their launcher: when the process that launched the sweep is
gone (killed, Ctrl-C'd), its children stop too instead of running on and writing (``run.py`` marks the launcher,
:func:`avkv.experiment.run` follows it)."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger("avkv")
LAUNCHER_ENV = "AVKV_LAUNCHER"


def process_start_time(pid: int) -> str | None:
    """A live process's start time (clock ticks since boot, from /proc), None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return None if fields[0] in ("Z", "X") else fields[19]
    except (OSError, ValueError, IndexError):
        return None


def mark_launcher() -> None:
    """Called by ``run.py`` in the process that launches a sweep: its host, pid and start time go to the sweep's
    children through the environment (``follow_launcher``)."""
    os.environ.setdefault(LAUNCHER_ENV, f"{socket.gethostname()}:{os.getpid()}:{process_start_time(os.getpid())}")


def follow_launcher(poll_s: float = 0.5) -> threading.Thread | None:
    """In a child of a ``hydra/launcher=local`` sweep (submitit on this machine), exit when the launcher is gone
    (killed, Ctrl-C'd): its children otherwise keep running and writing. SLURM tasks are not tied to their watcher
    (they run and requeue on their own)."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "local" or not os.environ.get(LAUNCHER_ENV):
        return None
    host, _, rest = os.environ[LAUNCHER_ENV].partition(":")
    pid_s, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_s.isdigit() or int(pid_s) == os.getpid():
        return None
    pid = int(pid_s)

    def watch() -> None:
        while True:
            if process_start_time(pid) != start:
                log.error("the sweep's launcher (pid %d) is gone: this job stops too (run again to resume)", pid)
                logging.shutdown()
                os._exit(143)
            time.sleep(poll_s)

    t = threading.Thread(target=watch, name="avkv-follow-launcher", daemon=True)
    t.start()
    return t
