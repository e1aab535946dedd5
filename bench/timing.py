"""Timing helpers with no dependency on phi3v, so that `bench.vs_official_side` can use them in the
official code's environment (transformers 4.4x) too."""

from __future__ import annotations

import time


def cpu_seconds_per_call(fns: dict, repeats: int) -> dict:
    """CPU time of one call of each function, best of `repeats`, the functions taking turns.

    Process time on one thread is what a call costs a core; taking turns exposes every function to
    the same moments of a shared machine, and the best run is the one least slowed by other jobs
    sharing caches and memory bandwidth."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    return {name: min(t) for name, t in times.items()}
