"""Timing and memory measurement shared by the CLI and the benchmarks."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mib: float | None  # peak allocated memory during one call (CUDA only)


def measure(fn, device: torch.device, *, warmup: int = 3, reps: int = 10, min_time_s: float = 0.0) -> Timing:
    """Median and 20/80% quantiles of ``fn()``'s wall time, with CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    times = []
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    deadline = time.perf_counter() + min_time_s
    while len(times) < reps or time.perf_counter() < deadline:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 10 * reps:
            break
    peak = None
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return Timing(statistics.median(times), q[1], q[7], peak)


def held_mib(fn, exclude=(), *, count_outputs: bool = False) -> float:
    """MiB that one call of ``fn()`` keeps alive for its backward: the tensors autograd saves (and, with
    ``count_outputs``, the tensors ``fn`` returns), counted once per storage, the storages of ``exclude`` (say, the
    parameters) left out. Works on any device; on a CPU, which keeps no allocator statistics, it is the memory
    measure of the demo and the benchmarks."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    held = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            held[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
        if count_outputs:
            for t in out:
                pack(t)
    return sum(held.values()) / 2**20
