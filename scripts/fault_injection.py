"""Fault injection on the results store and the inputs, as an operator would meet the faults (issue 16).

    python scripts/fault_injection.py --out /tmp/faults            # every case (~10 min on 2 busy cores)
    python scripts/fault_injection.py --out /tmp/faults --only writers,repair

Each case runs ``python run.py`` (or the loader / store directly) in a scratch folder, injects the fault and
prints what it measured: exit codes, lines and distinct ids per run directory, the error text. Nothing in the
checkout is modified; the tiny checkpoints and fixtures of ``make assets`` are read (copied where damaged).
The results go to ``<out>/results.json`` too.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PY = sys.executable
FIX = ROOT / ".cache" / "fixtures"
OUT: Path = Path("/tmp/avkv-faults")
RESULTS: dict[str, list[str]] = {}


def say(case: str, line: str) -> None:
    print(f"[{case}] {line}", flush=True)
    RESULTS.setdefault(case, []).append(line)


def run_py(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(ROOT / "run.py"), *args, "progress=false"], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=timeout)


def popen_py(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([PY, str(ROOT / "run.py"), *args, "progress=false"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(ROOT), **kw)


def lines_ids(run_dir: Path) -> tuple[int, int]:
    p = run_dir / "samples.jsonl"
    if not p.is_file():
        return 0, 0
    ids = []
    for ln in p.read_text().splitlines():
        try:
            ids.append(json.loads(ln)["sample_id"])
        except (ValueError, KeyError):
            pass
    return len(p.read_text().splitlines()), len(set(ids))


def run_dirs(runs: Path) -> list[Path]:
    return sorted(d for d in runs.glob("*__*") if d.is_dir()) if runs.is_dir() else []


def first_run_records(runs: Path) -> list[dict]:
    d = run_dirs(runs)
    return [json.loads(x) for x in (d[0] / "samples.jsonl").read_text().splitlines()] if d else []


def last_err(p: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    first = next((i for i, ln in enumerate(lines) if ln.startswith("avkv:")), None)
    if first is not None:
        return " ".join(ln.strip() for ln in lines[first:first + 4])[:300]
    return (lines or [""])[-1][:240]


# ------------------------------------------------------------------------------------------------ cases
def case_writers() -> None:
    """Two processes on one config, started together (3 tries) and 5 s apart."""
    for k, offset in enumerate([0, 0, 0, 5]):
        runs = OUT / f"writers{k}"
        shutil.rmtree(runs, ignore_errors=True)
        args = ["dataset.limit=60", f"paths.runs={runs}"]
        t0 = time.time()
        a = popen_py(*args)
        time.sleep(offset)
        b = popen_py(*args)
        ra, rb = a.wait(600), b.wait(600)
        d = run_dirs(runs)
        n, u = lines_ids(d[0]) if d else (0, 0)
        refused = next((p for p, r in ((a, ra), (b, rb)) if r != 0), None)
        msg = refused.stderr.read().strip().splitlines()[-1][:200] if refused else "-"
        say("writers", f"try {k + 1} (offset {offset} s): exit codes {ra}/{rb}, {len(d)} run dir, {n} lines, "
                       f"{u} distinct ids, {n - u} duplicates, {time.time() - t0:.0f} s; refused: {msg}")


def case_sweep_kill() -> None:
    """Kill -9 a hydra/launcher=local sweep while its four children run; do they stop? then rerun."""
    runs, sweep = OUT / "sweepkill", OUT / "sweepkill-sweep"
    shutil.rmtree(runs, ignore_errors=True)
    shutil.rmtree(sweep, ignore_errors=True)
    from avkv.results import lock_holder
    args = ["-m", "hydra/launcher=local", "method=snapkv,random", "budget=0.2,0.5", "dataset.limit=150",
            f"paths.runs={runs}"]
    p = popen_py(*args, f"hydra.sweep.dir={sweep}", start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        held = [d for d in run_dirs(runs) if lock_holder(d)]
        if len(held) == 4 and all(lines_ids(d)[0] > 0 for d in held):
            break
        time.sleep(0.2)
    before = {d.name: lines_ids(d)[0] for d in run_dirs(runs)}
    pids = [lock_holder(d)["pid"] for d in run_dirs(runs) if lock_holder(d)]
    os.kill(p.pid, signal.SIGKILL)
    p.wait()                                   # reaped, as a shell would
    t0 = time.time()
    while time.time() - t0 < 30 and any(lock_holder(d) for d in run_dirs(runs)):
        time.sleep(0.1)
    gone = time.time() - t0
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists() and
             "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()]
    at_stop = {d.name: lines_ids(d)[0] for d in run_dirs(runs)}
    time.sleep(3)
    after = {d.name: lines_ids(d)[0] for d in run_dirs(runs)}
    say("sweep_kill", f"launcher killed with 4 children writing ({sorted(before.values())} lines): all locks free "
                      f"after {gone:.1f} s, children alive: {len(alive)}; lines then {sorted(at_stop.values())}, "
                      f"3 s later {sorted(after.values())} (still written: {after != at_stop})")
    os.killpg(p.pid, signal.SIGKILL) if alive else None
    r = run_py(*args, f"hydra.sweep.dir={sweep}-2")
    counts = [lines_ids(d) for d in run_dirs(runs)]
    say("sweep_kill", f"rerun exit {r.returncode}: {len(counts)} run dirs, (lines, distinct ids) {counts}")


def case_repair() -> None:
    """A 300,020-record samples.jsonl with a torn tail; kill -9 the repair at random moments (20 tries) and at
    each of its writes in turn."""
    d = OUT / "repair"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    body = b"".join(json.dumps({"sample_id": str(i), "error": None, "prediction": "A"}).encode() + b"\n"
                    for i in range(300_020))
    lost, kills = 0, 0
    code = "import sys; from avkv.results import RunStore; RunStore(sys.argv[1]).repair()"
    for k in range(20):
        (d / "samples.jsonl").write_bytes(body + b'{"sample_id": "tor')
        p = subprocess.Popen([PY, "-c", code, str(d)], env=dict(os.environ, PYTHONPATH=str(ROOT)))
        time.sleep(random.uniform(0.0, 0.12))
        p.kill()
        kills += p.wait() == -signal.SIGKILL
        data = (d / "samples.jsonl").read_bytes()
        lost += not data.startswith(body)
    from avkv.results import read_records
    n = len(read_records(d / "samples.jsonl", warn=False))
    say("repair", f"300,020 records + torn tail, repair killed at random 20 times ({kills} killed mid-run): "
                  f"{lost} tries lost records; records after the last try: {n}")
    import tests.test_store as ts                       # the deterministic kill after each write
    script = d / "killer.py"
    script.write_text(ts.KILLER)
    outcomes = []
    for k in range(1, 4):
        (d / "samples.jsonl").write_bytes(body + b'{"sample_id": "tor')
        p = subprocess.run([PY, str(script), str(d), str(k)], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
        outcomes.append(f"kill at write #{k}: rc {p.returncode}, records {len(read_records(d / 'samples.jsonl', warn=False))}")
        if p.returncode == 0:
            break
    say("repair", "; ".join(outcomes))


def case_meta() -> None:
    """A torn and an empty meta.json, and a record without sample_id, on resume."""
    runs = OUT / "meta"
    shutil.rmtree(runs, ignore_errors=True)
    r = run_py("dataset.limit=4", f"paths.runs={runs}")
    d = run_dirs(runs)
    if r.returncode or not d:
        say("meta", f"setup run failed: {last_err(r)}")
        return
    d = d[0]
    meta = d / "meta.json"
    meta.write_bytes(meta.read_bytes()[:37])
    with open(d / "samples.jsonl", "a") as f:
        f.write(json.dumps({"prediction": "no id"}) + "\n")
    r1 = run_py("dataset.limit=4", f"paths.runs={runs}")
    meta.write_text("")
    r2 = run_py("dataset.limit=4", f"paths.runs={runs}")
    warn = [ln for ln in (r1.stderr + r1.stdout).splitlines() if "meta.json" in ln or "sample_id" in ln]
    say("meta", f"torn meta.json + id-less record: exit {r1.returncode}; empty meta.json: exit {r2.returncode}; "
                f"lines/ids {lines_ids(d)}; set aside: {sorted(p.name for p in d.glob('meta.json.unreadable-*'))}; "
                f"warnings: {[w.split('] ')[-1][:150] for w in warn][:2]}")


def _copy(family: str, name: str) -> Path:
    dst = OUT / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(FIX / family, dst)
    return dst


def case_duplicates() -> None:
    from avkv.tasks.avsd import AVSD
    from avkv.tasks.librispeech import LibriSpeech
    from avkv.tasks.milebench import MileBench
    from avkv.tasks.music_avqa import MusicAVQA
    root = _copy("milebench", "dup-milebench")
    idx = root / "IEdit" / "IEdit.json"
    d = json.loads(idx.read_text())
    d["data"].append(dict(d["data"][0]))
    idx.write_text(json.dumps(d))
    tasks = [("milebench", MileBench(root, tasks=["IEdit"]))]
    root = _copy("music_avqa", "dup-music")
    idx = root / "json_update" / "avqa-test.json"
    d = json.loads(idx.read_text())
    d[7]["question_id"] = d[3]["question_id"]
    idx.write_text(json.dumps(d))
    tasks.append(("music_avqa", MusicAVQA(root)))
    root = _copy("librispeech", "dup-ls") / "LibriSpeech"
    t = root / "test-clean/1001/2002/1001-2002.trans.txt"
    lines = t.read_text().splitlines()
    t.write_text("\n".join([*lines, lines[1]]) + "\n")
    tasks.append(("librispeech", LibriSpeech(root)))
    root = _copy("avsd", "dup-avsd")
    idx = root / "test_set4DSTC7-AVSD.json"
    d = json.loads(idx.read_text())
    d["dialogs"].append(d["dialogs"][1])
    idx.write_text(json.dumps(d))
    tasks.append(("avsd", AVSD(root)))
    for name, task in tasks:
        try:
            n = len(list(task.docs()))
            say("duplicates", f"{name}: loaded {n} docs (NOT refused)")
        except Exception as e:  # noqa: BLE001
            say("duplicates", f"{name}: {type(e).__name__}: {str(e)[:230]}")
    r = run_py("model=tiny_qwen2_5_vl", "dataset=milebench", f"dataset.root={OUT / 'dup-milebench'}",
               "dataset.tasks=[IEdit]", f"paths.runs={OUT / 'dup-runs'}")
    say("duplicates", f"run.py on the MileBench copy: exit {r.returncode}: {last_err(r)}")


def _avqa_three(name: str) -> tuple[Path, list[dict]]:
    root = _copy("avqa", name)
    items, seen = [], set()
    for it in json.loads((root / "val_qa.json").read_text()):
        if it["video_name"] not in seen:
            items.append(it)
            seen.add(it["video_name"])
    items = items[:3]
    (root / "val_qa.json").write_text(json.dumps(items))
    return root, items


def case_retry() -> None:
    root, items = _avqa_three("retry-avqa")
    runs = OUT / "retry-runs"
    shutil.rmtree(runs, ignore_errors=True)
    video = root / "videos" / f"{items[1]['video_name']}.mp4"
    good = video.read_bytes()
    video.write_bytes(b"transient")
    args = ["model=tiny_qwen2_audio", "method=streamingllm", "dataset=avqa", f"dataset.root={root}",
            "max_new_tokens=2", f"paths.runs={runs}"]
    r1 = run_py(*args)
    d = run_dirs(runs)[0]
    s1 = json.loads((d / "summary.json").read_text())
    video.write_bytes(good)
    r2 = run_py(*args)
    todo = [ln for ln in (r2.stdout + r2.stderr).splitlines() if "to run" in ln]
    s2 = json.loads((d / "summary.json").read_text())
    m = subprocess.run([PY, "-m", "avkv.cli", "missing", "--retry-failed", *args], capture_output=True, text=True,
                       cwd=str(ROOT))
    cmd = [ln for ln in m.stdout.splitlines() if ln.startswith("python run.py")]
    r3 = subprocess.run([PY, *shlex.split(cmd[0])[1:]], capture_output=True, text=True, cwd=str(ROOT)) if cmd else None
    s3 = json.loads((d / "summary.json").read_text())
    say("retry", f"first run: exit {r1.returncode}, n {s1['n']}, n_failed {s1['n_failed']}; file fixed, rerun "
                 f"without retry: exit {r2.returncode}, '{todo[-1].split('] ')[-1] if todo else '?'}', n_failed "
                 f"{s2['n_failed']}; `avkv missing --retry-failed` printed: {cmd[:1]}; after it: exit "
                 f"{r3.returncode if r3 else '-'}, n {s3['n']}, n_failed {s3['n_failed']}, lines/ids {lines_ids(d)}")


def case_identity() -> None:
    runs = OUT / "identity-runs"
    shutil.rmtree(runs, ignore_errors=True)
    base = ["experiment=budget_curves", "smoke=tiny", "method=full,snapkv", f"paths.runs={runs}"]
    r = run_py("-m", *base, "grid.budgets=[0.2]", f"hydra.sweep.dir={OUT / 'identity-sweep'}")
    m = subprocess.run([PY, "-m", "avkv.cli", "missing", *base, "grid.budgets=[0.2,0.5]"], capture_output=True,
                       text=True, cwd=str(ROOT))
    summary = [ln for ln in m.stdout.splitlines() if " jobs: " in ln]
    say("identity", f"preset run at budgets [0.2] (exit {r.returncode}, {len(run_dirs(runs))} dirs), then "
                    f"`avkv missing` with budgets [0.2,0.5]: {summary[0] if summary else m.stderr[-200:]}")
    r = run_py("-m", *base[:2], "method=full", "budget=0.1,0.2,0.5", f"paths.runs={runs}-full",
               f"hydra.sweep.dir={OUT / 'identity-sweep2'}")
    d = run_dirs(Path(f"{runs}-full"))
    logs = [ln.split("] ")[-1] for ln in (r.stdout + r.stderr).splitlines() if "to run" in ln or "in use" in ln]
    say("identity", f"method=full at 3 budgets: exit {r.returncode}, {len(d)} run dir(s) {[x.name for x in d]}; "
                    f"per job: {logs}")
    from avkv import report, results
    from avkv.config import compose
    from avkv.experiment import resolved
    res = resolved(compose(["method=snapkv", "shard=1", "num_shards=2"]))
    res["method_name"] = "snapkv"
    say("identity", f"report point_id == results.point_hash: "
                    f"{report.identities(res)['point_id'] == results.point_hash(res)[:12]}")


def case_untrusted() -> None:
    # pickle-only checkpoint
    from safetensors.torch import load_file
    import torch
    ck = OUT / "pickle-ckpt"
    shutil.rmtree(ck, ignore_errors=True)
    shutil.copytree(ROOT / ".cache/models/tiny_qwen2_audio", ck)
    state = {}
    for f in ck.glob("*.safetensors"):
        state.update(load_file(str(f)))
        f.unlink()
    torch.save(state, ck / "pytorch_model.bin")
    r = run_py("model=tiny_qwen2_audio", f"model.path={ck}", "dataset=avqa", "dataset.limit=1",
               f"paths.runs={OUT / 'pickle-runs'}")
    say("untrusted", f"pytorch_model.bin only: exit {r.returncode}: {last_err(r)}")
    # absolute video_name (AVQA) and images_path traversal (MileBench)
    secret = OUT / "outside.mp4"
    shutil.copy(next((FIX / "avqa" / "videos").glob("*.mp4")), secret)
    root, items = _avqa_three("abs-avqa")
    items[0]["video_name"] = str(secret.with_suffix(""))
    (root / "val_qa.json").write_text(json.dumps(items))
    runs = OUT / "abs-runs"
    shutil.rmtree(runs, ignore_errors=True)
    r = run_py("model=tiny_qwen2_5_vl", "dataset=avqa", f"dataset.root={root}", "max_new_tokens=2", f"paths.runs={runs}")
    recs = first_run_records(runs)
    say("untrusted", f"AVQA absolute video_name: exit {r.returncode}, {len(recs)} samples, failed "
                     f"{[x['error'][:160] for x in recs if x['error']]}")
    root = _copy("milebench", "trav-milebench")
    idx = root / "IEdit" / "IEdit.json"
    d = json.loads(idx.read_text())
    d["data"][0]["task_instance"]["images_path"][1] = "../../../../etc/passwd"
    idx.write_text(json.dumps(d))
    runs = OUT / "trav-runs"
    shutil.rmtree(runs, ignore_errors=True)
    r = run_py("model=tiny_qwen2_5_vl", "dataset=milebench", f"dataset.root={root}", "dataset.tasks=[IEdit,ALFRED]",
               "dataset.skip_missing_tasks=true", "max_new_tokens=2", f"paths.runs={runs}")
    recs = first_run_records(runs)
    say("untrusted", f"MileBench images_path ../../../../etc/passwd: exit {r.returncode}, {len(recs)} samples, "
                     f"failed {[x['error'][:170] for x in recs if x['error']]} {last_err(r) if r.returncode else ''}")
    # chat markers in a question, per family
    from tests.models.test_untrusted import FAMILIES, FORGED_TURN, PLAIN, _adapter, _controls, _media
    from avkv.schema import Prompt
    for fam in FAMILIES:
        ad = _adapter(fam)
        m = _media(fam)
        p = _controls(ad, ad.encode(Prompt(context=m, question=PLAIN)))
        f = _controls(ad, ad.encode(Prompt(context=m, question=FORGED_TURN)))
        im_start = ad.tokenizer.convert_tokens_to_ids("<|im_start|>")
        say("untrusted", f"{fam}: control tokens plain {sum(v for k, v in p.items() if k.startswith('id'))}, with "
                         f"the forged turn {sum(v for k, v in f.items() if k.startswith('id'))} "
                         f"(<|im_start|>: {p.get(f'id{im_start}')} vs {f.get(f'id{im_start}')}); equal: {p == f}")


def case_librispeech() -> None:
    root = _copy("librispeech", "ls-trunc") / "LibriSpeech"
    flac = root / "test-clean/1001/2002/1001-2002-0002.flac"
    flac.write_bytes(flac.read_bytes()[: flac.stat().st_size // 2])
    runs = OUT / "ls-runs"
    shutil.rmtree(runs, ignore_errors=True)
    shutil.rmtree(root.parent / "LibriSpeech-long", ignore_errors=True)
    r = run_py("model=tiny_qwen2_audio", "dataset=librispeech_long", f"dataset.root={root}", "dataset.min_s=6",
               "dataset.max_s=12", "max_new_tokens=2", f"paths.runs={runs}")
    recs = first_run_records(runs)
    say("librispeech", f"librispeech_long, one FLAC cut in half: exit {r.returncode}, {len(recs)} segments, "
                       f"failed {[x['error'][:200] for x in recs if x['error']]} {last_err(r) if r.returncode else ''}")
    root = _copy("librispeech", "ls-latin1") / "LibriSpeech"
    t = root / "test-clean/1002/2003/1002-2003.trans.txt"
    t.write_bytes(t.read_bytes().replace(b"\n", b" CAF\xe9\n", 1))
    r = run_py("model=tiny_qwen2_audio", "dataset=librispeech", f"dataset.root={root}", "max_new_tokens=2",
               f"paths.runs={OUT / 'ls-runs2'}")
    say("librispeech", f"non-UTF-8 trans.txt: exit {r.returncode}: {last_err(r)}")


def case_values() -> None:
    empty = _copy("avqa", "empty-avqa")
    (empty / "val_qa.json").write_text("[]")
    absent = OUT / "no-such-checkpoint"
    for bad in (["budget=abc"], ["budget_tokens=0"], ["budget_tokens=-5"], ["max_new_tokens=-3"],
                ["method.window=-4"], ["dataset=avqa", f"dataset.root={empty}"]):
        t0 = time.time()
        # a checkpoint that does not exist: an error about it would mean the value was checked too late
        r = run_py(*bad, "model=tiny_qwen2_5_vl", f"model.path={absent}", f"paths.runs={OUT / 'values-runs'}")
        say("values", f"{' '.join(bad).replace(str(OUT), '<out>')}: exit {r.returncode} in {time.time() - t0:.1f} s "
                      f"(before the model: {'no-such-checkpoint' not in r.stderr}): "
                      f"{last_err(r).replace(str(OUT), '<out>')[:200]}")


CASES = {"writers": case_writers, "sweep_kill": case_sweep_kill, "repair": case_repair, "meta": case_meta,
         "duplicates": case_duplicates, "retry": case_retry, "identity": case_identity, "untrusted": case_untrusted,
         "librispeech": case_librispeech, "values": case_values}


def main() -> int:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--only", default=",".join(CASES), help="comma list of: " + ", ".join(CASES))
    a = ap.parse_args()
    OUT = a.out
    OUT.mkdir(parents=True, exist_ok=True)
    for name in a.only.split(","):
        t0 = time.time()
        try:
            CASES[name]()
        except Exception as e:  # noqa: BLE001 - report and go on with the other cases
            say(name, f"CASE ERROR {type(e).__name__}: {e}")
        say(name, f"({time.time() - t0:.0f} s)")
    (OUT / "results.json").write_text(json.dumps(RESULTS, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
