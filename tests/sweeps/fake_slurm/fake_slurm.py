"""A few-line SLURM for tests: ``sbatch`` runs a submitit array here, ``scontrol requeue`` reruns a task.

``sbatch SCRIPT`` answers a job id at once (as SLURM does) and hands the array to a detached runner, which starts
every array task at once: the script's ``srun ... python -m submitit.core._submit`` command with the
``SLURM_*`` variables of that task. With ``FAKE_SLURM_PREEMPT=<glob of run directories>`` the runner sends task 0
SIGUSR2 (what SLURM sends ``signal_delay_s`` before a preemption or time limit) as soon as a ``samples.jsonl``
in those directories has a line, and reruns the task if it asked ``scontrol requeue``. ``sacct`` reports RUNNING, then
COMPLETED. Everything is logged under ``FAKE_SLURM_STATE``. Only the standard library is used.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ.get("FAKE_SLURM_STATE", "/tmp/fake_slurm"))


def log(msg: str) -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / "events.log", "a") as f:
        f.write(msg + "\n")


def sbatch(args: list[str]) -> None:
    script = Path(args[-1])
    text = script.read_text()
    m = re.search(r"#SBATCH --array=0-(\d+)", text)
    n = int(m.group(1)) + 1 if m else 1
    STATE.mkdir(parents=True, exist_ok=True)
    counter = STATE / "counter"
    jid = int(counter.read_text()) + 1 if counter.exists() else 1000
    counter.write_text(str(jid))
    (STATE / f"{jid}.sh").write_text(text)
    log(f"sbatch {jid} array={n} " + " ".join(l for l in text.splitlines() if l.startswith("#SBATCH")))
    with open(STATE / "runner.log", "a") as out:
        runner = subprocess.Popen([sys.executable, __file__, "_run", str(jid), str(n), str(int(bool(m)))],
                                  stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
    (STATE / f"runner_{jid}.pid").write_text(str(runner.pid))  # its own session: the test can end it by id
    print(f"Submitted batch job {jid}")


def _srun_command(text: str) -> list[str]:
    line = next(l for l in text.splitlines() if l.startswith("srun "))
    argv = shlex.split(line)[1:]
    cmd, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
        elif a in ("--output", "--error"):
            skip = 1
        elif not a.startswith("--"):
            cmd.append(a)
    return cmd


def _samples_started(pattern: str) -> bool:
    return any(p.read_text().count("\n") >= 1 for d in Path("/").glob(pattern.lstrip("/"))
               for p in d.glob("samples.jsonl"))


def _task(cmd: list[str], jid: str, i: int | None) -> None:
    """One array task (or a plain job when ``i`` is None), rerun while it asks to be requeued."""
    task = jid if i is None else f"{jid}_{i}"
    folder = Path(cmd[-1].replace("%j", task))
    deadline = time.time() + 60
    while not (folder / f"{task}_submitted.pkl").exists() and time.time() < deadline:
        time.sleep(0.05)
    preempt = os.environ.get("FAKE_SLURM_PREEMPT")  # a glob of run directories: task 0 is signalled once
    attempt = 0
    while True:
        env = dict(os.environ, SLURM_JOB_ID=jid if i is None else str(int(jid) + 1 + i), SLURM_NTASKS="1",
                   SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0", SLURM_PROCID="0", SLURM_LOCALID="0",
                   SLURM_JOB_NODELIST="localhost", SUBMITIT_EXECUTOR="slurm")
        if i is not None:
            env.update(SLURM_ARRAY_JOB_ID=jid, SLURM_ARRAY_TASK_ID=str(i))
        with open(folder / f"{task}_0_log.out", "a") as out:
            p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
            log(f"start {task} attempt {attempt} pid {p.pid}")
            if preempt and (i or 0) == 0 and attempt == 0:
                while p.poll() is None and not _samples_started(preempt):
                    time.sleep(0.02)
                if p.poll() is None:
                    p.send_signal(signal.SIGUSR2)
                    log(f"signal {task} USR2")
            rc = p.wait()
        flag = STATE / f"requeue_{task}"
        log(f"exit {task} attempt {attempt} rc {rc} requeue={flag.exists()}")
        if not flag.exists():
            break
        flag.unlink()
        attempt += 1
    (STATE / f"done_{task}").write_text(str(rc))


def run(jid: str, n: int, array: bool) -> None:
    """All tasks of the job at once, as SLURM would start them on free nodes."""
    import threading

    cmd = _srun_command((STATE / f"{jid}.sh").read_text())
    threads = [threading.Thread(target=_task, args=(cmd, jid, i if array else None)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def scontrol(args: list[str]) -> None:
    if args[:1] == ["requeue"]:
        (STATE / f"requeue_{args[1]}").write_text("")
        log(f"scontrol requeue {args[1]}")


def sacct(args: list[str]) -> None:
    ids = args[args.index("-j") + 1].split(",") if "-j" in args else []
    print("JobID|State|NodeList")
    for jid in ids:
        base = jid.split("_")[0]
        for f in sorted(STATE.glob(f"{base}.sh")):
            n_match = re.search(r"#SBATCH --array=0-(\d+)", f.read_text())
            tasks = [f"{base}_{i}" for i in range(int(n_match.group(1)) + 1)] if n_match else [base]
            for t in tasks:
                print(f"{t}|{'COMPLETED' if (STATE / f'done_{t}').exists() else 'RUNNING'}|localhost")


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "_run":
        run(rest[0], int(rest[1]), rest[2] == "1")
    else:
        {"sbatch": sbatch, "scontrol": scontrol, "sacct": sacct, "srun": lambda a: None}[cmd](rest)
