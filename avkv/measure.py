"""Measurement of one sample: wall-clock sections (:class:`Clock`) and peak memory (:class:`MemoryTracker`); the
one reader of the host clock in avkv (:func:`wall`, :class:`Stopwatch`, :func:`epoch`: harness timings, the
adapters' ``media_s``, deadlines; ``tests/test_layers.py`` fails on any other module reading ``time.perf_counter``,
``time.monotonic`` or ``time.time``).

On GPU the peak is CUDA's ``max_memory_allocated`` (summed over every GPU holding layers); on CPU it is the
process's peak resident memory, which includes weights, activations and allocator slack, not only the KV cache.
"""
from __future__ import annotations

import sys
import time


def wall() -> float:
    """Seconds on the host's monotonic high-resolution clock (``perf_counter``); only differences mean anything."""
    return time.perf_counter()


def epoch() -> float:
    """Seconds since the Unix epoch (a timestamp to write down, never to time with)."""
    return time.time()


class Stopwatch:
    """Host wall time since it started: ``sw = Stopwatch()`` starts it, ``sw.s`` reads the seconds so far; as a
    context manager it restarts on entry and ``sw.s`` stays at the section's length after exit."""

    __slots__ = ("t0", "_end")

    def __init__(self):
        self.t0, self._end = wall(), None

    @property
    def s(self) -> float:
        return (wall() if self._end is None else self._end) - self.t0

    def __enter__(self) -> "Stopwatch":
        self.t0, self._end = wall(), None
        return self

    def __exit__(self, *exc) -> bool:
        self._end = wall()
        return False


class PeakRSS:
    """Peak resident memory of this process over a section (bytes), with no sampler thread competing with the
    timed work: RSS is read when the section starts and ends and at each :meth:`mark` (phase boundaries, between
    clock sections), and the kernel's high-water mark ``ru_maxrss`` is read at both ends — if it rose during the
    section, that peak was reached inside it and is the value. Otherwise the section's peak stayed below an earlier
    one and the largest boundary reading is reported (a lower bound of the true peak).

    It includes weights, activations and allocator slack, not only the KV cache: it is the process peak.
    """

    def __init__(self):
        import psutil
        self.proc, self.peak = psutil.Process(), 0
        self._hwm0 = 0

    def __enter__(self):
        self._hwm0 = _high_water()
        self.peak = self.proc.memory_info().rss
        return self

    def mark(self) -> None:
        self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.mark()
        hwm = _high_water()
        if hwm > self._hwm0:
            self.peak = max(self.peak, hwm)


def _high_water() -> int:
    """The process's peak RSS so far (bytes; 0 where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return 0
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


class Clock:
    """Wall-clock sections: CUDA events on one GPU, perf_counter on CPU; with layers on several GPUs
    (``model.device_map``) every one of them is synchronized and perf_counter read, since one device's events do
    not see the others' work."""

    def __init__(self, device: torch.device, devices: list | None = None):
        import torch
        gpus = {torch.device(d) for d in (devices or [device]) if torch.device(d).type == "cuda"}
        self.sync = sorted(gpus, key=str) if len(gpus) > 1 else []
        self.cuda = device.type == "cuda" and not self.sync

    def now(self):
        import torch
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        for d in self.sync:
            torch.cuda.synchronize(d)
        return wall()

    def elapsed(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1000.0
        return b - a


class MemoryTracker:
    """Peak memory over a sample: CUDA ``max_memory_allocated`` on GPU (summed over every GPU holding layers, each in
    ``by_device``), process peak RSS on CPU."""

    def __init__(self, device: torch.device, devices: list | None = None):
        import torch
        self.device, self.peak, self.by_device = device, 0, {}
        self.gpus = sorted({torch.device(d) for d in (devices or [device]) if torch.device(d).type == "cuda"}, key=str)
        if device.type == "cuda" and device not in self.gpus:
            self.gpus.append(device)
        self.kind = ("cuda_max_allocated" if len(self.gpus) <= 1 else "cuda_max_allocated_sum") if self.gpus \
            else "cpu_process_peak_rss"

    def __enter__(self):
        if self.gpus:
            import torch
            for d in self.gpus:
                torch.cuda.synchronize(d)
                torch.cuda.reset_peak_memory_stats(d)
        else:
            self._rss = PeakRSS().__enter__()
        return self

    def mark(self) -> None:
        """A phase boundary (outside the clock's sections): the CPU probe reads the process memory here."""
        if not self.gpus:
            self._rss.mark()

    def __exit__(self, *exc):
        if self.gpus:
            import torch
            for d in self.gpus:
                torch.cuda.synchronize(d)
                self.by_device[str(d)] = int(torch.cuda.max_memory_allocated(d))
            self.peak = sum(self.by_device.values())
        else:
            self._rss.__exit__(*exc)
            self.peak = int(self._rss.peak)
            self.by_device = {"cpu": self.peak}
        return False


__all__ = ["Clock", "MemoryTracker", "PeakRSS", "Stopwatch", "epoch", "wall"]
