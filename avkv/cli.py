"""``avkv`` console script: ``avkv report ...`` and ``avkv missing ...`` (see ``docs/sweeps.md``)."""
from __future__ import annotations

import sys
from typing import Sequence

USAGE = """usage: avkv <command> [args]

commands:
  report   collect run directories into parquet/CSV, tables (Markdown, LaTeX) and plots
  missing  list the grid points of a sweep that are missing or incomplete, and the command resubmitting them
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "report":
        from avkv import report

        return report.main(rest)
    if cmd == "missing":
        from avkv import grid

        return grid.main(rest)
    print(f"avkv: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
