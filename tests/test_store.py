"""The results store: one writer per run directory, nothing lost by a kill during the repair, torn metadata and
bad lines skipped, retry of failed samples, and run identity (grid changes, the full cache, checkout location)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from avkv import grid, report, results
from avkv.config import ROOT, compose
from avkv.experiment import identity, resolved, run_dir_of
from avkv.results import RunLock, RunLocked, RunStore, lock_holder, read_records
from tests.conftest import fixtures_dir, tiny_model_dir

PY = sys.executable


def _child(code: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([PY, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=str(ROOT), **kw)


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    p = _child(f"""
        import sys, time
        from avkv.results import RunLock
        RunLock({str(run_dir)!r}).acquire()
        print("held", flush=True)
        time.sleep(60)
    """)
    assert p.stdout.readline().strip() == "held"
    return p


# ------------------------------------------------------------------------------------------------ one writer
def test_second_writer_is_refused_naming_the_holder(tmp_path):
    d = tmp_path / "run"
    holder = _hold_lock(d)
    try:
        t0 = time.monotonic()
        with pytest.raises(RunLocked) as e:
            RunStore(d).open()
        assert time.monotonic() - t0 < 3                       # at once, not after a wait for the holder
        msg = str(e.value)
        assert f"pid {holder.pid}" in msg and "on host" in msg and "started 20" in msg
        info = lock_holder(d)                                   # what `avkv missing` reads: running, not missing
        assert info["pid"] == holder.pid and info["host"]
        assert grid.run_state(d)[0] == "running"
    finally:
        holder.kill()
        holder.wait()
    assert lock_holder(d) is None                               # kill -9 frees it: no stale lock blocks a resume
    with RunStore(d) as store:
        assert lock_holder(d)["pid"] == os.getpid()
        store.append({"sample_id": "a", "error": None})
    assert lock_holder(d) is None


def test_run_refuses_a_locked_run_dir_before_loading_anything(tmp_path, monkeypatch):
    import avkv.experiment as ex
    fixtures_dir()
    cfg = compose([f"paths.runs={tmp_path}", "progress=false", "dataset.limit=2"])
    holder = _hold_lock(run_dir_of(cfg))
    monkeypatch.setattr(ex, "load_adapter", lambda cfg: pytest.fail("the model loaded"))
    try:
        with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
            ex.run(cfg)
    finally:
        holder.kill()
        holder.wait()
    assert not (run_dir_of(cfg) / "samples.jsonl").exists()


def test_local_sweep_children_stop_with_their_launcher(tmp_path):
    launcher = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
    try:
        from avkv.experiment import process_start_time
        host = __import__("socket").gethostname()
        env = dict(os.environ, PYTHONPATH=str(ROOT), SUBMITIT_EXECUTOR="local",
                   AVKV_LAUNCHER=f"{host}:{launcher.pid}:{process_start_time(launcher.pid)}")
        child = subprocess.Popen([PY, "-c", "import time; from avkv.experiment import follow_launcher; "
                                  "follow_launcher(0.05); print('following', flush=True); time.sleep(60)"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "following"
        time.sleep(0.3)
        assert child.poll() is None                           # the launcher lives: the child goes on
        launcher.kill()                        # not reaped yet: a zombie counts as gone
        assert child.wait(timeout=10) == 143
        launcher.wait()
        assert "launcher" in child.stderr.read()
    finally:
        launcher.kill()


# ------------------------------------------------------------------------------------------------ repair
KILLER = """
import os, signal, sys, builtins, io
from avkv.results import RunStore
target, kill_at = sys.argv[1], int(sys.argv[2])
ops = {"n": 0}

def op():
    ops["n"] += 1
    if ops["n"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

real_open, real_truncate = builtins.open, os.truncate

class Killing:
    def __init__(self, f): self.f = f
    def write(self, b): op(); return self.f.write(b)
    def __getattr__(self, k): return getattr(self.f, k)
    def __enter__(self): return self
    def __exit__(self, *a): return self.f.__exit__(*a)

def opening(file, mode="r", *a, **k):
    f = real_open(file, mode, *a, **k)
    if os.path.basename(str(file)) == "samples.jsonl" and any(c in mode for c in "wa+"):
        op()                                   # the open itself (with "w" it has already truncated)
        return Killing(f)
    return f

def truncating(path, length):
    real_truncate(path, length)
    op()

builtins.open = io.open = opening
os.truncate = truncating
RunStore(target).repair()
print("survived", ops["n"])
"""


@pytest.mark.parametrize("tail", [b'{"sample_id": "torn', b'{"sample_id": "whole", "error": null}'])
def test_a_kill_at_any_point_of_the_repair_loses_nothing(tmp_path, tail):
    """Kill the repair after each of its writes to samples.jsonl in turn (the old read-all/write-all repair lost
    the whole file here): every complete record is still there afterwards."""
    d = tmp_path / "run"
    d.mkdir()
    body = b"".join(json.dumps({"sample_id": str(i), "error": None}).encode() + b"\n" for i in range(20000))
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    k, survived = 1, False
    while not survived:
        (d / "samples.jsonl").write_bytes(body + tail)
        p = subprocess.run([PY, str(script), str(d), str(k)], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
        survived = p.returncode == 0
        assert survived or p.returncode == -signal.SIGKILL, p.stderr
        data = (d / "samples.jsonl").read_bytes()
        assert data.startswith(body), f"records lost by a kill at write #{k}"
        assert len(read_records(d / "samples.jsonl", warn=False)) == 20000 + (b"whole" in tail)
        k += 1
        assert k < 10
    ids = [r["sample_id"] for r in read_records(d / "samples.jsonl")]
    assert len(ids) == len(set(ids)) == 20000 + (b"whole" in tail)
    assert (d / "samples.jsonl").read_bytes().endswith(b"\n")


def test_repair_never_rewrites_the_file(tmp_path, monkeypatch):
    d = tmp_path / "run"
    d.mkdir()
    (d / "samples.jsonl").write_bytes(b'{"sample_id": "1"}\n{"sample_id": "2"}\n{"sampl')
    inode = (d / "samples.jsonl").stat().st_ino
    assert RunStore(d).repair() == len(b'{"sampl')
    assert (d / "samples.jsonl").read_bytes() == b'{"sample_id": "1"}\n{"sample_id": "2"}\n'
    assert (d / "samples.jsonl").stat().st_ino == inode
    assert RunStore(d).repair() == 0


# ------------------------------------------------------------------------------------------------ appends and fsync
def test_a_killed_writer_loses_no_appended_record_and_the_resume_runs_only_the_rest(tmp_path):
    """fsync is batched (``FSYNC_EVERY_S``), but each append reaches the kernel before the next sample: a writer
    killed with SIGKILL long before its next fsync loses none of its records, and a second writer resumes with
    exactly the missing ones."""
    d = tmp_path / "run"
    p = _child(f"""
        import os, signal
        from avkv.results import RunStore
        s = RunStore({str(d)!r}, fsync_every_s=3600).open()
        s.prepare("x: 1\\n", {{}})
        for i in range(5):
            s.append({{"sample_id": str(i), "error": None}})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    with RunStore(d) as store:
        store.prepare("x: 1\n", {})
        done = store.done_ids()
        assert done == {str(i) for i in range(5)}
        for i in range(8):
            if str(i) not in done:
                store.append({"sample_id": str(i), "error": None})
    ids = [r["sample_id"] for r in read_records(d / "samples.jsonl")]
    assert ids == [str(i) for i in range(8)]


def test_fsync_runs_at_the_interval_before_the_summary_and_at_close(tmp_path, monkeypatch):
    synced, clock = [], {"t": 1000.0}
    real_fsync = os.fsync
    monkeypatch.setattr(results.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    monkeypatch.setattr(results.measure, "wall", lambda: clock["t"])
    d = tmp_path / "run"
    d.mkdir()
    store = RunStore(d, fsync_every_s=10).open()              # (the lock file is fsynced as it is written)
    n = len(synced)
    store.append({"sample_id": "0"})
    store.append({"sample_id": "1"})
    assert len(synced) == n                                   # within the interval: written, not fsynced
    clock["t"] += 10
    store.append({"sample_id": "2"})
    assert len(synced) == n + 1                               # the interval passed: this append fsyncs
    store.append({"sample_id": "3"})
    n = len(synced)
    store.write_summary({"n": 4})
    assert len(synced) > n + 1                                # samples.jsonl first, then the summary's own
    store.append({"sample_id": "4"})
    n = len(synced)
    store.close()
    assert len(synced) == n + 1                               # what was left unsynced, at close
    every = RunStore(tmp_path / "every", fsync_every_s=0)
    (tmp_path / "every").mkdir()
    n = len(synced)
    for i in range(3):
        every.append({"sample_id": str(i)})
    assert len(synced) == n + 3


# ------------------------------------------------------------------------------------------------ bad files
@pytest.mark.parametrize("content", [b"", b'{"git_commit": "abc', b"[1, 2]", b"\xff\xfe"])
def test_torn_or_empty_meta_is_reported_kept_aside_and_replaced(tmp_path, caplog, content):
    d = tmp_path / "run"
    d.mkdir()
    (d / "meta.json").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="avkv"):
        RunStore(d).prepare("a: 1\n", {"git_commit": "new", "host": "h"})
    assert str(d / "meta.json") in caplog.text
    meta = json.loads((d / "meta.json").read_text())
    assert meta["git_commit"] == "new" and meta["previous_meta_unreadable"]["file"] == "meta.json.unreadable-1"
    assert (d / "meta.json.unreadable-1").read_bytes() == content          # nothing thrown away
    RunStore(d).prepare("a: 1\n", {"git_commit": "again", "host": "h"})    # a later resume reads it fine
    assert json.loads((d / "meta.json").read_text())["resumed"] == [{"git_commit": "again", "host": "h"}]
    assert not list(d.glob(".*tmp*"))                                       # the atomic writes left no temp file


def test_lines_without_an_id_or_not_json_are_skipped_and_named(tmp_path, caplog):
    p = tmp_path / "samples.jsonl"
    p.write_text('{"sample_id": "a", "error": null}\n{"no_id": 1}\ngarbage\n[1, 2]\n\n'
                 '{"sample_id": "b", "error": "x"}\n{"sample_id": "a", "error": null, "v": 2}\n{"sample_id": "c"')
    rep = results.ReadReport(p)
    with caplog.at_level(logging.WARNING, logger="avkv"):
        recs = read_records(p, report=rep)
    assert [r["sample_id"] for r in recs] == ["b", "a"] and recs[1]["v"] == 2       # last record per id wins
    assert rep.no_id == [2] and rep.not_json == [3, 4] and rep.torn_tail and rep.superseded == 1
    assert str(p) in caplog.text and "without 'sample_id' (line 2)" in caplog.text
    assert RunStore(tmp_path).done_ids() == {"a", "b"}
    assert RunStore(tmp_path).done_ids(retry_failed=True) == {"a"}
    assert [r["sample_id"] for r in report.read_samples(p)] == ["b", "a"]            # the report reads the same


# ------------------------------------------------------------------------------------------------ retry
def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]


def test_retry_failed_recomputes_failed_samples_once(tmp_path):
    tiny_model_dir("tiny_qwen2_audio")
    root = tmp_path / "avqa"
    shutil.copytree(fixtures_dir() / "avqa", root)
    items, names = [], set()
    for it in json.loads((root / "val_qa.json").read_text()):     # three items on three different videos
        if it["video_name"] not in names:
            items.append(it)
            names.add(it["video_name"])
    items = items[:3]
    (root / "val_qa.json").write_text(json.dumps(items))
    video = root / "videos" / f"{items[1]['video_name']}.mp4"
    good = video.read_bytes()
    video.write_bytes(b"transient NFS error")
    base = [f"paths.runs={tmp_path / 'runs'}", "progress=false", "max_new_tokens=2", "model=tiny_qwen2_audio",
            "method=streamingllm", f"dataset.root={root}"]
    from avkv.experiment import run
    s1 = run(compose(base))
    assert s1["n"] == 3 and s1["n_failed"] == 1
    video.write_bytes(good)                                   # the file is back
    s2 = run(compose(base))                                   # off by default: kept as failed, nothing rerun
    assert s2["n_failed"] == 1 and len(_records(Path(s2["run_dir"]))) == 3
    s3 = run(compose([*base, "resume.retry_failed=true"]))
    d = Path(s3["run_dir"])
    assert s3["n"] == 3 and s3["n_failed"] == 0               # each id counted once
    lines = _records(d)
    assert len(lines) == 4 and [r["sample_id"] for r in lines].count(str(items[1]["id"])) == 2
    assert lines[1]["error"] and lines[-1]["error"] is None   # the new line supersedes the old one
    assert json.loads((d / "summary.json").read_text())["n"] == 3
    s4 = run(compose([*base, "resume.retry_failed=true"]))   # nothing failed: nothing to rerun
    assert len(_records(d)) == 4 and s4["n"] == 3


def test_missing_retry_failed_lists_complete_jobs_with_failures(tmp_path):
    runs = tmp_path / "runs"
    a, b = runs / "a", runs / "b"
    for d, err in ((a, None), (b, "boom")):
        d.mkdir(parents=True)
        (d / "samples.jsonl").write_text(json.dumps({"sample_id": "1", "error": err}) + "\n")
        (d / "summary.json").write_text("{}")
    jobs = [grid.Job(["method=x"]), grid.Job(["method=y"])]
    for j, d in zip(jobs, (a, b)):
        j.run_dir = d
        j.status, j.samples, j.failed, j.holder = grid.run_state(d)
    assert [(j.status, j.failed) for j in jobs] == [("complete", 0), ("complete", 1)]
    assert grid.resubmit_commands(jobs) == []
    assert grid.resubmit_commands(jobs, retry_failed=True) == ["python run.py -m method=y resume.retry_failed=true"]


# ------------------------------------------------------------------------------------------------ identity
def _dir(*overrides: str) -> Path:
    return run_dir_of(compose(["paths.runs=/runs", *overrides]))


def test_identity_ignores_how_the_grid_was_assembled():
    plain = _dir("method=snapkv", "budget=0.2")
    assert _dir("method=snapkv", "budget=0.2", "experiment_name=other", "progress=false",
                "logger=wandb", "resume.retry_failed=true") == plain
    # a preset's point keeps its directory when the preset's grid grows or shrinks (one budget added)
    args = ["experiment=budget_curves", "smoke=tiny", "method=full,snapkv", "paths.runs=/runs"]
    def dirs(budgets: str) -> dict:
        return {(j.config.method._target_, j.config.budget): run_dir_of(j.config)
                for j in grid.expand([*args, f"grid.budgets={budgets}"])}

    small, big = dirs("[0.2]"), dirs("[0.2,0.5]")
    assert len(big) == 4 and len(small) == 2
    assert {k: big[k] for k in small} == small
    assert len(set(big.values())) == 3                        # the full cache: one directory for both budgets
    # but what changes a result changes it
    assert _dir("method=snapkv", "budget=0.5") != plain
    assert _dir("method=snapkv", "budget=0.2", "method.window=16") != plain
    assert _dir("method=snapkv", "budget=0.2", "dataset.limit=3") != plain
    assert _dir("method=snapkv", "budget=0.2", "compress_at=context") != plain
    assert _dir("method=snapkv", "budget=0.2", "seed=1") != plain


def test_the_full_cache_has_one_identity_whatever_the_budget():
    full = {_dir("method=full", f"budget={b}") for b in (0.1, 0.2, 0.5, 1.0)} | {_dir("method=full", "budget_tokens=64")}
    assert len(full) == 1 and "__bfull__" in next(iter(full)).name
    assert len({_dir("method=snapkv", f"budget={b}") for b in (0.1, 0.2)}) == 2


def test_shards_share_the_point_and_report_uses_the_same_identity():
    r0 = resolved(compose(["method=snapkv", "shard=0", "num_shards=2"]))
    r1 = resolved(compose(["method=snapkv", "shard=1", "num_shards=2"]))
    r0["method_name"] = r1["method_name"] = "snapkv"
    assert results.run_hash(r0) != results.run_hash(r1)
    assert results.point_hash(r0) == results.point_hash(r1)
    assert report.identities(r0)["point_id"] == results.point_hash(r0)[:12] == report.identities(r1)["point_id"]
    # the report of a full-cache run dir finds one point whatever budget its config.yaml was written with
    f2 = results.stored_config(resolved(compose(["method=full", "budget=0.2"])))
    f5 = results.stored_config(resolved(compose(["method=full", "budget=0.5"])))
    assert f2 == f5 and f2["budget"] is None
    assert report.identities(f2)["point_id"] == report.identities(f5)["point_id"]


def test_identity_is_independent_of_the_checkout_location(tmp_path):
    """Project paths (the checkout's .cache, the committed proxies) enter relative to the project root; external
    data paths as given. Checked on a real second checkout (a copy of the code elsewhere)."""
    here = _dir("model=tiny_qwen2_5_vl", "dataset=avqa", "method=snapkv")
    core = results.identity_core(resolved(compose(["model=tiny_qwen2_5_vl", "dataset=avqa"])))
    assert core["model"]["path"] == "<project>/.cache/models/tiny_qwen2_5_vl"
    assert core["dataset"]["root"] == "<project>/.cache/fixtures/avqa"
    ext = results.identity_core(resolved(compose(["dataset.root=/data/AVQA", "model.path=/ckpt/Qwen"])))
    assert ext["dataset"]["root"] == "/data/AVQA" and ext["model"]["path"] == "/ckpt/Qwen"
    assert _dir("dataset.root=/data/AVQA") != _dir("dataset.root=/data/AVQA2")

    other = tmp_path / "elsewhere" / "avkv-checkout"
    other.mkdir(parents=True)
    shutil.copytree(ROOT / "avkv", other / "avkv", ignore=shutil.ignore_patterns("__pycache__", "proxy_checkpoints"))
    shutil.copytree(ROOT / "configs", other / "configs")
    shutil.copy(ROOT / "run.py", other / "run.py")
    code = ("from avkv.config import compose; from avkv.experiment import run_dir_of; import avkv; "
            "print(avkv.__file__); "
            "print(run_dir_of(compose(['paths.runs=/runs', 'model=tiny_qwen2_5_vl', 'dataset=avqa', "
            "'method=snapkv'])))")
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=str(other),
                       env=dict(os.environ, PYTHONPATH=str(other)), timeout=120)
    assert p.returncode == 0, p.stderr
    where, their_dir = p.stdout.split()[-2:]
    assert where.startswith(str(other))                       # the copy's code ran, with its own root
    assert Path(their_dir) == here
    # and `avkv missing` in the other checkout sees a point finished here as complete
    (here_real := tmp_path / "runs" / here.name).mkdir(parents=True)
    (here_real / "summary.json").write_text("{}")
    code = ("import json; from avkv import grid; "
            f"jobs = grid.check(grid.expand(['paths.runs={tmp_path / 'runs'}', 'model=tiny_qwen2_5_vl', "
            "'dataset=avqa', 'method=snapkv,h2o'])); print(json.dumps([j.status for j in jobs]))")
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=str(other),
                       env=dict(os.environ, PYTHONPATH=str(other)), timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.splitlines()[-1]) == ["complete", "missing"]


def test_identity_of_a_run_is_what_the_store_records(tmp_path):
    cfg = compose([f"paths.runs={tmp_path}", "method=full", "budget=0.3"])
    res, h, d = identity(cfg)
    assert h == results.run_hash(res) and d == results.run_dir(res) and d.parent == tmp_path


def test_prompts_that_were_code_keep_the_run_identity():
    """The datasets whose prompt text moved from code into their config (issue 17) hash as before; an edited
    prompt changes the hash."""
    from avkv.config import compose
    from avkv.experiment import resolved
    from avkv.results import run_hash
    for name in ("avqa", "proxy_av", "proxy_audio", "proxy_video", "avsd", "music_avqa", "mvbench", "mvbench_acckv",
                 "milebench", "milebench_flowmm", "librispeech", "librispeech_long", "librispeech_long_fixture"):
        res = resolved(compose([f"dataset={name}"]))
        without = {**res, "dataset": {k: v for k, v in res["dataset"].items() if k != "prompts"}}
        assert run_hash(res) == run_hash(without), name
    res = resolved(compose(["dataset=avqa", "dataset.prompts.default=say"]))
    without = {**res, "dataset": {k: v for k, v in res["dataset"].items() if k != "prompts"}}
    assert run_hash(res) != run_hash(without)


def test_only_the_prompt_the_family_uses_enters_the_identity():
    """A family's prompt entries added to a dataset config move no other family's runs (committed code-era and
    hashed tables alike); editing the entry a run uses moves it; an entry it does not use never does."""
    from avkv.config import compose
    from avkv.experiment import resolved
    from avkv.results import run_hash

    def h(*o):
        return run_hash(resolved(compose(list(o))))
    for ds in ("avqa", "videomme", "kespeech"):
        base = h(f"dataset={ds}", "model=tiny_qwen2_5_vl")
        assert h(f"dataset={ds}", "model=tiny_qwen2_5_vl", "++dataset.prompts.videollama2=another text") == base, ds
    assert h("dataset=avqa", "model=tiny_qwen2_5_vl", "dataset.prompts.default=say") != h("dataset=avqa",
                                                                                           "model=tiny_qwen2_5_vl")
    vl2 = h("dataset=avqa", "model=tiny_videollama2_av")               # videollama2 has its own avqa entry
    assert h("dataset=avqa", "model=tiny_videollama2_av", "dataset.prompts.default=say") == vl2
    assert h("dataset=avqa", "model=tiny_videollama2_av", "dataset.prompts.videollama2=say") != vl2
