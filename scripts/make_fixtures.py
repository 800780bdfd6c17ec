#!/usr/bin/env python
"""Write the dataset fixtures in their official layouts: ``python scripts/make_fixtures.py --out .cache/fixtures``.

Deterministic and fast (seconds); each dataset is skipped when already present and complete (``--force`` rebuilds).
Ground-truth content facts go to ``<out>/_fixture/facts.json``, outside every layout.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avkv.tasks import fixtures  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder receiving <dataset>/ layouts and _fixture/")
    ap.add_argument("--only", nargs="*", help=f"datasets to build (default all: {' '.join(fixtures.GENERATORS)})")
    ap.add_argument("--force", action="store_true", help="rebuild even when complete")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    done = fixtures.build(a.out, only=a.only, force=a.force)
    built = [k for k, v in done.items() if v is True]
    kept = [k for k, v in done.items() if v is False]
    print(f"fixtures in {a.out}: built {built or '-'}; already complete {kept or '-'} "
          f"({time.perf_counter() - t0:.2f}s)")
    for k, v in done.items():
        if isinstance(v, str):
            print(f"  skipped {k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
