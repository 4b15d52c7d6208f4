"""Benchmark: prompt mixing cost against plain single-image generation.

Run:  python scripts/bench_mix.py [--model DIR] [--steps 50] [--proxies 3] [--repeats 5]

Rounds are interleaved (plain 1, plain batch, mix, plain 1, …) and the best of each kind
is kept, so load from other processes affects the three alike (scripts/benchutil.py's
best_time times one kind at a time, which a busy shared machine biases). Prints, on one
model in one run (steady state, compiled, best of ``--repeats``):
  1. plain generation of the original prompt alone (1 image);
  2. prompt mixing ``[original, P proxies]`` in one call (window, background blend);
  3. the ratio mix / (1 + P) × plain (goal ≤ 1.0), and mix / plain batch of 1 + P;
  4. compilations of a second mix with a new prompt and new proxies (expected 0).
"""

from __future__ import annotations

import argparse
import time


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    import jattn
    from jattn.methods.mix import mix

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--proxies", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    pipe = jattn.load(args.model)
    prompt = "a red circle on the left on a beige background"
    proxies = ["square", "star", "triangle", "heart"][:args.proxies]
    p = len(proxies)
    n = args.steps
    runs = {"plain1": lambda: pipe.generate([prompt], seed=0, num_inference_steps=n),
            "plainb": lambda: pipe.generate([prompt] * (1 + p), seed=[0] * (1 + p),
                                            num_inference_steps=n),
            "mix": lambda: mix(pipe, prompt, "circle", proxies, seed=0,
                               num_inference_steps=n)}
    # interleaved (one of each per round), best per kind: a busy machine slows all alike
    best = {k: float("inf") for k in runs}
    for k, fn in runs.items():
        fn()                                   # compile + warm up
    for _ in range(args.repeats):
        for k, fn in runs.items():
            best[k] = min(best[k], _time(fn))
    plain1, plainb, mixed = best["plain1"], best["plainb"], best["mix"]
    before = pipe.trace_counts.get("sample", 0)
    mix(pipe, "a blue star at the top on a gray background", "star",
        ["circle", "heart", "square", "triangle"][:p], seed=3, num_inference_steps=n,
        window=(0.6, 1.0))
    compiles = pipe.trace_counts.get("sample", 0) - before
    print(f"{n} steps, CFG 7.5, {p} proxies, best of {args.repeats}")
    print(f"plain 1 image: {plain1:.2f} s; plain batch of {1 + p}: {plainb:.2f} s; "
          f"mix [original + {p}]: {mixed:.2f} s")
    print(f"plain batch of {1 + p} / ((1 + P) x plain single) = {plainb / ((1 + p) * plain1):.2f}")
    print(f"mix / ((1 + P) x plain single) = {mixed / ((1 + p) * plain1):.2f} (goal <= 1.0); "
          f"mix / plain batch of {1 + p} = {mixed / plainb:.2f}")
    print(f"compilations of a second mix with a new prompt, proxies and window: {compiles}")


if __name__ == "__main__":
    main()
