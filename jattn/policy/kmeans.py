"""K-means in JAX: Lloyd's algorithm, k-means++ seeding, ``n_init`` restarts.

Pure and jittable: restarts are ``vmap`` ped, the Lloyd iterations are one
``lax.while_loop`` (``max_iter``, ``tol``), so :func:`kmeans` runs on its own, inside a
compiled sampler loop (an ``on_step`` that re-clusters recorded self-attention), and over
several independent problems with ``jax.vmap`` (one key per problem).

Used by self-segmentation (Patashnik et al., "Localizing Object-level Shape Variations
with Text-to-Image Diffusion Models", ICCV 2023; orpatashnik/local-prompt-mixing: KMeans of
the 1024×1024 self-attention rows, 5 clusters, n_init 10), Cross-Image Attention's masks
(garibida/cross-image-attention ``utils/segmentation.py``) and Bounded Attention's mask
refinement (omer11a/bounded-attention: KMeans of running-mean self-attention).

Algorithm (scikit-learn's ``KMeans(algorithm="lloyd")``, sklearn/cluster/_kmeans.py,
which the references call):

* data centred on its mean (precision of the ``|x|² − 2x·c + |c|²`` distances);
* greedy k-means++ seeding (Arthur & Vassilvitskii, SODA 2007; ``_kmeans_plusplus``):
  first centre uniform, then each next centre the best of ``2 + int(log k)`` candidates
  drawn ∝ D², the one that lowers the potential most;
* Lloyd iterations until the labels stop changing, or the total squared centre shift is
  ≤ ``tol · mean(var(x, axis=0))``, or ``max_iter``; then one last assignment step so that
  labels match the returned centres; inertia = Σ |x − c_label|²;
* the restart of lowest inertia is returned (first one on ties).

Difference from scikit-learn: an empty cluster is moved onto the point farthest from its
own centre (the m-th empty cluster onto the m-th farthest point), but the donor cluster's
centre is not corrected within that iteration (scikit-learn subtracts the point from it);
the next assignment step does that. The random streams differ (JAX keys vs NumPy), so
results agree with scikit-learn up to the local optimum found, not bit for bit.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array

__all__ = ["KMeansResult", "kmeans"]

_HI = jax.lax.Precision.HIGHEST  # float32 distances on every backend (no TF32 / bf16 passes)


@struct.dataclass
class KMeansResult:
    """Result of :func:`kmeans` (a pytree: batch it with ``vmap``).

    Attributes:
      centroids: float32 ``(k, D)`` cluster centres (means of their points).
      labels: int32 ``(N,)`` cluster of each point, the nearest centroid.
      inertia: float32 ``()`` sum of squared distances of the points to their centroid.
      n_iter: int32 ``()`` Lloyd iterations run by the returned restart.
    """

    centroids: Array
    labels: Array
    inertia: Array
    n_iter: Array


def _sq_dists(x: Array, x_sq: Array, c: Array) -> Array:
    """Squared euclidean distances ``(N, K)`` of points ``x (N, D)`` to centres ``c (K, D)``."""
    xc = jnp.dot(x, c.T, precision=_HI)
    return jnp.maximum(x_sq[:, None] - 2.0 * xc + jnp.sum(c * c, axis=-1)[None, :], 0.0)


def _kmeans_pp(x: Array, x_sq: Array, k: int, key: Array) -> Array:
    """Greedy k-means++ seeding: ``(k, D)`` centres taken among the points."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    key_first, key_rest = jax.random.split(key)
    first = jax.random.randint(key_first, (), 0, n)
    centres = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
    closest = _sq_dists(x, x_sq, x[first][None])[:, 0]                     # (N,)

    def add_centre(c, carry):
        centres, closest = carry
        draws = jax.random.uniform(jax.random.fold_in(key_rest, c), (trials,)) * closest.sum()
        cand = jnp.minimum(jnp.searchsorted(jnp.cumsum(closest), draws), n - 1)  # (L,)
        new_closest = jnp.minimum(closest[:, None], _sq_dists(x, x_sq, x[cand]))  # (N, L)
        best = jnp.argmin(new_closest.sum(axis=0))
        return centres.at[c].set(x[cand[best]]), new_closest[:, best]

    centres, _ = jax.lax.fori_loop(1, k, add_centre, (centres, closest))
    return centres


def _lloyd(x: Array, x_sq: Array, centres: Array, max_iter: int, tol_abs: Array):
    """Lloyd iterations from ``centres``: ``(centres, labels, inertia, n_iter)``."""
    n, k = x.shape[0], centres.shape[0]

    def assign(c):
        d = _sq_dists(x, x_sq, c)
        return jnp.argmin(d, axis=-1).astype(jnp.int32), d

    def update(labels, d):
        onehot = jax.nn.one_hot(labels, k, dtype=x.dtype)                   # (N, K)
        counts = onehot.sum(axis=0)
        new = jnp.dot(onehot.T, x, precision=_HI) / jnp.maximum(counts, 1.0)[:, None]
        empty = counts == 0
        own = jnp.take_along_axis(d, labels[:, None], axis=1)[:, 0]
        _, far = jax.lax.top_k(own, k)                                      # farthest points
        rank = jnp.clip(jnp.cumsum(empty) - 1, 0, k - 1)
        return jnp.where(empty[:, None], x[far[rank]], new)

    def cond(s):
        i, _, _, done = s
        return (i < max_iter) & ~done

    def body(s):
        i, c, old_labels, _ = s
        labels, d = assign(c)
        new = update(labels, d)
        shift = jnp.sum((new - c) ** 2)
        return i + 1, new, labels, jnp.all(labels == old_labels) | (shift <= tol_abs)

    init = (jnp.int32(0), centres, jnp.full((n,), -1, jnp.int32), jnp.asarray(False))
    n_iter, centres, _, _ = jax.lax.while_loop(cond, body, init)
    labels, _ = assign(centres)
    inertia = jnp.sum((x - centres[labels]) ** 2)
    return centres, labels, inertia, n_iter


@functools.partial(jax.jit, static_argnames=("k", "n_init", "max_iter"))
def _kmeans(x, key, tol, *, k, n_init, max_iter) -> KMeansResult:
    x = x.astype(jnp.float32)
    mean = x.mean(axis=0)
    x = x - mean
    x_sq = jnp.sum(x * x, axis=-1)
    tol_abs = jnp.asarray(tol, jnp.float32) * jnp.mean(jnp.var(x, axis=0))

    def one(restart_key):
        centres = _kmeans_pp(x, x_sq, k, restart_key)
        return _lloyd(x, x_sq, centres, max_iter, tol_abs)

    centres, labels, inertia, n_iter = jax.vmap(one)(jax.random.split(key, n_init))
    best = jnp.argmin(inertia)
    return KMeansResult(centroids=centres[best] + mean, labels=labels[best],
                        inertia=inertia[best], n_iter=n_iter[best])


def _positive_int(name: str, value, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def kmeans(x: Array, k: int, key: Array, *, n_init: int = 10, max_iter: int = 300,
           tol: float | Array = 1e-4) -> KMeansResult:
    """Cluster the rows of ``x`` into ``k`` clusters (k-means++ seeding, Lloyd, restarts).

    Pure: call it eagerly, under ``jit``, inside ``lax.scan`` / ``while_loop`` bodies, or
    ``jax.vmap`` it over independent problems (``vmap(lambda x, key: kmeans(x, 5, key))``).
    Defaults are scikit-learn's (``KMeans(n_clusters=k, n_init=10, max_iter=300,
    tol=1e-4)``); self-segmentation uses ``k=5, n_init=10``.

    Args:
      x: ``(N, D)`` points (rows), any float dtype; computed in float32.
      k: number of clusters, static, ``2 <= k <= N``.
      key: a PRNG key (typed or raw ``uint32 (2,)``); restart r uses
        ``jax.random.split(key, n_init)[r]``. The same key gives the same result.
      n_init: restarts, static, >= 1 (run in parallel with ``vmap``; lowest inertia kept).
      max_iter: Lloyd iterations at most per restart, static, >= 1.
      tol: relative tolerance (may be traced): stop when the total squared centre shift
        of an iteration is <= ``tol · mean(var(x, axis=0))`` (scikit-learn's rule), or
        when the labels stop changing.

    Returns:
      :class:`KMeansResult`: centroids float32 ``(k, D)``, labels int32 ``(N,)``, inertia
      float32 ``()``, n_iter int32 ``()``.

    Raises:
      ValueError: ``x`` not 2-D (names ``x``); ``k`` < 2 or ``k`` > N (names ``k``);
        ``n_init`` or ``max_iter`` < 1; ``tol`` < 0.

    Source: Lloyd, "Least squares quantization in PCM" (1982); Arthur & Vassilvitskii,
    "k-means++" (SODA 2007); scikit-learn ``sklearn/cluster/_kmeans.py``
    (``_kmeans_plusplus``, ``_kmeans_single_lloyd``), as called by
    orpatashnik/local-prompt-mixing and garibida/cross-image-attention
    ``utils/segmentation.py``.
    """
    if jnp.ndim(x) != 2:
        raise ValueError(f"x must be 2-D (N points, D features), got shape {jnp.shape(x)}")
    n = jnp.shape(x)[0]
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 2:
        raise ValueError(f"k (the number of clusters) must be an int >= 2, got {k!r}; "
                         "k=1 is the mean of the points, not a clustering")
    if k > n:
        raise ValueError(f"k={k} clusters for only N={n} points (rows of x): need k <= N")
    n_init = _positive_int("n_init", n_init, 1)
    max_iter = _positive_int("max_iter", max_iter, 1)
    if isinstance(tol, numbers.Real) and tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    return _kmeans(x, key, tol, k=int(k), n_init=n_init, max_iter=max_iter)
