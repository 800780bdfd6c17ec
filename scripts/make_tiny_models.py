"""Write every tiny checkpoint named by configs/model/tiny_*.yaml (random weights, fixed seed); skip existing ones.

    python scripts/make_tiny_models.py [--out .cache/models] [--force] [names...]
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from avkv.config import CONFIG_DIR  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(CONFIG_DIR.parent / ".cache" / "models"))
    ap.add_argument("--force", action="store_true")
    ap.add_argument("names", nargs="*", help="config names (default: every configs/model/tiny_*.yaml)")
    a = ap.parse_args()
    from transformers.utils import logging as hf_logging

    from avkv.models.tiny import ensure_tiny
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    for f in sorted((CONFIG_DIR / "model").glob("tiny_*.yaml")):
        if a.names and f.stem not in a.names:
            continue
        t0 = time.perf_counter()
        out, built = ensure_tiny(f, a.out, force=a.force)
        print(f"{f.stem}: " + (f"written to {out} in {time.perf_counter() - t0:.1f}s" if built else f"up to date ({out})"))


if __name__ == "__main__":
    main()
