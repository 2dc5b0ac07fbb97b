"""Wall time and peak memory of a block of generation work.

On CUDA the peak is the allocator's peak of device memory. On CPU it is the process's
resident set size, sampled every few milliseconds by a background thread while the block
runs (the kernel's own high-water mark never resets, so it cannot be scoped to a block).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_bytes: int = 0


@contextlib.contextmanager
def measure(device: str, sample_every_s: float = 0.005):
    result = Measurement()
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        yield result
        torch.cuda.synchronize()
        result.seconds = time.perf_counter() - started
        result.peak_bytes = int(torch.cuda.max_memory_allocated())
        return
    import psutil

    process = psutil.Process()
    stop = threading.Event()
    peak = [process.memory_info().rss]

    def sample() -> None:
        while not stop.wait(sample_every_s):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        yield result
    finally:
        result.seconds = time.perf_counter() - started
        stop.set()
        sampler.join()
        result.peak_bytes = max(peak[0], process.memory_info().rss)
