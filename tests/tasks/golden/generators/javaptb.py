"""Tokenise lines the way coco-caption's PTBTokenizer wrapper does (same jar, same flags, same punctuation list)."""
import os, subprocess, tempfile
JAR = "/work/scratch14/run_dstc7/utils/coco-caption/pycocoevalcap/tokenizer/stanford-corenlp-3.4.1.jar"
PUNCT = ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]


def tokenize(lines):
    data = "\n".join(l.replace("\n", " ") for l in lines).encode("utf-8")
    with tempfile.NamedTemporaryFile(delete=False, dir="/tmp") as f:
        f.write(data)
    out = subprocess.run(["java", "-cp", JAR, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                          "-lowerCase", f.name], capture_output=True).stdout.decode("utf-8")
    os.remove(f.name)
    res = out.split("\n")
    return [" ".join(w for w in l.rstrip().split(" ") if w not in PUNCT) for l in res[:len(lines)]], len(res)
