"""Measuring: wall time and peak memory of a block of work, and the device's own rates.

On CUDA the peak is the allocator's peak of device memory. On CPU it is the process's
resident set size, sampled every few milliseconds by a background thread while the block
runs (the kernel's own high-water mark never resets, so it cannot be scoped to a block).
`matmul_tflops` and `copy_bandwidth` measure what the device can do, so that a measured speed
can be put against its floor in the same run.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable


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


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], device: str, warmup: int, repeats: int,
               before: Callable[[], object] | None = None) -> list[float]:
    """Seconds of each of `repeats` calls of `fn` after `warmup` untimed ones; CUDA events
    on a GPU (device work is asynchronous), a host clock on CPU. `before` runs untimed
    ahead of every call."""
    import torch

    on_gpu = device.startswith("cuda")
    for _ in range(warmup):
        if before:
            before()
        fn()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        if before:
            before()
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - started)
    return seconds


def matmul_tflops(device: str, size: int, repeats: int = 10, dtype: str = "bfloat16") -> float:
    """Matrix-product rate (TFLOP/s) in `dtype` on random data (zeros run faster than real data)."""
    import torch

    from qrobust.tasks.runtime.environment import torch_dtype

    a, b = (torch.randn(size, size, device=device, dtype=torch_dtype(dtype)) for _ in range(2))
    out = torch.empty_like(a)
    seconds = statistics.median(time_calls(lambda: torch.mm(a, b, out=out), device, warmup=3, repeats=repeats))
    return 2 * size**3 / seconds / 1e12


def copy_bandwidth(device: str, nbytes: int, repeats: int = 10) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    import torch

    source = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = statistics.median(time_calls(lambda: target.copy_(source), device, warmup=3, repeats=repeats))
    return 2 * nbytes / seconds
