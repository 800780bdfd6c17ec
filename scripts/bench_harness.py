"""How much of a run's wall time is harness: the timed fields of its records against the process's wall time.

    python scripts/bench_harness.py                         # the default experiment (run.py defaults: the AV proxy)
    python scripts/bench_harness.py model=tiny_qwen2_5_vl dataset=mvbench_tiny    # any run.py overrides
    python scripts/bench_harness.py --json out.json         # also write the figures

The experiment runs in a child process (``python scripts/bench_harness.py --child ...``: ``run.py``'s entry point
with timers wrapped around the harness's phases) into a fresh run directory, so nothing is resumed. The parent
measures the child's wall time from spawn to exit, reads ``samples.jsonl`` and sums the **timed fields** (the
per-sample time the records account for: media decode, processor, position ids, prefill — which contains the
compression hooks — and decode). ``harness share = 1 − timed / wall``; it is also given **without the one-time start-up and teardown**
(:data:`ONE_TIME`: interpreter, imports, Hydra, model load, the run store's reads and summary, exit), i.e. against
the wall time of the sample loop, and next to the **floor** a bare process pays for the same model (import torch
and transformers' model class, ``from_pretrained``; measured in a second process after the run).

The untimed remainder is attributed with timestamps (the timers cost microseconds per call): interpreter start and
imports before the entry point, config checks and Hydra composition, dataset and model loading, per sample the
work between the records' clock marks (prompt building, scoring, appending the record), the summary, and the
interpreter's exit. What is left after the named phases is shown as ``other``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_SCRIPT = time.perf_counter()
ROOT = Path(__file__).resolve().parent.parent
#: record fields that time work of the sample (inclusive ones — compress_s inside prefill_s — are not summed)
TIMED_FIELDS = ("media_s", "processor_s", "position_ids_s", "prefill_s", "decode_s")
#: untimed phases paid once per run (start-up, teardown), whatever the number of samples
ONE_TIME = ("interpreter start (python, site)", "imports (entry point, torch, transformers, hydra)",
            "config checks + Hydra composition", "check_environment + setup_torch",
            "dataset (fixture check, load_task)", "model load (load_adapter, its imports)", "tracker + summarize",
            "identity + follow_launcher + make_engine",
            "after run() (summary print, Hydra teardown)", "interpreter exit (atexit, module teardown)")


# ------------------------------------------------------------------------------------------------ child side
class Timers:
    def __init__(self):
        self.total: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def add(self, name: str, dt: float) -> None:
        self.total[name] = self.total.get(name, 0.0) + dt
        self.count[name] = self.count.get(name, 0) + 1

    def wrap(self, owner, attr: str, name: str | None = None) -> None:
        """Replace ``owner.attr`` by a timed wrapper (a module function, a class or instance method)."""
        fn = getattr(owner, attr)
        key = name or attr

        @functools.wraps(fn)
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.add(key, time.perf_counter() - t)
        setattr(owner, attr, timed)


def child(overrides: list[str], phases_out: str) -> int:
    timers = Timers()
    t_import = time.perf_counter()
    from avkv import app                          # what run.py imports
    from avkv import experiment                   # imported by app.main before Hydra composes
    from avkv import results
    timers.add("imports (entry point, torch, transformers, hydra)", time.perf_counter() - t_import)

    marks: dict[str, float] = {}
    model_info: dict[str, str] = {}
    run = experiment.run

    def timed_run(cfg):
        marks["run_start"] = time.perf_counter()
        try:
            return run(cfg)
        finally:
            marks["run_end"] = time.perf_counter()
    experiment.run = timed_run
    for name in ("check_environment", "setup_torch", "identity", "ensure_fixture", "load_task", "make_engine",
                 "summarize", "run_sample", "follow_launcher"):
        timers.wrap(experiment, name)
    for name in ("prepare", "append", "write_summary", "records", "close"):
        timers.wrap(results.RunStore, name, f"RunStore.{name}")
    make_tracker = experiment.make_tracker

    def timed_make_tracker(*a, **k):
        tracker = make_tracker(*a, **k)
        timers.wrap(tracker, "log_sample", "tracker.log_sample")
        return tracker
    experiment.make_tracker = timed_make_tracker
    load_adapter = experiment.load_adapter

    def timed_load_adapter(cfg):
        t = time.perf_counter()
        adapter = load_adapter(cfg)
        timers.add("load_adapter (model + processor)", time.perf_counter() - t)
        for name in ("encode", "decode_media", "prompt_position_ids", "media_inputs"):
            if hasattr(adapter, name):
                timers.wrap(adapter, name, f"adapter.{name}")
        proc = getattr(adapter, "processor", None)
        if proc is not None:
            timers.wrap(type(proc), "__call__", "processor()")
            vp = getattr(proc, "video_processor", None)
            if vp is not None:
                timers.wrap(type(vp), "__call__", "video_processor()")
        from avkv.engine import Engine
        timers.wrap(Engine, "generate", "engine.generate")
        model_info.update(model_class=type(adapter.model).__name__, path=str(getattr(adapter, "path", "")),
                          dtype=str(getattr(adapter, "dtype", "float32")).replace("torch.", ""))
        return adapter
    experiment.load_adapter = timed_load_adapter
    load_task = experiment.load_task

    def timed_load_task(cfg):
        task, docs = load_task(cfg)
        for name in ("prompt", "score"):
            timers.wrap(task, name, f"task.{name}")
        return task, docs
    experiment.load_task = timed_load_task

    t_main = time.perf_counter()
    rc = app.main(overrides, prog="run.py")
    t_end = time.perf_counter()
    out = {"script_start": T_SCRIPT, "main_start": t_main, "end": t_end, "marks": marks,
           "timers": timers.total, "counts": timers.count, "model": model_info}
    Path(phases_out).write_text(json.dumps(out))
    from avkv.cli import exit_now
    exit_now(rc)                                  # as run.py ends


# ------------------------------------------------------------------------------------------------ parent side
def read_records(run_dir: Path) -> list[dict]:
    recs = {}
    for line in (run_dir / "samples.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            recs[r["sample_id"]] = r
    return list(recs.values())


def analyse(wall: float, t_spawn_to_script: float, ph: dict, records: list[dict]) -> dict:
    """The figures: timed fields, harness share, and the untimed remainder by phase."""
    ok = [r for r in records if r.get("error") is None]
    timed = {f: sum(float(r.get(f) or 0.0) for r in ok) for f in TIMED_FIELDS}
    timed = {f: v for f, v in timed.items() if any(f in r for r in ok)}
    timed_total = sum(timed.values())
    tm, marks = ph["timers"], ph["marks"]
    g = lambda k: tm.get(k, 0.0)                                  # noqa: E731
    in_script = ph["end"] - ph["script_start"]
    run_s = marks["run_end"] - marks["run_start"]
    sample_s = g("run_sample")
    # per sample, outside the records' clocks: encode beyond media/processor, generate beyond prefill+decode
    encode_untimed = g("adapter.encode") - sum(timed.get(f, 0.0) for f in
                                                 ("media_s", "processor_s"))
    generate_untimed = g("engine.generate") - sum(timed.get(f, 0.0) for f in
                                                    ("position_ids_s", "prefill_s", "decode_s"))
    sample_rest = sample_s - g("adapter.encode") - g("engine.generate") - g("task.prompt") - g("task.score")
    untimed = {
        "interpreter start (python, site)": t_spawn_to_script,
        "imports (entry point, torch, transformers, hydra)": g("imports (entry point, torch, transformers, hydra)"),
        "config checks + Hydra composition": marks["run_start"] - ph["main_start"],
        "check_environment + setup_torch": g("check_environment") + g("setup_torch"),
        "dataset (fixture check, load_task)": g("ensure_fixture") + g("load_task"),
        "model load (load_adapter, its imports)": g("load_adapter (model + processor)"),
        "run store (prepare, append, records, summary, close)": g("RunStore.prepare") + g("RunStore.append")
        + g("RunStore.records") + g("RunStore.write_summary") + g("RunStore.close"),
        "tracker + summarize": g("make_tracker") + g("summarize"),
        "per sample: tracker.log_sample": g("tracker.log_sample"),
        "identity + follow_launcher + make_engine": g("identity") + g("follow_launcher") + g("make_engine"),
        "per sample: encode outside media/processor fields": encode_untimed,
        "per sample: generate outside position/prefill/decode fields": generate_untimed,
        "per sample: task.prompt + task.score": g("task.prompt") + g("task.score"),
        "per sample: rest of run_sample": sample_rest,
        "after run() (summary print, Hydra teardown)": ph["end"] - marks["run_end"],
        "interpreter exit (atexit, module teardown)": wall - t_spawn_to_script - in_script,
    }
    named = sum(untimed.values()) - untimed["per sample: rest of run_sample"]
    inside_run = (run_s - sample_s - g("check_environment") - g("setup_torch") - g("ensure_fixture")
                  - g("load_task") - g("load_adapter (model + processor)") - g("RunStore.prepare")
                  - g("RunStore.write_summary") - g("make_tracker") - g("summarize") - g("RunStore.records")
                  - g("RunStore.append") - g("RunStore.close") - g("tracker.log_sample") - g("identity")
                  - g("follow_launcher") - g("make_engine"))
    untimed["inside run(): other (method, progress bar, done ids, ...)"] = inside_run
    # once per run, whatever the number of samples: start-up before the first sample and teardown after the last
    one_time = {k: untimed[k] for k in ONE_TIME} | {
        "run store: prepare, records, summary, close (not the appends)": g("RunStore.prepare")
        + g("RunStore.records") + g("RunStore.write_summary") + g("RunStore.close")}
    one_time_s = sum(one_time.values())
    steady = wall - one_time_s
    return {"wall_s": wall, "timed_s": timed_total, "timed_fields": timed, "harness_share": 1 - timed_total / wall,
            "one_time_s": one_time_s, "one_time": one_time, "samples_wall_s": steady,
            "harness_share_without_one_time": 1 - timed_total / steady,
            "n_samples": len(records), "n_failed": len(records) - len(ok), "untimed": untimed,
            "processor_calls_s": {k: g(k) for k in ("processor()", "video_processor()", "adapter.decode_media",
                                                     "adapter.prompt_position_ids")},
            "accounted_untimed_s": named + inside_run + sample_rest}


def report(a: dict) -> str:
    w = a["wall_s"]
    lines = [f"wall {w:.2f} s, {a['n_samples']} samples ({a['n_failed']} failed)",
             f"timed fields {a['timed_s']:.2f} s = {a['timed_s'] / w:.1%} of wall -> harness share "
             f"{a['harness_share']:.1%}", "", "timed fields (sum over samples):"]
    lines += [f"  {k:<58s} {v:8.2f} s  {v / w:6.1%}" for k, v in a["timed_fields"].items()]
    lines += [f"one-time start-up + teardown {a['one_time_s']:.2f} s; without it: {a['samples_wall_s']:.2f} s, "
              f"harness share {a['harness_share_without_one_time']:.1%}"]
    if a.get("floor"):
        f = a["floor"]
        lines.append(f"floor (a bare process: import torch + transformers' {f['model_class']}, from_pretrained): "
                     f"{f['wall_s']:.2f} s (imports {f['import_s']:.2f} s, load {f['load_s']:.2f} s)")
    lines += ["", "untimed remainder:"]
    lines += [f"  {k:<58s} {v:8.2f} s  {v / w:6.1%}" for k, v in
              sorted(a["untimed"].items(), key=lambda kv: -kv[1])]
    rest = w - a["timed_s"] - a["accounted_untimed_s"]
    lines.append(f"  {'unattributed (wall - timed - the above)':<58s} {rest:8.2f} s  {rest / w:6.1%}")
    lines += ["", "inclusive call times: " + ", ".join(f"{k} {v:.2f} s" for k, v in a["processor_calls_s"].items())]
    return "\n".join(lines)


FLOOR = """
import sys, time
t0 = time.perf_counter()
import torch, transformers
cls = getattr(transformers, sys.argv[1])
t1 = time.perf_counter()
cls.from_pretrained(sys.argv[2], dtype=getattr(torch, sys.argv[3]))
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def measure_floor(model: dict) -> dict:
    """What any script that runs this model pays before its first sample: a fresh interpreter importing torch and
    transformers' model class and reading the checkpoint with ``from_pretrained`` (no avkv, no Hydra, no
    processor)."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", FLOOR, model["model_class"], model["path"], model["dtype"]],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    wall = time.perf_counter() - t0
    return dict(model, wall_s=wall, import_s=float(out[-2]), load_s=float(out[-1]))


def parent(overrides: list[str], json_out: str | None, keep: bool, floor: bool = True) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="avkv-bench-harness-"))
    run_dir = tmp / "run"
    phases = tmp / "phases.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--phases", str(phases), "--",
           *overrides, f"run_dir={run_dir}", f"hydra.run.dir={tmp / 'hydra'}"]
    t0 = time.perf_counter()
    t0_wall = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-4000:], file=sys.stderr)
        print(f"bench_harness: the run failed (rc {proc.returncode})", file=sys.stderr)
        return proc.returncode
    ph = json.loads(phases.read_text())
    # perf_counter is CLOCK_MONOTONIC on Linux: the child's script start relative to the spawn
    spawn_to_script = ph["script_start"] - t0 if ph["script_start"] > t0 else 0.0
    a = analyse(wall, spawn_to_script, ph, read_records(run_dir))
    if floor and ph.get("model", {}).get("model_class"):
        a["floor"] = measure_floor(ph["model"])
    a.update(overrides=overrides, date=time.strftime("%Y-%m-%d %H:%M", time.gmtime(t0_wall)),
             load_avg=os.getloadavg())
    print(report(a))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(a, indent=1))
    if not keep:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run directory")
    ap.add_argument("--no-floor", action="store_true", help="skip the bare import + from_pretrained measurement")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--phases", default=None, help=argparse.SUPPRESS)
    args, overrides = ap.parse_known_args(argv)
    overrides = [o for o in overrides if o != "--"]
    if args.child:
        return child(overrides, args.phases)
    return parent(overrides, args.json, args.keep, floor=not args.no_floor)


if __name__ == "__main__":
    sys.exit(main())
