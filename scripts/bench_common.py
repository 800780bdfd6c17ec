"""What the batch benches share (``scripts/bench_batched_prefill.py``, ``scripts/bench_capacity.py``): the options
of the model they build and of their output, the model itself (``bench_overhead.BenchAdapter``: a Qwen2 text
decoder with random weights and Qwen2.5-0.5B or -7B per-layer shapes), and the environment their results record.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from bench_overhead import SHAPES, BenchAdapter


def parser(doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model_options(ap: argparse.ArgumentParser, length: int) -> None:
    """``--device``, ``--shape``, ``--layers``, ``--length`` (the prompt's tokens, default ``length``)."""
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--length", type=int, default=length)


def add_output_options(ap: argparse.ArgumentParser, out) -> None:
    """``--dtype`` (default by device) and ``--out`` (default ``out``)."""
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--out", default=str(out))


def on_cuda(a: argparse.Namespace) -> bool:
    return a.device.startswith("cuda")


def build_adapter(a: argparse.Namespace) -> tuple[BenchAdapter, str]:
    """The bench model of the options and its dtype; on CPU one intra-op thread (the figures are per thread)."""
    cuda = on_cuda(a)
    if not cuda:
        torch.set_num_threads(1)
    dtype = a.dtype or ("bfloat16" if cuda else "float32")
    return BenchAdapter(a.layers, a.device, dtype, "sdpa", a.shape), dtype


def environment(cuda: bool) -> dict:
    """What a result records of where it ran: threads, torch, platform, GPU, date."""
    return {"threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
