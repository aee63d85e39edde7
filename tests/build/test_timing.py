"""The timing logic of prefix_kernels._timing on injected timings and a fake clock: nothing here is timed, so the
outcomes are the same on any machine, loaded or not."""

import itertools

import pytest

from prefix_kernels import _timing
from prefix_kernels._timing import Ratio, Timing, compare, quantiles


class FakeMachine:
    """Paths that "take" scripted times: the timer calls the path, which returns its time in ms, and the clock
    advances by it. ``calls`` records the order the paths ran in."""

    def __init__(self, scripts):
        self.now = 0.0
        self.calls = []
        self.fns = {name: self._path(name, itertools.cycle(times)) for name, times in scripts.items()}

    def _path(self, name, times):
        def fn():
            self.calls.append(name)
            return next(times)
        return fn

    def timer(self, fn):
        ms = fn()
        self.now += ms / 1e3
        return ms

    def clock(self):
        return self.now


def run(scripts, **kw):
    machine = FakeMachine(scripts)
    kw.setdefault("warmup", 0)
    return machine, compare(machine.fns, timer=machine.timer, clock=machine.clock, **kw)


def test_tight_timings_stop_early_and_give_a_readable_ratio():
    machine, cmp = run({"ours": [10.0, 10.1, 9.9], "base": [20.0, 20.2, 19.8]}, min_rounds=5, time_cap_s=60)
    assert cmp.rounds == 5
    assert cmp.stopped.startswith("spread within")
    ratio = cmp.ratio("ours", "base")
    assert ratio.median == pytest.approx(0.5, rel=0.02)
    assert ratio.readable and ratio.warning() is None


def test_noisy_timings_run_to_the_time_cap_and_warn():
    # ours jumps between 10 and 50 ms while the baseline is steady: no ratio can be read from that.
    machine, cmp = run({"ours": [10.0, 50.0, 12.0, 45.0], "base": [20.0]}, min_rounds=5, time_cap_s=2.0)
    assert cmp.stopped.startswith("time cap of 2 s")
    assert 2.0 <= machine.now < 2.0 + 0.2  # it stopped at the first round past the cap
    ratio = cmp.ratio("ours", "base")
    assert not ratio.readable
    warning = ratio.warning()
    assert warning is not None and warning.startswith("WARNING: too noisy to read a ratio")
    assert f"{cmp.rounds} rounds" in warning


def test_a_load_change_that_hits_both_paths_alike_leaves_the_ratio_readable():
    # From the fourth round on the machine is three times slower for both paths: each path's own spread is wide,
    # but the ratio, taken round by round, is not.
    slow = [1.0] * 3 + [3.0] * 5
    machine = FakeMachine({"ours": [10.0 * s for s in slow], "base": [20.0 * s for s in slow]})
    cmp = compare(machine.fns, warmup=0, min_rounds=8, max_rounds=8, timer=machine.timer, clock=machine.clock)
    assert cmp.timing("ours").spread > 0.5 > _timing.WARN_SPREAD
    ratio = cmp.ratio("ours", "base")
    assert ratio.median == pytest.approx(0.5) and ratio.spread == pytest.approx(0.0)
    assert ratio.warning() is None


def test_paths_run_in_turn_with_the_order_rotating():
    machine, cmp = run({"a": [1.0], "b": [1.0], "c": [1.0]}, min_rounds=3, max_rounds=3, warmup=1)
    assert machine.calls == ["a", "b", "c",  # warm-up
                             "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert cmp.rounds == 3


def test_the_time_cap_ends_slow_rounds_before_min_rounds_but_not_before_three():
    # Calls of 4 s (a loaded machine) with a 6 s cap: three rounds (24 s), not min_rounds' five (40 s).
    machine, cmp = run({"ours": [4000.0], "base": [4000.0, 4400.0]}, min_rounds=5, time_cap_s=6.0)
    assert cmp.rounds == _timing.ROUNDS_AT_CAP == 3
    assert cmp.stopped.startswith("time cap")


def test_max_rounds_bounds_a_run_that_neither_settles_nor_reaches_the_cap():
    machine, cmp = run({"ours": [1.0, 9.0], "base": [1.0]}, min_rounds=2, max_rounds=7, time_cap_s=1e9)
    assert cmp.rounds == 7 and cmp.stopped.startswith("7 rounds")
    assert cmp.ratio("ours", "base").warning() is not None


def test_a_lone_path_stops_on_its_own_spread():
    machine, cmp = run({"only": [5.0, 5.05]}, min_rounds=4, time_cap_s=60)
    assert cmp.rounds == 4 and cmp.stopped.startswith("spread within")


def test_quantiles_and_text():
    assert quantiles([3.0]) == (3.0, 3.0, 3.0)
    median, p20, p80 = quantiles([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (median, p20, p80) == (3.0, pytest.approx(1.8), pytest.approx(4.2))
    assert Timing.of([1.0, 2.0, 3.0, 4.0, 5.0]).text() == "3.0 (1.8-4.2)"
    assert Ratio(1.0, 0.95, 1.05, 9).text() == "1.00x (0.95-1.05)"
    assert Ratio(1.0, 0.95, 1.05, 9).warning() is None
    assert Ratio(1.0, 0.8, 1.3, 9).warning() is not None  # 50% of the median, above WARN_SPREAD
    with pytest.raises(ValueError, match="no samples"):
        quantiles([])


def test_compare_needs_a_path():
    with pytest.raises(ValueError, match="fns is empty"):
        compare({})


def test_measure_keeps_its_interface(monkeypatch):
    """The benchmarks call measure(fn, device, warmup=, reps=): reps calls, then a Timing with its spread."""
    times = iter([4.0, 6.0, 5.0, 5.0])
    monkeypatch.setattr(_timing, "wall_timer", lambda device: (lambda fn: next(times)))
    calls = []
    t = _timing.measure(lambda: calls.append(1), _timing.torch.device("cpu"), warmup=2, reps=4)
    assert len(calls) == 2  # the warm-up (the fake timer does not call; a CPU has no peak to measure)
    assert (t.median_ms, t.n, t.peak_mib) == (5.0, 4, None)
