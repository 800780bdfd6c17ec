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


def exit_now(rc: int | None) -> None:
    """End a command-line process that has finished its work, without the interpreter's teardown of every module
    (seconds once torch and transformers are loaded: 2.5–6 s measured on a loaded 2-core machine, more than a
    run's whole harness share). Output is flushed, logging shut down and the ``atexit`` handlers run first (W&B,
    submitit); with a non-daemon thread still running it exits the ordinary way, which waits for it."""
    import threading
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(rc)
    import atexit
    import logging
    import os
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc if isinstance(rc, int) else 0 if rc is None else 1)


def console() -> None:
    """The ``avkv`` console script: :func:`main`, then :func:`exit_now`."""
    exit_now(main())


if __name__ == "__main__":
    exit_now(main())
