#!/usr/bin/env python
"""Write the long-form LibriSpeech segments ahead of a run (the loader does the same on first use).

    python scripts/prepare_librispeech.py --root /data/LibriSpeech --split test-clean test-other \
        [--min-s 60 --max-s 120] [--long-dir /data/LibriSpeech-long]

Each chapter's utterances are concatenated, in order, into min_s..max_s second FLACs with the joined transcript
(the LibriSpeech-long regime of AudioKV); existing segments with the same parts are kept.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avkv.tasks.librispeech import LibriSpeech  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="the LibriSpeech folder (holding test-clean/ ...)")
    ap.add_argument("--split", nargs="+", default=["test-clean"])
    ap.add_argument("--min-s", type=float, default=60.0)
    ap.add_argument("--max-s", type=float, default=120.0)
    ap.add_argument("--long-dir", default=None, help="default: <root>/../LibriSpeech-long")
    a = ap.parse_args(argv)
    t = LibriSpeech(a.root, split=a.split, long_form=True, min_s=a.min_s, max_s=a.max_s, long_dir=a.long_dir)
    n = broken = 0
    for d in t.docs():
        n += 1
        broken += d.meta["seconds"] is None
    print(f"{n} long-form segments in {[str(t.long_folder(s)) for s in t.splits]}"
          + (f"; {broken} with an unreadable part (they will fail at decode)" if broken else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
