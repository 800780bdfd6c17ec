"""MUSIC-AVQA golden: VideoLLaMA2 (audio_visual) eval_audio_video_AVQA.py main(), run unmodified on a pred file
of our cases (one case per file for the per-case verdict, all cases in one file for the aggregate)."""
import contextlib, io, re, tempfile, argparse, importlib.util
from common import OFFICIAL, commit_of, write

CASES = [  # (pred, answer)
    ("yes", "yes"), ("Yes", "yes"), ("Yes.", "yes"), ("yes .", "yes"), ("YES", "yes"), (" yes", "yes"),
    ("yes!", "yes"), ("Yes, it is.", "yes"), ("no", "yes"), ("", "yes"), (".", "yes"), ("yes..", "yes"),
    ("yes. ", "yes"), ("yes\n", "yes"), ("two", "two"), ("2", "two"), ("Two.", "two"), ("two ", "two"),
    ("There are two.", "two"), ("zero", "zero"), ("0", "zero"), ("ten", "ten"), ("left", "left"),
    ("Left.", "left"), ("the left", "left"), ("right", "left"), ("middle", "middle"), ("piano", "piano"),
    ("Piano.", "piano"), ("the piano", "piano"), ("pianos", "piano"), ("acoustic_guitar", "acoustic_guitar"),
    ("acoustic guitar", "acoustic_guitar"), ("Acoustic_Guitar .", "acoustic_guitar"), ("cello", "Cello"),
    ("ÉCOLE", "école"), ("straße", "STRASSE"), ("ﬁve", "five"), ("violin.", "violin"), ("violin,", "violin"),
    ("flute . .", "flute"), ("accordion", "accordion"), ("bagpipe", "bagpipe"), ("more than one", "yes"),
]


def main():
    path = OFFICIAL / "vl2" / "eval_audio_video_AVQA.py"
    spec = importlib.util.spec_from_file_location("vl2_avqa", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def run(items):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            for k, (p, a) in enumerate(items):
                f.write(repr({"id": k, "question": "q", "answer": a, "pred": p}) + "\n")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            mod.main(argparse.Namespace(pred_path=f.name))
        m = re.search(r"Overall Accuracy: ([0-9.]+)%", out.getvalue())
        return float(m.group(1)) / 100, out.getvalue().strip()

    cases = []
    for k, (p, a) in enumerate(CASES):
        acc, _ = run([(p, a)])
        cases.append({"id": k, "pred": p, "answer": a, "correct": acc == 1.0})
    acc, printed = run(CASES)
    write("music_avqa_official.json", {
        "benchmark": "MUSIC-AVQA (VideoLLaMA2 AVQA_music)",
        "source": {"repo": "DAMO-NLP-SG/VideoLLaMA2", "branch": "audio_visual",
                   "commit": commit_of("DAMO-NLP-SG+VideoLLaMA2", "audio_visual"),
                   "path": "videollama2/eval/eval_audio_video_AVQA.py", "function": "main",
                   "how": "main() run unmodified on a pred file of {id, question, answer, pred} lines; per case one "
                          "file each (Overall Accuracy 100% or 0%), the aggregate from one file of all cases"},
        "aggregate": {"accuracy_printed": printed, "accuracy": sum(c["correct"] for c in cases) / len(cases)},
        "cases": cases})


if __name__ == "__main__":
    main()
