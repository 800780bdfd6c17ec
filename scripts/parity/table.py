"""Print the kvpress parity table from the last `pytest tests/parity` run (``.cache/parity/<key>/avkv/*.json``).

    .venv/bin/python scripts/parity/table.py
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    dirs = sorted((ROOT / ".cache" / "parity").glob("*/avkv"), key=lambda d: d.stat().st_mtime)
    if not dirs:
        sys.exit("no parity results: run `.venv/bin/python -m pytest tests/parity` first")
    print("| case | ratio | compare | heads equal / compared (tied) | max logit diff | argmax |")
    print("|---|---|---|---|---|---|")
    for f in sorted(dirs[-1].glob("*.json")):
        case, ratio = f.stem.rsplit("__", 1)
        r = json.loads(f.read_text())
        if case == "full":
            print(f"| full cache (both venvs) | — | — | — | {r['max_logit_diff']:.1e} | — |")
            continue
        print(f"| {case} | {ratio} | {r.get('compare', 'must differ')} | {r['heads_equal']}/{r['heads_compared']} "
              f"({r['heads_tied']}) | {r['max_logit_diff']:.1e} | {'same' if r['argmax_equal'] else 'differs'} |")


if __name__ == "__main__":
    main()
