"""Timing helper shared by the scripts/bench_*.py benchmarks."""

import time


def best_time(fn, repeats: int = 2) -> float:
    """Best wall time in seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)
