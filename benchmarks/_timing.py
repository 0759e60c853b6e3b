"""Alternating timing with warm-up and medians, and peak memory of one call."""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping

from torch.profiler import ProfilerActivity, profile


def alternate(
    fns: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int = 2,
    baseline: str | None = None,
) -> dict[str, dict[str, float]]:
    """Time each callable ``rounds`` times, interleaved (round r runs them in an order rotated
    by r), after ``warmup`` untimed interleaved calls each.

    Returns, per name: ``wall`` and ``cpu`` (process CPU time) medians in seconds, the number
    of samples ``n`` and, when ``baseline`` names one of the callables, ``paired``: the median
    over rounds of ``wall / wall(baseline)`` within the round. Alternating makes a drift in
    machine load hit every variant alike; pairing within a round (calls a fraction of a second
    apart) also cancels the bursts of a shared machine.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    out = {
        n: {"wall": statistics.median(wall[n]), "cpu": statistics.median(cpu[n]), "n": rounds}
        for n in names
    }
    if baseline is not None:
        for n in names:
            out[n]["paired"] = statistics.median(w / b for w, b in zip(wall[n], wall[baseline]))
    return out


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's native start/stop lines (written to file descriptor 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak CPU memory (bytes) allocated by torch during ``fn()``, above what was live before.

    From the profiler's per-operator memory records (``profile_memory=True``): the running sum
    of each operator's net allocation, in time order; transients inside one operator are not
    seen, tensors alive before the call are not counted.
    """
    gc.collect()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.profiler.function_events, key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak
