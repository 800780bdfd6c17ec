#!/usr/bin/env python
"""Print how many of the papers' published numbers avkv can run, per paper table, and what blocks the rest
(``avkv/coverage.py``): ``python scripts/coverage.py``."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avkv.coverage import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
