"""Benchmark: jattn.policy.kmeans vs scikit-learn's KMeans on a self-attention affinity matrix.

Run:  python scripts/bench_kmeans.py [--n 1024] [--ks 5 6 7 8 9 10] [--n-init 10] [--repeats 3]

The data is what self-segmentation clusters (orpatashnik/local-prompt-mixing: the 32²
self-attention maps averaged over heads, layers and steps, 1024×1024, each row a point,
KMeans(5, n_init=10)): a row-stochastic 1024×1024 matrix with a few spatial segments
(softmax of a block-structured score plus noise). For each k it prints the best-of-N
wall time of both (after one warm-up call, which for jattn includes compilation), the ratio
sklearn / jattn (> 1: jattn faster) and the ratio of the inertias (jattn / sklearn). Both
use this machine's CPU cores (sklearn's threadpool limited to the same count as XLA's).

Measured on this shared 2-core CPU (jax 0.10, scikit-learn 1.9, n_init 10): jattn 0.06-0.12 s,
scikit-learn 1.1-3.1 s per fit, ratio 17-33 (geometric mean 27), inertias equal within
0.6 %. Most of scikit-learn's time is its k-means++ seeding, which computes float32
distances in float64 chunks (0.2 s per restart here; ``init="random"`` fits in 0.04 s).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from benchutil import best_time


def affinity(n: int, segments: int = 6, seed: int = 0) -> np.ndarray:
    """A row-stochastic ``(n, n)`` matrix shaped like averaged self-attention: queries of
    a segment attend mostly to keys of the same segment."""
    rng = np.random.default_rng(seed)
    side = int(round(n ** 0.5))
    yy, xx = np.mgrid[:side, :side]
    centres = rng.random((segments, 2)) * side
    seg = np.argmin((yy.reshape(-1, 1) - centres[:, 0]) ** 2
                    + (xx.reshape(-1, 1) - centres[:, 1]) ** 2, axis=1)[:n]
    scores = 3.0 * (seg[:, None] == seg[None, :]) + rng.normal(0, 1, (n, n))
    p = np.exp(scores - scores.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--ks", type=int, nargs="+", default=[5, 6, 7, 8, 9, 10])
    ap.add_argument("--n-init", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import jax
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    from jattn.policy.kmeans import kmeans

    x = affinity(args.n)
    xj = jax.device_put(x)
    threads = os.cpu_count() or 1
    print(f"data {x.shape} float32, n_init={args.n_init}, {jax.devices()[0].platform}, "
          f"{threads} CPU threads")
    print(f"{'k':>3} {'jattn s':>9} {'sklearn s':>10} {'sklearn/jattn':>14} {'inertia ratio':>14}")
    ratios = []
    for k in args.ks:
        key = jax.random.key(k)
        res = {}

        def run_jattn():
            res["j"] = kmeans(xj, k, key, n_init=args.n_init)
            res["j"].inertia.block_until_ready()

        def run_sklearn():
            with threadpool_limits(threads):
                res["s"] = KMeans(k, n_init=args.n_init, random_state=k).fit(x)

        tj = best_time(run_jattn, args.repeats)
        ts = best_time(run_sklearn, args.repeats)
        ratios.append(ts / tj)
        print(f"{k:>3} {tj:>9.3f} {ts:>10.3f} {ts / tj:>14.2f} "
              f"{float(res['j'].inertia) / res['s'].inertia_:>14.4f}")
    print(f"geometric mean sklearn/jattn: {float(np.exp(np.mean(np.log(ratios)))):.2f}")


if __name__ == "__main__":
    main()
