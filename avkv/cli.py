"""``avkv`` console script: ``avkv run | report | missing | coverage | --version`` (see ``docs/sweeps.md``)."""
from __future__ import annotations

import sys
from typing import Sequence

USAGE = """usage: avkv <command> [args]   (avkv <command> --help for its options)

commands:
  run       one experiment, or a sweep with -m (Hydra overrides): avkv run method=snapkv budget=0.2
  report    collect run directories into parquet/CSV, tables (Markdown, LaTeX) and plots: avkv report runs/
  missing   the grid points of a sweep that are missing or incomplete, and the command resubmitting them
  coverage  which of the papers' published numbers the configs can reproduce

  --version  the avkv version (and torch, transformers)
"""
COMMANDS = ("run", "report", "missing", "coverage")


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as _v

    def v(name: str) -> str:
        try:
            return _v(name)
        except PackageNotFoundError:
            return "not installed"
    from avkv import __version__
    return f"avkv {__version__} (torch {v('torch')}, transformers {v('transformers')}, python {sys.version.split()[0]})"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        print(version())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        from avkv import app

        return app.main(rest, prog="avkv run")
    if cmd == "report":
        from avkv import report

        return report.main(rest)
    if cmd == "missing":
        from avkv import grid

        return grid.main(rest)
    if cmd == "coverage":
        from avkv import coverage

        return coverage.main(rest)
    from avkv.config import close_match
    near = close_match(cmd, COMMANDS)
    print(f"avkv: unknown command {cmd!r}" + (f" (did you mean {near!r}?)" if near else "") + f"\n\n{USAGE}",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
