"""AVSD golden: the DSTC7 evaluation package (dstc7avsd_eval.sh: get_hypotheses.py -l -s data/stopwords.txt, then
utils/evaluate.py on coco-caption 3a9afb2 + the package's patch, Python 2.7, Java PTBTokenizer 3.4.1), run
unmodified on (a) our adversarial cases and (b) the organisers' sample submission."""
import ast, gzip, hashlib, json, os, re, shutil, subprocess, sys
from common import OUT, commit_of, write

PKG = "/work/scratch14/run_dstc7"
ENV = dict(os.environ, MPLBACKEND="Agg", PATH=f"{PKG}/bin:" + os.environ["PATH"], PYTHONPATH="./utils/coco-caption:/work/scratch14/py2lib")

R1 = ["there is a man sitting on the couch", "one man is in the video .", "yes , there is one man reading"]
CASES = [  # (hypothesis, references)
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
]


def official(hyps, refs_per):
    """Write a DSTC7 result file + a COCO multiref file, run the package, return per-image ROUGE_L and the mean."""
    work = f"{PKG}/golden_run"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    dialogs, images, annos = [], [], []
    for i, (h, refs) in enumerate(zip(hyps, refs_per)):
        vid = f"V{i:05d}"
        dialogs.append({"image_id": vid, "dialog": [{"question": "q0", "answer": "a0"}, {"question": "q1", "answer": h}]})
        images.append({"name": f"{vid}_1", "id": i + 1})
        for r in refs:
            annos.append({"image_id": i + 1, "id": len(annos) + 1, "caption": r})
    json.dump({"dialogs": dialogs}, open(f"{work}/result.json", "w"))
    json.dump({"info": {}, "licenses": [], "type": "captions", "images": images, "annotations": annos},
              open(f"{work}/multiref.json", "w"))
    subprocess.run(["python2", "utils/get_hypotheses.py", "-l", "-s", "data/stopwords.txt", f"{work}/result.json",
                    f"{work}/hyp.json"], cwd=PKG, env=ENV, check=True)
    p = subprocess.run(["python2", "utils/evaluate.py", f"{work}/multiref.json", f"{work}/hyp.json"], cwd=PKG, env=ENV,
                       capture_output=True, text=True)
    return parse(p.stdout), p.stdout + p.stderr, json.load(open(f"{work}/hyp.json"))


def parse(text):
    per, agg = {}, {}
    for ln in text.splitlines():
        m = re.match(r"^(\d+) (\{.*\})$", ln)
        if m:
            per[int(m.group(1))] = ast.literal_eval(m.group(2))          # the package's own printed dict
        m = re.match(r"^(Bleu_\d|METEOR|ROUGE_L|CIDEr): ([0-9.]+)$", ln)
        if m:
            agg[m.group(1)] = float(m.group(2))
    return per, agg


def main():
    hyps, refs = [c[0] for c in CASES], [c[1] for c in CASES]
    # reference of image 1 is lower-case on purpose: the first JVM start of a session sometimes leaves the very
    # first token of the file un-lower-cased (seen with "There's"), which is not part of what is reproduced
    (per, agg), log, hypfile = official(hyps, refs)
    (per2, _), _, _ = official(hyps, refs)
    assert per == per2, "the official pipeline was not deterministic on these cases"
    if len(per) != len(CASES):
        raise SystemExit(log[-3000:])
    cases = [{"id": i, "hypothesis": h, "references": r, "filtered_hypothesis": hypfile[i]["caption"],
              "rouge_l": per[i + 1]["ROUGE_L"]} for i, (h, r) in enumerate(CASES)]
    import numpy as np
    src = {"repo": "salesforce/BiST (a copy of the organisers' dstc7avsd_eval package)",
           "commit": commit_of("salesforce+BiST"), "path": "dstc7avsd_eval/",
           "get_hypotheses": "dialogtekgeek/AudioVisualSceneAwareDialog@" + commit_of(
               "dialogtekgeek+AudioVisualSceneAwareDialog") + " utils/get_hypotheses.py (filters sent.encode('utf-8'); "
               "the BiST copy has that line commented out)",
           "coco_caption": "tylin/coco-caption@3a9afb2682141a03e1cdc02b0df6770d2c884f6f + utils/coco-caption.patch",
           "tokenizer_jar": "stanford-corenlp-3.4.1.jar (from PyPI pycocoevalcap 1.2) sha256 "
                            + hashlib.sha256(open(f"{PKG}/utils/coco-caption/pycocoevalcap/tokenizer/stanford-corenlp-3.4.1.jar", "rb").read()).hexdigest(),
           "runtime": "Python 2.7.18, OpenJDK 17.0.15",
           "how": "each case is the last turn of one dialog of a result file; the references are a COCO-format "
                  "multiref file (image i = dialog i); dstc7avsd_eval.sh's two commands run unmodified; rouge_l = "
                  "the per-image ROUGE_L evaluate.py prints (run twice, identical)"}
    write("avsd_official.json", {"benchmark": "AVSD (DSTC7)", "source": src,
                                 "aggregate": {"rouge_l_mean": float(np.mean([c["rouge_l"] for c in cases])),
                                               "printed": agg},
                                 "cases": cases})
    # the organisers' sample submission against the official multiref file
    sub = json.load(open(f"{PKG}/sample/baseline_i3d_rgb-i3d_flow.json"))
    mref = json.load(open(f"{PKG}/data/test_set4DSTC7-AVSD_multiref.json"))
    by_img = {}
    for a in mref["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a["caption"])
    shipped, _ = parse(open("/work/scratch14/official_sample.eval").read())
    ours = {}
    for ln in open(f"{PKG}/sample/baseline_i3d_rgb-i3d_flow.eval"):
        m = re.match(r"^(\d+) (\{.*\})$", ln.strip())
        if m:
            ours[int(m.group(1))] = ast.literal_eval(m.group(2))
    assert all(ours[k]["ROUGE_L"] == shipped[k]["ROUGE_L"] for k in shipped) and len(shipped) == 1710
    items = []
    for img, d in zip(mref["images"], sub["dialogs"]):
        vid, turn = img["name"].rsplit("_", 1)
        assert vid == d["image_id"] and int(turn) == len(d["dialog"]) - 1
        items.append({"image_id": vid, "turn": int(turn), "hypothesis": d["dialog"][-1]["answer"],
                      "references": by_img[img["id"]], "rouge_l": shipped[img["id"]]["ROUGE_L"]})
    body = json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    with gzip.GzipFile(OUT / "avsd_sample_submission.json.gz", "wb", mtime=0) as f:
        f.write(body)
    write("avsd_sample_submission.meta.json", {
        "benchmark": "AVSD (DSTC7) — the organisers' sample submission",
        "source": dict(src, how="sample/baseline_i3d_rgb-i3d_flow.json (1,710 dialogs, the DSTC7 baseline's answers) "
                       "against data/test_set4DSTC7-AVSD_multiref.json (6 references each); per-dialog ROUGE_L "
                       "from the package's own sample/baseline_i3d_rgb-i3d_flow.eval, which our run of the "
                       "package reproduced for all 1,710 dialogs"),
        "data_file": "avsd_sample_submission.json.gz",
        "data_sha256": hashlib.sha256(body).hexdigest(),
        "data_licence": "DSTC7 AVSD challenge data (github.com/hudaAlamri/DSTC7-Audio-Visual-Scene-Aware-Dialog-"
                        "AVSD-Challenge, MIT licence); text only: last-turn hypothesis + references per dialog",
        "aggregate": {"rouge_l_mean": float(np.mean([x["rouge_l"] for x in items])), "printed": {"ROUGE_L": 0.481},
                      "n_dialogs": len(items)},
        "source_files_sha256": {n: hashlib.sha256(open(f"{PKG}/{n}", "rb").read()).hexdigest() for n in
                                ("sample/baseline_i3d_rgb-i3d_flow.json", "data/test_set4DSTC7-AVSD_multiref.json",
                                 "data/test_set4DSTC7-AVSD.json")}})


if __name__ == "__main__":
    main()
