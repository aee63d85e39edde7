"""Timing and memory measurement shared by the CLI, the demo and the benchmarks.

A single median hides how much a shared or loaded machine moved under it. Here every number comes with its spread
(the 20% and 80% quantiles), and paths that are compared are timed in turn, round after round (A B, then B A, ...),
so that a change of load hits both alike. Their ratio is taken round by round, and the rounds go on until the
spread of every ratio is small or a time cap is reached; a ratio whose spread is still wide then says so
(:func:`Ratio.warning`) instead of being printed as if it could be read.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# Stop timing when every ratio's p20-p80 range is within this fraction of its median...
TARGET_SPREAD = 0.10
# ...and warn, when the rounds end, about a ratio whose range is wider than this.
WARN_SPREAD = 0.20
# The time cap may end the rounds before min_rounds, but not before this many (slow calls on a loaded machine).
ROUNDS_AT_CAP = 3


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, 20% quantile, 80% quantile) of samples (inclusive quantiles, so that 3 to 5 samples stay inside
    their own range)."""
    if not samples:
        raise ValueError("quantiles: no samples")
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), q[1], q[7]


def relative_spread(median: float, p20: float, p80: float) -> float:
    """Width of the p20-p80 range as a fraction of the median (inf for a zero median)."""
    return (p80 - p20) / median if median > 0 else float("inf")


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mib: float | None  # peak allocated memory during one call (CUDA only)
    n: int = 0  # timed calls

    @classmethod
    def of(cls, times_ms: list[float], peak_mib: float | None = None) -> Timing:
        return cls(*quantiles(times_ms), peak_mib, len(times_ms))

    @property
    def spread(self) -> float:
        return relative_spread(self.median_ms, self.p20_ms, self.p80_ms)

    def text(self, digits: int = 1) -> str:
        """``median (p20-p80)`` in ms."""
        return f"{self.median_ms:.{digits}f} ({self.p20_ms:.{digits}f}-{self.p80_ms:.{digits}f})"


@dataclass
class Ratio:
    """Time of one path over another's, round by round."""
    median: float
    p20: float
    p80: float
    n: int

    @property
    def spread(self) -> float:
        return relative_spread(self.median, self.p20, self.p80)

    @property
    def readable(self) -> bool:
        return self.spread <= WARN_SPREAD

    def text(self) -> str:
        return f"{self.median:.2f}x ({self.p20:.2f}-{self.p80:.2f})"

    def warning(self) -> str | None:
        """A warning to print beside the ratio when its spread is too wide to read it (None when readable)."""
        if self.readable:
            return None
        return (f"WARNING: too noisy to read a ratio from: round by round it ranged {self.p20:.2f}-{self.p80:.2f}x "
                f"(p20-p80, {self.n} rounds, a spread of {self.spread:.0%} of the median, above {WARN_SPREAD:.0%}); "
                "the machine was busy or the timed work is too short. Rerun on an idle machine.")


@dataclass
class Comparison:
    """Paths timed in turn: per-path timings, and ratios taken round by round."""
    samples: dict[str, list[float]]
    stopped: str  # why the rounds ended
    peaks: dict[str, float | None] = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        return min(len(s) for s in self.samples.values())

    def timing(self, name: str) -> Timing:
        return Timing.of(self.samples[name], self.peaks.get(name))

    def ratio(self, name: str, baseline: str) -> Ratio:
        return Ratio(*quantiles(_round_ratios(self.samples[name], self.samples[baseline])), self.rounds)


def _round_ratios(times: list[float], base: list[float]) -> list[float]:
    return [t / b if b > 0 else float("inf") for t, b in zip(times, base, strict=False)]


def wall_timer(device: torch.device) -> Callable[[Callable], float]:
    """A function that calls ``fn()`` once and returns its time in ms: CUDA events on a GPU, else the wall clock."""
    if device.type == "cuda":
        def cuda_timer(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        return cuda_timer

    def cpu_timer(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return cpu_timer


def peak_mib(fn, device: torch.device) -> float | None:
    """Peak CUDA memory allocated during one call of ``fn()`` above what was resident before it (None on a CPU,
    which keeps no allocator statistics: see :func:`held_mib`)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def compare(fns: dict[str, Callable], device: torch.device | None = None, *, warmup: int = 1, min_rounds: int = 5,
            max_rounds: int = 200, time_cap_s: float = 5.0, target_spread: float = TARGET_SPREAD,
            rounds_at_cap: int = ROUNDS_AT_CAP, memory: bool = False,
            timer: Callable[[Callable], float] | None = None,
            clock: Callable[[], float] = time.perf_counter) -> Comparison:
    """Time the paths of ``fns`` (name -> callable) in turn, one call of each per round, the order rotating from
    round to round. After ``min_rounds``, stop as soon as the ratio of every path to the first one has a p20-p80
    range within ``target_spread`` of its median (a single path: its own times); after ``rounds_at_cap`` rounds
    (or ``min_rounds`` if fewer), stop when ``time_cap_s`` has passed; stop after ``max_rounds`` in any case.
    ``timer(fn) -> ms`` and ``clock() -> s`` can be replaced (tests use fakes); by default they are
    :func:`wall_timer` and ``time.perf_counter``. ``memory``: also the CUDA peak of one call per path."""
    if not fns:
        raise ValueError("compare: fns is empty (give at least one path to time)")
    device = torch.device("cpu") if device is None else device
    timer = timer or wall_timer(device)
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = clock()
    stopped = f"{max_rounds} rounds (the most allowed)"
    for r in range(max_rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(timer(fns[name]))
        if r + 1 >= min_rounds and _spreads(samples, names) <= target_spread:
            stopped = f"spread within {target_spread:.0%} after {r + 1} rounds"
            break
        if r + 1 >= min(min_rounds, rounds_at_cap) and clock() - start >= time_cap_s:
            stopped = f"time cap of {time_cap_s:g} s reached after {r + 1} rounds"
            break
    peaks = {name: peak_mib(fns[name], device) for name in names} if memory else {}
    return Comparison(samples, stopped, peaks)


def _spreads(samples: dict[str, list[float]], names: list[str]) -> float:
    """The widest relative p20-p80 range: of each path's ratio to the first path, or of a lone path's times."""
    if len(names) == 1:
        return relative_spread(*quantiles(samples[names[0]]))
    base = samples[names[0]]
    return max(relative_spread(*quantiles(_round_ratios(samples[n], base))) for n in names[1:])


def measure(fn, device: torch.device, *, warmup: int = 3, reps: int = 10, min_time_s: float = 0.0) -> Timing:
    """Median and 20/80% quantiles of ``fn()``'s time (CUDA events on a GPU), ``reps`` calls or more: on until
    ``min_time_s`` has passed, or the spread is within TARGET_SPREAD, at most ``10 * reps`` calls. Comparing paths?
    :func:`compare` times them in turn and gives their ratio with its spread."""
    cmp = compare({"fn": fn}, device, warmup=warmup, min_rounds=reps, max_rounds=10 * reps, rounds_at_cap=reps,
                  time_cap_s=min_time_s, target_spread=TARGET_SPREAD if min_time_s > 0 else float("inf"),
                  memory=True)
    return cmp.timing("fn")


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
