"""MileBench golden: evaluate.py Eval of the initial (730e930) and the current (b2979ac) commit, run unmodified on
the same cases (multi-choice incl. a 30-option GPR1200-like set, open-ended ROUGE-L, needle, MMCoQA substring)."""
import contextlib, copy, importlib.util, io, sys
from common import OFFICIAL, commit_of, write

C4 = ["red square", "green circle", "blue triangle", "yellow star"]
GPR = [f"picture {i + 1}" for i in range(30)]
MC = [  # (pred, choices, gold, n_images, stored level)
    ("A", C4, "red square", 2, "Few"), ("B", C4, "green circle", 3, "Few"), ("b", C4, "green circle", 3, "Few"),
    ("(B)", C4, "green circle", 6, "Few"), ("B.", C4, "green circle", 6, "Medium"),
    ("B. green circle", C4, "green circle", 6, "Medium"), ("green circle", C4, "green circle", 40, "Many"),
    ("The answer is green circle.", C4, "green circle", 31, "Medium"), ("the answer is b", C4, "green circle", 5, "Few"),
    ("This is a red square", C4, "green circle", 5, "Few"), ("a red square", C4, "red square", 5, "Few"),
    ("", C4, "blue triangle", 32, "Many"), ("", C4, "red square", 32, "Many"), ("   ", C4, "blue triangle", 2, "Few"),
    ("C", C4, "blue triangle", 2, "Few"), ("D) yellow star", C4, "yellow star", 2, "Few"),
    ("AB", C4, "red square", 2, "Few"), ("BA", C4, "green circle", 2, "Few"), ("AD", C4, "red square", 2, "Few"),
    ("E", C4, "red square", 2, "Few"), ("xyz", C4, "red square", 2, "Few"), ("Option D", C4, "yellow star", 2, "Few"),
    ("bluetriangle", C4, "blue triangle", 2, "Few"), ("BLUE TRIANGLE!", C4, "blue triangle", 2, "Few"),
    ("答案是 C", C4, "blue triangle", 2, "Few"), ("Ｃ", C4, "blue triangle", 2, "Few"),
    ("A.\nB.", C4, "red square", 2, "Few"), ("(A) or (B)", C4, "red square", 2, "Few"),
    ("yellow-star", C4, "yellow star", 2, "Few"), ("d", C4, "yellow star", 2, "Few"),
    # GPR1200: 30 options, past Z the keys are [ \ ] ^ _ ` (initial) or AA..AD (current)
    ("picture 28", GPR, "picture 28", 6, "Medium"), ("AB", GPR, "picture 28", 6, "Medium"),
    ("ab", GPR, "picture 28", 6, "Medium"), ("AA", GPR, "picture 27", 6, "Medium"),
    ("AD", GPR, "picture 30", 6, "Medium"), ("picture 3", GPR, "picture 3", 6, "Medium"),
    ("C", GPR, "picture 3", 6, "Medium"), ("Z", GPR, "picture 26", 6, "Medium"),
    ("picture 30", GPR, "picture 30", 6, "Medium"), ("[", GPR, "picture 27", 6, "Medium"),
    ("AB picture 28", GPR, "picture 28", 6, "Medium"), ("The answer is picture 12", GPR, "picture 12", 6, "Medium"),
    ("", GPR, "picture 3", 6, "Medium"), ("picture 2", GPR, "picture 2", 6, "Medium"),
]
OPEN = [  # (pred, gold, n_images, stored level)
    ("the cat sat on the mat", "the cat is on the mat", 2, "Few"), ("", "a man walks", 2, "Few"),
    ("   ", "a man walks", 2, "Few"), ("A man walks.", "a man walks", 8, "Medium"),
    ("the the the cat", "the cat", 8, "Medium"), ("x 3.5 y", "x 3 y", 8, "Medium"),
    ("The car moved. Then it stopped.", "the car moved and then stopped", 40, "Many"),
    ("nothing in common", "a man walks", 40, "Many"), ("Café naïve über", "cafe naive uber", 3, "Few"),
    ("it's 1,000 dollars; (maybe)", "it is 1000 dollars", 3, "Few"), ("A-B-C", "a b c", 3, "Few"),
    ("one. two. three.", "one two three", 3, "Few"),
]
NEEDLE = [  # (pred, gold, n_images, stored level) — TextNeedleInAHaystack: whole-token match
    ("The password is 7421.", "7421", 8, "Medium"), ("password:7421", "7421", 8, "Medium"),
    ("74210", "7421", 8, "Medium"), ("", "7421", 8, "Medium"), ("the code is ABC-123", "abc-123", 40, "Many"),
    ("the code is abc 123", "abc-123", 40, "Many"), ("It is \"apple\".", "apple", 2, "Few"),
    ("apple", "Apple", 2, "Few"),
]
SUBSTR = [  # MMCoQA: substring match
    ("the year was 1999 I think", "1999", 2, "Few"), ("19999", "1999", 2, "Few"), ("", "1999", 2, "Few"),
    ("Barack Obama", "obama", 40, "Many"), ("Obama, Barack", "barack obama", 40, "Many"),
]


def load(version_dir):
    spec = importlib.util.spec_from_file_location(f"mb_{version_dir}", OFFICIAL / version_dir / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def core(items, mc):
    data = []
    for i, it in enumerate(items):
        inst = {"context": "", "images_path": [f"{i}_{k}.jpg" for k in range(it["n_images"])]}
        if mc:
            inst["choice_list"] = list(it["choices"])
        data.append({"sample_id": i, "task_instance": inst, "response": it["gold"],
                     "image_quantity_level": it["level"]})
    return {"meta_data": {}, "data": data}


def run(mod, kind, items):
    ev = mod.Eval()
    preds = [{"sample_id": i, "gt_response": it["gold"], "pred_response": it["pred"]} for i, it in enumerate(items)]
    cj = core(items, kind == "mc")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if kind == "mc":
            r = ev.evaluate_multichoice(copy.deepcopy(preds), cj)
            if len(r) == 3:
                samples, res, lst = r
                extracted = [s.get("extracted") for s in samples]
            else:
                res, lst = r
                extracted = [None] * len(items)
        elif kind == "open":
            res, lst = ev.evaluate_rouge(copy.deepcopy(preds), cj)
            extracted = [None] * len(items)
        else:
            res, lst = ev.evaluate_needle(copy.deepcopy(preds), cj, needle=(kind == "needle"))
            extracted = [None] * len(items)
    # per-case score to full precision (eval_score.json rounds ROUGE to 3 decimals): recompute the same way
    if kind == "open":
        from rouge import Rouge
        scores = []
        for it in items:
            g, p = ev.process(it["gold"]), ev.process(it["pred"])
            scores.append(0 if p == "" else Rouge().get_scores(p, g)[0]["rouge-l"]["f"])
    else:
        scores = [float(x["score"]) for x in lst]
    if kind == "mc" and extracted[0] is None:          # the initial version does not return the pick: recompute
        extracted = []
        for it in items:
            s = {"gt_response": it["gold"], "pred_response": it["pred"], "choice_list": list(it["choices"])}
            ev.process_sample(s)
            opt = {chr(65 + i): c for i, c in enumerate(s["choice_list"])}
            extracted.append(ev.match_choice(s["pred_response"], opt))
    res = {k: (float(v) if not isinstance(v, dict) else {kk: (vv if isinstance(vv, list) else float(vv))
                                                            for kk, vv in v.items()}) for k, v in res.items()}
    res = {k: ({kk: [float(x) for x in vv] if isinstance(vv, list) else vv for kk, vv in v.items()}
               if isinstance(v, dict) else v) for k, v in res.items()}
    return res, scores, extracted, [x["score"] for x in lst]


def main():
    groups = {
        "mc": [dict(pred=p, choices=c, gold=g, n_images=n, level=l) for p, c, g, n, l in MC],
        "open": [dict(pred=p, gold=g, n_images=n, level=l) for p, g, n, l in OPEN],
        "needle": [dict(pred=p, gold=g, n_images=n, level=l) for p, g, n, l in NEEDLE],
        "substring": [dict(pred=p, gold=g, n_images=n, level=l) for p, g, n, l in SUBSTR],
    }
    versions = {"initial": ("milebench_730e930", "730e930"), "current": ("milebench_b2979ac", "b2979ac")}
    payload = {"benchmark": "MileBench", "sources": {}, "groups": {}}
    for vname, (vdir, rev) in versions.items():
        payload["sources"][vname] = {"repo": "MileBench/MileBench", "commit": commit_of("MileBench+MileBench", rev),
                                     "path": "evaluate.py", "class": "Eval"}
    payload["sources"]["how"] = (
        "Each group is one dataset: predictions [{sample_id, gt_response, pred_response}] and a core json with "
        "task_instance.images_path (n_images entries) and image_quantity_level (the stored level), passed to "
        "Eval.evaluate_multichoice / evaluate_rouge / evaluate_needle(needle=True|False) of each commit, "
        "unmodified, with rouge==1.0.1. 'eval_score' is the per-case score as written to eval_score.json "
        "(ROUGE rounded to 3 places there), 'score' the same score at full precision, 'extracted' the "
        "match_choice pick (the initial commit does not store it: match_choice of that commit called the way "
        "judge_multi_choice calls it), 'result' the returned eval.json dict.")
    for kind, items in groups.items():
        g = {"kind": kind, "cases": items, "official": {}}
        for vname, (vdir, _) in versions.items():
            res, scores, extracted, raw = run(load(vdir), kind, items)
            g["official"][vname] = {"result": res, "score": scores, "extracted": extracted, "eval_score": raw}
        payload["groups"][kind] = g
    payload["cases"] = [c for g in groups.values() for c in g]
    write("milebench_official.json", payload)


if __name__ == "__main__":
    main()
