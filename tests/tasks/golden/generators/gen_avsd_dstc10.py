"""AVSD golden, DSTC10 version: the official DSTC10 AVSD evaluation package (ankitshah009/AVSD-DSTC10_baseline,
folder dstc10avsd_eval/: dstc10avsd_eval.sh -> evaluation/evaluate.py -S data/stopwords.txt --last_only, on PyPI
pycocoevalcap 1.2 = salaniz/pycocoevalcap; Python 3, Java PTBTokenizer 3.4.1), run unmodified on
(a) our adversarial cases, each once in one submission (as a participant would submit them) and once alone, and
(b) the DSTC7 organisers' sample submission against the DSTC7 multiref answers in DSTC10's dialog format (the
"mock test set from DSTC7 multiref" the DSTC10 organisers describe).

Run OUTSIDE the avkv repository with the side venv that has pycocoevalcap (python gen_avsd_dstc10.py). The official
code is only observed: PTBTokenizer.tokenize and Rouge.compute_score are wrapped to record their inputs/outputs (they
run unchanged); in the one-case-alone runs METEOR is replaced by a stub (it is not compared and costs a JVM with 2 GB
per run). No avkv code is imported.
"""
import gzip, hashlib, json, os, platform, runpy, subprocess, sys
from pathlib import Path

PKG = Path("/work/scratch14b/run_dstc10")            # dstc10avsd_eval/ of the mirror, extracted unmodified
MIRROR = "ankitshah009+AVSD-DSTC10_baseline"
GOLDEN = Path(__file__).resolve().parents[1]

R1 = ["there is a man sitting on the couch", "one man is in the video .", "yes , there is one man reading"]
# the DSTC7 golden's cases (avsd_official.json), then DSTC10-specific ones
CASES = [
    ("there is a man sitting on the couch", R1), ("There is a man sitting on the couch.", R1),
    ("A man.", R1), ("a", R1), ("I", ["i do not know"]), ("I don't know.", ["i don't know", "no idea"]),
    ("I cannot tell.", ["i can not tell", "not sure"]), ("He can't see it, can he?", ["he can not see it"]),
    ("It's 3:30 o'clock.", ["it is 3:30 o'clock", "half past three"]), ("He paid $1,000 & 5% tax.", ["he paid 1,000"]),
    ("There are 2 people.", ["there are 2 people", "two people"]), ("2", ["2", "two"]), ("Two", ["2", "two"]),
    ("Yes, he's holding a T-shirt.", ["yes he 's holding a t-shirt"]), ("No. He doesn't.", ["no he does n't"]),
    ("The man (in red) walks to the door... then leaves!", ["the man walks to the door and leaves"]),
    ("He says \"hello\" and 'bye'.", ["he says hello"]), ("Mr. Smith went to the U.S.A. yesterday.", ["mr. smith left"]),
    ("They're gonna eat; we'll see.", ["they are going to eat"]), ("wanna go? gotta go!", ["want to go"]),
    ("Yes!!!", ["yes", "yes !"]), ("What??? No way!?", ["no way"]), ("café naïve über", ["cafe naive uber"]),
    ("é è a b", ["é è a b"]), ("“Curly” quotes — and … dashes", ["curly quotes and dashes"]),
    ("", ["something"]), ("   ", ["something"]), (",", ["something"]), (". . .", ["something"]),
    ("a i 2 , .", ["a i 2"]), ("x y z", ["x y z", "a b c"]), ("The cat sat on the mat.", ["the cat is on the mat"]),
    ("a b c d e f", ["a c e", "b d f", "f e d c b a"]), ("a cat", ["the cat", "a dog", "cat"]),
    ("red red red", ["red"]), ("he opens the fridge/freezer", ["he opens the fridge"]),
    ("I'd've done it.", ["i would have done it"]), ("Rock'n'roll 'tis", ["rock and roll"]),
    ("He picks up his phone.He calls someone.", ["he picks up his phone and calls"]),
    ("It is -5 degrees, +5 degrees.", ["minus 5 degrees"]), ("ok :) yes", ["ok yes"]),
    ("Is he cleaning a computer.. or just the desk?", ["he is cleaning the desk"]),
    ("A, B, and C.", ["a b and c"]), ("He is 5'10\" tall.", ["he is 5 10 tall"]),
    ("The video is 30 seconds long (approx.).", ["it is 30 seconds long"]),
    ("ONE MAN IS IN THE VIDEO", R1), ("one\tman\nis  in the video", R1), ("one\u00a0man is in the video", R1),
    ("he 's standing by the door .", ["he 's standing by the door"]), ("He's standing by the door", ["he is standing"]),
    ("Unicode: 北京 and Ελλάδα", ["北京"]), ("#1 @ home * + = / \\ | < > ~ ^", ["home"]),
    # --- DSTC10: the filter runs on references too, and only on the tokens "," and "."
    ("a", ["a"]), ("i see 2 cats", ["i see 2 cats"]), ("é", ["é"]), ("x", ["x y"]),
    ("yes", ["yes ."]), ("yes", [".", "no"]), ("yes", [","]), (".", ["."]), ("", [". ,"]), (",", ["yes", ","]),
    ("\\. test", ["test"]), ("., yes", ["yes"]), ("..", ["something"]), (",,", ["x"]), ("yes.", ["yes"]),
    ("he sits . then stands", ["he sits then stands"]), ("he sits , then stands", ["he sits . then stands"]),
    ("Mr . Smith left", ["mr smith left"]), ("Mr. Smith left", ["mr . smith left"]), ("U.S. .", ["u.s."]),
    ("he has pens , etc . and more", ["he has pens etc and more"]), ("3 . 5", ["3.5"]), ("3.5", ["3 . 5"]),
    ("i can 't tell what it is", ["i can 't tell what kind of show that is .", "no i can't tell ."]),
    ("idk what it is", ["a little bit , but i cant tell what it is",
                        "i can see what he is watching , but idk what it is .",
                        "he appears to be watching a newscaster on the tv .",
                        "yes he appears to be watching the news .",
                        "yes but i cannot tell what it is .", "no i can 't tell what kind of show that is ."]),
    ("red", ["red", "red"]), ("\n yes \n", ["yes"]), ("YES , IT IS .", ["yes it is"]),
    ("well - maybe -- no", ["well maybe no"]), ("C .", ["c"]), ("one\u2003man", ["one man"]),
    ("one\u3000man", ["one man"]), ("one\x1cman", ["one man"]), ("one\x85man", ["one man"]),
    ("one\u2028man", ["one man"]), ("one\u200bman", ["one man"]), ("he walks in .\u00a0.", ["he walks in"]),
    ("a man , a woman .", ["a man . a woman ,"]),
    ("It is a man . He is in the kitchen .", ["it is a man in a kitchen"]),
    # characters the Java lexer reads as a line break (U+2028/9, CR, VT, FF) or ignores (soft hyphen, zero-width)
    ("one\u2029man is here", ["one man is here"]), ("one man", ["one\u2028man"]), ("one man", ["one\u2029man ."]),
    ("one\rman", ["one man"]), ("one\x0cman\x0bhere", ["one man here"]), ("one\xadman", ["oneman", "one man"]),
    ("\ufeffyes it is", ["yes it is"]), ("one\u2060man", ["one man"]), ("yes\u200d", ["yes"]),
    # quotes the Java lexer does not read as apostrophes
    ("the lady\u2018s hair", ["the lady s hair"]), ("it ''s red", ["it s red", "it 's red"]),
    ("he does't know", ["he does t know"]), ("let 'em go", ["let 'em go", "let em go"]), ("who''ll go", ["who ll go"]),
]

# single captions through pycocoevalcap 1.2's PTBTokenizer alone (coco-caption's wrapper, one JVM per caption): the
# tokenizer the 'coco' and 'dstc7' versions feed unfiltered text to (line breaks, format characters, quotes)
TOKENIZER_LINES = [
    "one\rman", "one\r\nman", "one\x0bman", "one\x0cman", "one\u2028man", "one\u2029man", "\u2028one man",
    "one\x85man", "one\x1cman", "one\u00a0man", "one\u3000man", "one\u202fman", "one\u205fman", "one\u2003man",
    "one\xadman", "one \xad man", "one\u200bman", "one\u200eman", "one\u180eman", "one\u2060man",
    "\ufeffone man", "yes\u200d", "the lady\u2018s hair", "\u2018hello\u2019", "it\u2019s", "don\u2019t",
    "it ''s red", "who''s there", "he''ll go", "she'''s", "don''t", "does't", "it't", "Would't", "n't", "can 't",
    "let 'em go", "'tis", "o'clock", "rock'n'roll", "y'all", "ma'am", "students' book",
]


def commit_of(mirror, rev="HEAD"):
    return subprocess.check_output(["git", "-C", f"/work/.mirror/{mirror}/repo", "rev-parse", rev], text=True).strip()


# ------------------------------------------------------------------------------------- inside the official run

def _record(record_path, stub_meteor):
    """Wrap (not change) the official tokenizer and ROUGE so their inputs/outputs are written to record_path."""
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb
    import pycocoevalcap.rouge.rouge as rouge
    rec = {"tokenize": [], "rouge": None}
    orig_tok, orig_rouge = ptb.PTBTokenizer.tokenize, rouge.Rouge.compute_score

    def tokenize(self, captions):
        out = orig_tok(self, captions)
        rec["tokenize"].append({"in": {k: [c["caption"] for c in v] for k, v in captions.items()}, "out": out})
        return out

    def compute_score(self, gts, res):
        avg, scores = orig_rouge(self, gts, res)
        rec["rouge"] = {"keys": list(gts.keys()), "scores": [float(s) for s in scores], "mean": float(avg)}
        json.dump(rec, open(record_path, "w"), ensure_ascii=False)
        return avg, scores

    ptb.PTBTokenizer.tokenize, rouge.Rouge.compute_score = tokenize, compute_score
    if stub_meteor:
        import pycocoevalcap.meteor.meteor as met

        class NoMeteor:
            def compute_score(self, gts, res):
                return 0.0, [0.0] * len(gts)

            def method(self):
                return "METEOR (stubbed: not compared)"
        met.Meteor = NoMeteor


def official_main(submission, reference, record_path, stub_meteor):
    """dstc10avsd_eval.sh's command, in-process: python3 evaluation/evaluate.py -S ... -r ... -s ... --last_only."""
    os.chdir(PKG)
    _record(record_path, stub_meteor == "1")
    sys.argv = ["evaluation/evaluate.py", "-S", "./data/stopwords.txt", "-r", reference, "-s", submission,
                "--last_only"]
    runpy.run_path("evaluation/evaluate.py", run_name="__main__")


# -------------------------------------------------------------------------------------------------- driver side

def run_official(work, items, stub_meteor):
    """items: [(image_id, turn, hypothesis, references)] -> (record, stdout)."""
    work.mkdir(parents=True, exist_ok=True)
    sub, ref = [], []
    for vid, turn, hyp, refs in items:
        hist = [{"question": f"q{k}", "answer": f"a{k}"} for k in range(turn)]
        sub.append({"image_id": vid, "dialog": hist + [{"question": "last?", "answer": hyp}]})
        ref.append({"image_id": vid, "dialog": hist + [{"question": "last?", "answer": list(refs)}]})
    json.dump({"dialogs": sub}, open(work / "submission.json", "w"))
    json.dump({"dialogs": ref, "version": "golden", "type": "references"}, open(work / "reference.json", "w"))
    (work / "record.json").unlink(missing_ok=True)
    p = subprocess.run([sys.executable, __file__, "--official", str(work / "submission.json"),
                        str(work / "reference.json"), str(work / "record.json"), "1" if stub_meteor else "0"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED="0"))
    rec = json.load(open(work / "record.json")) if (work / "record.json").exists() else {}
    if p.returncode:
        if not rec.get("rouge"):
            raise SystemExit(p.stdout[-3000:] + p.stderr[-3000:])
        rec["crash_after_rouge"] = p.stderr.strip().splitlines()[-1]   # e.g. CIDEr on a one-dialog file
    return rec, p.stdout


def tokenize_alone(caption):
    code = ("import json, sys; from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer; "
            "print(json.dumps(PTBTokenizer().tokenize({0: [{'caption': json.loads(sys.argv[1])}]})[0][0]))")
    p = subprocess.run([sys.executable, "-c", code, json.dumps(caption)], capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


def printed(stdout):
    out = {}
    for ln in stdout.splitlines():
        if ln.startswith("| ") and ": " in ln:
            k, v = ln[2:].split(": ")
            out[k] = float(v)
    return out


def per_case(rec, keys):
    refs_tok, hyp_tok = rec["tokenize"][0], rec["tokenize"][1]
    score = dict(zip(rec["rouge"]["keys"], rec["rouge"]["scores"]))
    return [{"filtered_hypothesis": hyp_tok["in"][k][0], "filtered_references": refs_tok["in"][k],
             "tokenized_hypothesis": hyp_tok["out"][k][0], "tokenized_references": refs_tok["out"][k],
             "rouge_l": score[k]} for k in keys]


def main():
    scratch = Path("/work/scratch14b/golden_run")
    items = [(f"V{i:05d}", 1, h, r) for i, (h, r) in enumerate(CASES)]
    keys = [f"V{i:05d}_res002" for i in range(len(CASES))]
    rec, out = run_official(scratch / "batch", items, stub_meteor=False)
    rec2, out2 = run_official(scratch / "batch2", items, stub_meteor=False)
    assert rec == rec2 and printed(out) == printed(out2), "the official pipeline was not deterministic"
    batch = per_case(rec, keys)
    alone = []
    for i, it in enumerate(items):
        r, _ = run_official(scratch / f"alone{i:03d}", [it], stub_meteor=True)
        alone.append(per_case(r, [keys[i]])[0])
        if "crash_after_rouge" in r:
            alone[-1]["official_crash_after_rouge"] = r["crash_after_rouge"]
    cases = []
    for i, (h, r) in enumerate(CASES):
        c = {"id": i, "hypothesis": h, "references": r, **alone[i]}
        diff = {k: v for k, v in batch[i].items() if v != alone[i][k]}
        if diff:
            c["in_submission"] = diff
        cases.append(c)
    pyc = Path(sys.executable).parents[1] / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / \
        "site-packages" / "pycocoevalcap"
    src = {"repo": "ankitshah009/AVSD-DSTC10_baseline (the DSTC10 AVSD baseline; folder dstc10avsd_eval/ = 'Official "
                   "evaluation package for DSTC10 Audio-Visual Scene-aware Dialog (AVSD) track')",
           "commit": commit_of(MIRROR), "path": "dstc10avsd_eval/",
           "command": "dstc10avsd_eval.sh: python3 evaluation/evaluate.py -S ./data/stopwords.txt -r <reference> "
                      "-s <submission> --last_only",
           "stopwords_txt": "lines ',' and '\\.' (sha256 " + hashlib.sha256((PKG / "data/stopwords.txt").read_bytes())
                            .hexdigest() + ")",
           "coco_caption": "pycocoevalcap 1.2 from PyPI (salaniz/pycocoevalcap, as the package README names)",
           "tokenizer_jar": "stanford-corenlp-3.4.1.jar of pycocoevalcap 1.2, sha256 " + hashlib.sha256(
               (pyc / "tokenizer/stanford-corenlp-3.4.1.jar").read_bytes()).hexdigest(),
           "runtime": f"Python {platform.python_version()}, " + subprocess.run(
               ["java", "-version"], capture_output=True, text=True).stderr.splitlines()[0],
           "how": "each case is the last turn (turn 2) of one dialog; the submission holds the hypothesis, the "
                  "reference file the reference list (DSTC10 format). Per case: the official pipeline on that "
                  "dialog alone (rouge_l, the filtered and PTB-tokenised texts, recorded by wrapping "
                  "PTBTokenizer.tokenize and Rouge.compute_score; METEOR stubbed in these runs). 'in_submission': "
                  "what differed when all cases ran as one submission (run twice, identical); 'aggregate' is that "
                  "run's, METEOR included."}
    tokenizer = [{"caption": t, "tokenized": tokenize_alone(t)} for t in TOKENIZER_LINES]
    write("avsd_dstc10_official.json", {
        "benchmark": "AVSD (DSTC10 official evaluation package)", "source": src,
        "aggregate": {"rouge_l_mean": rec["rouge"]["mean"], "printed": printed(out), "n_cases": len(cases)},
        "cases": cases,
        "tokenizer_source": "pycocoevalcap 1.2 tokenizer/ptbtokenizer.py: PTBTokenizer().tokenize({0: [{'caption': "
                            "c}]}), one caption per call (" + src["runtime"] + ")",
        "tokenizer": tokenizer})

    # (b) the DSTC7 sample submission, in DSTC10's format (avsd_sample_submission.json.gz: our committed copy)
    sample = json.loads(gzip.open(GOLDEN / "avsd_sample_submission.json.gz").read())
    items = [(x["image_id"], x["turn"], x["hypothesis"], x["references"]) for x in sample]
    rec, out = run_official(scratch / "sample", items, stub_meteor=False)
    keys = ["%s_res%03d" % (x["image_id"], x["turn"] + 1) for x in sample]
    score = dict(zip(rec["rouge"]["keys"], rec["rouge"]["scores"]))
    assert len(score) == len(sample) == 1710
    write("avsd_dstc10_sample_submission.json", {
        "benchmark": "AVSD (DSTC10 official evaluation package) on the DSTC7 organisers' sample submission",
        "source": dict(src, how="avsd_sample_submission.json.gz (the DSTC7 baseline's 1,710 answers and the 6 DSTC7 "
                                "references each) written as a DSTC10 submission + reference file (dialog i has "
                                "turn+1 turns) and scored by the official DSTC10 pipeline in one run; rouge_l = "
                                "Rouge.compute_score's per-dialog scores, in the order of the .gz file"),
        "data_file": "avsd_sample_submission.json.gz",
        "aggregate": {"rouge_l_mean": rec["rouge"]["mean"], "printed": printed(out), "n_dialogs": len(sample)},
        "rouge_l": [score[k] for k in keys]})


def write(name, payload):
    p = GOLDEN / name
    p.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print("wrote", p, len(payload.get("cases", payload.get("rouge_l", []))), "entries")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--official":
        official_main(*sys.argv[2:6])
    else:
        main()
