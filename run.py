"""avkv entry point in a clone: ``python run.py method=snapkv budget=0.2`` (same as ``avkv run ...``; ``-m`` for
sweeps). The application lives in :mod:`avkv.app`."""
from avkv.app import main
from avkv.cli import exit_now

if __name__ == "__main__":
    exit_now(main(prog="run.py"))
