"""LibriSpeech golden: Qwen2-Audio eval_audio/evaluate_asr.py (remove_sp + compute_wer, run unmodified) and
lmms-eval lmms_eval/tasks/librispeech/utils.py librispeech_wer (imported unmodified; empty package __init__ shims
stand in for lmms_eval's own, which import the whole framework)."""
import re, sys, importlib
from common import OFFICIAL, commit_of, load_function, write

CASES = [  # (reference as LibriSpeech writes it, hypothesis as a model writes it)
    ("MISTER QUILTER IS THE APOSTLE OF THE MIDDLE CLASSES", "Mr. Quilter is the apostle of the middle classes."),
    ("HE HAD TWENTY FIVE POUNDS", "He had 25 pounds."), ("HE HAD TWENTY FIVE POUNDS", "He had £25."),
    ("THREE HUNDRED AND TWELVE STONES", "312 stones"), ("ONE THOUSAND NINE HUNDRED", "1,900"),
    ("IN NINETEEN EIGHTY FOUR", "In 1984"), ("THE FIRST OF MAY", "The 1st of May"),
    ("WE ARE GLAD", "We're glad."), ("I WILL NOT GO", "I won't go."), ("YOU HAD BETTER GO", "You'd better go."),
    ("IT IS NOT", "It isn't"), ("THEY HAVE GONE", "they've gone"), ("HE IS HERE", "He's here."),
    ("CAN NOT", "cannot"), ("O'CLOCK", "o'clock"), ("DOCTOR SMITH", "Dr. Smith"), ("SAINT JOHN", "St. John"),
    ("THE COLOUR GREY", "The color gray"), ("HONOUR AND LABOUR", "honor and labor"),
    ("UM WELL YES", "Um, well, yes."), ("HMM I SEE", "hmm I see"), ("UH HUH", "uh-huh"),
    ("NAÏVE CAFÉ", "naive cafe"), ("HELLO WORLD", "<|en|>Hello world<|endoftext|>"),
    ("HELLO WORLD", "hello   world  !"), ("HELLO WORLD", ""), ("HELLO WORLD", "hello world hello world"),
    ("A B C D", "a x c"), ("SEVEN PERCENT", "7%"), ("TEN DOLLARS", "$10"), ("TEN DOLLARS", "ten dollars"),
    ("HALF PAST TWO", "2:30"), ("THE YEAR TWO THOUSAND", "the year 2000"), ("SECOND", "2nd"),
    ("MISSUS JONES", "Mrs. Jones"), ("HIS WIFE'S HAT", "his wife's hat"), ("WHAT'S THAT", "what is that"),
    ("RE ENTER", "re-enter"), ("WELL KNOWN", "well-known"), ("THE U S A", "the U.S.A."),
    ("NO", "No! No! No!"), ("GOOD MORNING", "Good morning... (laughs)"), ("GOOD MORNING", "[music] good morning"),
    ("THE TWENTIES", "the 1920s"), ("ZERO POINT FIVE", "0.5"), ("TWO POINT FIVE MILLION", "2.5 million"),
    ("OK", "okay"), ("ALRIGHT", "all right"),
]


def qwen_part(pairs_json):
    """Runs under the venv with sacrebleu 1.x (evaluate_tokenizer.py imports sacrebleu.tokenizers.TOKENIZERS)."""
    import json
    qdir = OFFICIAL / "qwen2audio" / "eval_audio"
    sys.path.insert(0, str(qdir))
    from evaluate_tokenizer import EvaluationTokenizer
    from whisper_normalizer.english import EnglishTextNormalizer
    from whisper_normalizer.basic import BasicTextNormalizer
    import editdistance as ed
    ns = {"re": re, "EvaluationTokenizer": EvaluationTokenizer, "ed": ed, "PUNCS": "!,.?;:",
          "english_normalizer": EnglishTextNormalizer(), "basic_normalizer": BasicTextNormalizer(),
          "chinese_normalizer": None, "zhconv": None, "print": lambda *a, **k: None}
    q_remove_sp = load_function(qdir / "evaluate_asr.py", "remove_sp", ns)
    q_wer = load_function(qdir / "evaluate_asr.py", "compute_wer", ns)

    def qwen(refs, hyps):
        try:
            return q_wer([q_remove_sp(r, "en") for r in refs], [q_remove_sp(h, "en") for h in hyps], "en")
        except ZeroDivisionError:
            return "ZeroDivisionError"
    pairs = json.loads(pairs_json)
    out = [qwen([r], [h]) for r, h in pairs] + [qwen([p[0] for p in pairs], [p[1] for p in pairs])]
    print(json.dumps(out))


def main():
    import json, subprocess
    out = subprocess.check_output(["/work/scratch14/venv_q/bin/python", __file__, "--qwen", json.dumps(CASES)],
                                  text=True)
    qwen_vals = json.loads(out.strip().splitlines()[-1])
    sys.path[:0] = ["/work/scratch14/shim", str(OFFICIAL / "lmms")]
    # the shim package comes first; its tasks/ sub-packages are the official folders
    import lmms_eval.tasks
    lmms_eval.tasks.__path__.append(str(OFFICIAL / "lmms" / "lmms_eval" / "tasks"))
    lm = importlib.import_module("lmms_eval.tasks.librispeech.utils")

    def lmms(refs, hyps):
        try:
            return lm.librispeech_wer([{"gt": r, "pred": h, "task": "asr_en"} for r, h in zip(refs, hyps)], {}) / 100
        except ZeroDivisionError:
            return "ZeroDivisionError"

    cases = []
    for k, (r, h) in enumerate(CASES):
        cases.append({"id": k, "ref": r, "hyp": h, "qwen2_audio_wer": qwen_vals[k], "lmms_eval_wer": lmms([r], [h]),
                      "ref_normalized": lm.basic_normalizer(lm.english_normalizer(lm.remove_sp(r, "en"))),
                      "hyp_normalized": lm.basic_normalizer(lm.english_normalizer(lm.remove_sp(h, "en")))})
    refs, hyps = [c[0] for c in CASES], [c[1] for c in CASES]
    write("librispeech_official.json", {
        "benchmark": "LibriSpeech",
        "sources": {
            "qwen2_audio": {"repo": "QwenLM/Qwen2-Audio", "commit": commit_of("QwenLM+Qwen2-Audio"),
                            "path": "eval_audio/evaluate_asr.py", "function": "remove_sp + compute_wer(language='en')",
                            "how": "both functions run unmodified with the module's own normalisers "
                                   "(eval_audio/whisper_normalizer) and evaluate_tokenizer.py; gt and response "
                                   "go through remove_sp first, as the script's main does"},
            "lmms_eval": {"repo": "EvolvingLMMs-Lab/lmms-eval", "commit": commit_of("EvolvingLMMs-Lab+lmms-eval"),
                          "path": "lmms_eval/tasks/librispeech/utils.py", "function": "librispeech_wer (task asr_en)",
                          "how": "imported unmodified; returns percent, stored here as a fraction"}},
        "aggregate": {"qwen2_audio_wer": qwen_vals[-1], "lmms_eval_wer": lmms(refs, hyps)},
        "cases": cases})


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--qwen":
        qwen_part(sys.argv[2])
    else:
        main()
