"""MVBench golden: VideoLLaMA2 (branch audio_visual) mvbench_dump, and lmms-eval's mvbench mcq_acc beside
avkv's clean extractor. Run with the side venv; no torch needed."""
import contextlib, io, re, sys, traceback
from common import OFFICIAL, commit_of, load_function, write

C4 = ["red", "green", "blue", "yellow"]
C3 = ["the man opens the door", "the man closes the door", "nothing happens"]
C5 = ["1", "2", "3", "4", "5"]
C2 = ["Yes", "No"]
CASES = [
    # (output, candidates, gt index)
    ("B", C4, 1), ("(B)", C4, 1), ("(B) green", C4, 1), ("B. green", C4, 1), ("B) green", C4, 1),
    ("b", C4, 1), ("Answer: B", C4, 1), ("answer: (C)", C4, 2), ("The answer is D.", C4, 3),
    ("Answer: D", C4, 3), ("Best option: (A)", C4, 0), ("Best option:(C) blue", C4, 2),
    ("Based on the video, (A)", C4, 0), ("Based on the video the answer is (A)", C4, 0),
    ("green", C4, 1), ("It is yellow.", C4, 3), ("The square is blue", C4, 2), ("i think blue", C4, 2),
    ("red or blue", C4, 0), ("none of these", C4, 0), ("", C4, 2), ("   ", C4, 1), ("\n", C4, 0),
    ("(E)", C4, 0), ("E", C4, 1), ("A, B", C4, 1), ("B, A", C4, 1), ("A and B", C4, 0), ("AB", C4, 0),
    ("(D", C4, 3), ("D)", C4, 3), ("[C]", C4, 2), ("{B}", C4, 1), ("B,", C4, 1), (" ,C, ", C4, 2),
    ("Option C", C4, 2), ("答案是 B", C4, 1), ("答案：蓝色", C4, 2), ("ｂ", C4, 1), ("Ｂ", C4, 1),
    ("the man closes the door", C3, 1), ("The man closes the door.", C3, 1), ("the man opens the door", C3, 0),
    ("nothing happens here", C3, 2), ("He closes it", C3, 1), ("(C) nothing happens", C3, 2),
    ("3", C5, 2), ("There are 3 people", C5, 2), ("three", C5, 2), ("(B) 2", C5, 1), ("1 2 3", C5, 0),
    ("Yes", C2, 0), ("no", C2, 1), ("No.", C2, 1), ("yes", C2, 0), ("I don't know", C2, 1),
    ("Answer", C4, 0), ("answer", C4, 1), ("ANSWER: B", C4, 1), ("The answer is: A", C4, 0),
    ("Both are wrong", C2, 0), ("C.", C2, 1), ("c", C2, 1),
]


def main():
    path = OFFICIAL / "vl2" / "inference_video_mcqa_mvbench.py"
    dump = load_function(path, "mvbench_dump", {"re": re, "traceback": traceback})
    # lmms-eval mvbench utils: mcq_acc only needs re (the module imports datasets/decord helpers)
    lmms_path = OFFICIAL / "lmms" / "lmms_eval" / "tasks" / "mvbench" / "utils.py"
    mcq_acc = load_function(lmms_path, "mcq_acc", {"re": re})
    cases = []
    for k, (out, cands, gt) in enumerate(CASES):
        letters = tuple(chr(ord("A") + i) for i in range(len(cands)))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            pred_idx = dump("vid", "instruct", letters, tuple(cands), out)
        gt_letter = letters[gt]
        lm = mcq_acc(gt_letter, out)
        cases.append({"id": k, "output": out, "candidates": cands, "answer_idx": gt,
                      "videollama2": {"pred_idx": pred_idx, "fallback": bool(err.getvalue()),
                                      "correct": pred_idx == gt},
                      "lmms_eval": {"score": lm}})
    n = len(cases)
    write("mvbench_official.json", {
        "benchmark": "MVBench",
        "sources": {
            "videollama2": {"repo": "DAMO-NLP-SG/VideoLLaMA2", "branch": "audio_visual",
                            "commit": commit_of("DAMO-NLP-SG+VideoLLaMA2", "audio_visual"),
                            "path": "videollama2/eval/inference_video_mcqa_mvbench.py", "function": "mvbench_dump",
                            "how": "the function run unmodified with letters = ('A', 'B', ...) and options = the "
                                   "candidates, as run_inference passes them; 'fallback' = it printed its "
                                   "traceback and returned 2"},
            "lmms_eval": {"repo": "EvolvingLMMs-Lab/lmms-eval", "commit": commit_of("EvolvingLMMs-Lab+lmms-eval"),
                          "path": "lmms_eval/tasks/mvbench/utils.py", "function": "mcq_acc(gt_letter, pred)",
                          "how": "run unmodified; shown beside avkv's clean extractor (which is avkv's own rule, "
                                 "not an official script)"}},
        "aggregate": {"videollama2_accuracy": sum(c["videollama2"]["correct"] for c in cases) / n,
                      "videollama2_n_fallback": sum(c["videollama2"]["fallback"] for c in cases)},
        "cases": cases})


if __name__ == "__main__":
    main()
