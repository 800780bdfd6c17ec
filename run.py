"""avkv entry point in a clone: ``python run.py method=snapkv budget=0.2`` (same as ``avkv run ...``; ``-m`` for
sweeps). The application lives in :mod:`avkv.app`."""
import sys

from avkv.app import main

if __name__ == "__main__":
    sys.exit(main(prog="run.py"))
