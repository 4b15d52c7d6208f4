"""Self-segmentation from captured attention: cluster self-attention rows, label the
clusters with words' cross-attention (pure JAX, jittable, ``vmap`` over images).

Source: Patashnik, Garibi, Azuri, Averbuch-Elor, Cohen-Or, "Localizing Object-level Shape
Variations with Text-to-Image Diffusion Models" (ICCV 2023), §3 "Attention-based shape
localization"; reference orpatashnik/local-prompt-mixing ``src/attention_based_segmentation.py``
(``Segmentor.cluster`` / ``cluster2noun``) and ``src/attention_utils.py``
(``aggregate_attention``).

The algorithm, for one image:

1. ``self_map`` float ``(T, T)``: self-attention probabilities at one query grid
   ``(h, w)`` (T = h·w), averaged over heads, layers and a step window (what
   :class:`jattn.policy.capture.Capture` accumulates in the sampler loop; :func:`mean_map`
   turns the running sum into the mean). Each row (one query pixel's attention over the
   T keys) is a point; :func:`jattn.policy.kmeans.kmeans` clusters the T points into k
   clusters (k-means++ and Lloyd, ``n_init`` restarts).
2. ``word_maps`` float ``(W, Tc)``: each word's cross-attention map at a query grid
   ``(hc, wc)`` (the reference: 16² for a 32² self grid), resized to ``(h, w)`` by nearest
   neighbour (the reference's ``repeat(2)``) and normalised per word as the reference does,
   ``(m − |min m|) / max m`` (:func:`normalise_reference`; for probabilities, min ≥ 0,
   this is ``(m − min) / max``, not a min–max normalisation).
3. Cluster score for a word = mean of its normalised map over the cluster's cells; a
   cluster takes the word of highest score if that score is ``> threshold`` (strict, as the
   reference), else the background. Several clusters may take the same word.

Labels: 0 = background, ``j`` = the ``j``-th word (1-based) of the ``W`` word rows; padded
word rows (``valid`` False) never win. An empty cluster (possible only in degenerate data;
the k-means relocates empty clusters) scores 0 and is background.

Shapes: T = h·w query cells of the self grid, Tc = hc·wc of the cross grid, W word rows,
k clusters, ``(H, W_px)`` image pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.policy.kmeans import kmeans

Array = jax.Array

__all__ = ["mean_map", "normalise_reference", "resize_nearest", "word_maps_from_tokens",
           "label_clusters", "segment_maps", "upsample_labels", "UPSAMPLE_MODES"]

UPSAMPLE_MODES = ("nearest", "bilinear")


def mean_map(acc: dict, key: str) -> Array:
    """In-graph mean of a :class:`~jattn.policy.capture.Capture` accumulator entry.

    Args:
      acc: a Capture accumulator ``{key: (R, T, S) sum over captured steps of the layer- and
        head-mean, "steps": int32 count}``.
      key: e.g. ``"self16x16"``.
    Returns:
      float32 ``(R, T, S)``: the mean over heads, layers of that resolution and the captured
      steps (zeros when no step was captured). The jittable twin of
      :func:`jattn.policy.capture.captured_maps`.
    """
    return acc[key] / jnp.maximum(acc["steps"], 1).astype(jnp.float32)


def normalise_reference(m: Array) -> Array:
    """``(m − |min m|) / max m`` over the last axis (the reference's ``cluster2noun``).

    Args:
      m: float ``(..., T)`` maps (one per leading index).
    Returns:
      float32 ``(..., T)``; a map whose max is ≤ 0 is divided by a tiny positive number
      instead (never NaN; such maps only arise from all-zero attention).
    """
    m = m.astype(jnp.float32)
    lo = jnp.abs(m.min(axis=-1, keepdims=True))
    hi = m.max(axis=-1, keepdims=True)
    return (m - lo) / jnp.where(hi > 0, hi, jnp.finfo(jnp.float32).tiny)


def resize_nearest(x: Array, size: tuple[int, int]) -> Array:
    """Nearest-neighbour resize of the last two axes ``(…, h, w) → (…, H, W)``.

    Output cell ``(i, j)`` takes input cell ``(i·h // H, j·w // W)``; for integer factors
    this is ``repeat`` along both axes (the reference's ``.repeat(2, axis=0).repeat(2,
    axis=1)`` and ``nn.Upsample(mode="nearest")``).
    """
    h, w = x.shape[-2:]
    H, W = int(size[0]), int(size[1])
    rows = (jnp.arange(H) * h) // H
    cols = (jnp.arange(W) * w) // W
    return x[..., rows, :][..., cols]


def word_maps_from_tokens(cross: Array, weights: Array) -> Array:
    """Words' cross-attention maps from per-token maps.

    Args:
      cross: float ``(…, Tc, S)`` cross-attention probabilities (S key tokens).
      weights: float ``(…, W, S)``: row ``w`` holds ``1/n`` at the ``n`` token positions of
        word ``w`` (the mean of its sub-tokens and occurrences), zeros for padding rows.
    Returns:
      float32 ``(…, W, Tc)``.
    """
    return jnp.einsum("...ws,...ts->...wt", weights.astype(jnp.float32),
                      cross.astype(jnp.float32))


def label_clusters(clusters: Array, word_maps: Array, valid: Array, k: int,
                   threshold: float | Array) -> tuple[Array, Array]:
    """Label each cluster with a word or the background (the reference's ``cluster2noun``).

    Args:
      clusters: int ``(T,)`` cluster id in ``[0, k)`` of each cell.
      word_maps: float ``(W, T)`` normalised word maps on the same cells (see
        :func:`normalise_reference`).
      valid: bool ``(W,)``; False rows (padding) never win.
      k: number of clusters (static).
      threshold: a cluster takes its best word only when the score is ``> threshold``.
    Returns:
      ``(cluster_word int32 (k,), scores float32 (k, W))``: ``cluster_word[c]`` is 0 for the
      background or ``1 + w`` for word row ``w``; ``scores[c, w]`` the mean of word ``w``'s
      map over cluster ``c`` (0 for an empty cluster; padding rows included as computed).
    """
    onehot = jax.nn.one_hot(clusters, k, dtype=jnp.float32)              # (T, k)
    counts = onehot.sum(axis=0)                                          # (k,)
    sums = jnp.einsum("tk,wt->kw", onehot, word_maps.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
    scores = sums / jnp.maximum(counts, 1.0)[:, None]                    # (k, W)
    masked = jnp.where(valid[None, :], scores, -jnp.inf)
    best = jnp.argmax(masked, axis=-1)
    top = jnp.max(masked, axis=-1)
    keep = (top > threshold) & (counts > 0)
    return jnp.where(keep, best + 1, 0).astype(jnp.int32), scores


def segment_maps(self_map: Array, word_maps: Array, valid: Array, key: Array, *, k: int,
                 grid_hw: tuple[int, int], cross_hw: tuple[int, int],
                 threshold: float | Array, n_init: int = 10) -> dict:
    """Self-segmentation of ONE image (``jax.vmap`` it over a batch).

    Args:
      self_map: float ``(T, T)`` self-attention at the grid ``grid_hw`` (T = h·w, row-major).
      word_maps: float ``(W, Tc)`` words' cross maps at ``cross_hw`` (Tc = hc·wc), not yet
        normalised (e.g. from :func:`word_maps_from_tokens`).
      valid: bool ``(W,)`` real word rows.
      key: PRNG key of the k-means (the reference seeds NumPy with 1 for every image).
      k: clusters (static, ``2 ≤ k ≤ T``); n_init: k-means restarts (static).
      threshold: labelling threshold (dynamic).
    Returns:
      ``{"clusters": int32 (h, w), "cluster_word": int32 (k,), "scores": float32 (k, W),
      "labels": int32 (h, w) (0 background, j word row j − 1), "word_maps": float32
      (W, h, w) normalised maps on the self grid, "inertia": float32 ()}``.
    Raises:
      ValueError: ``self_map`` not ``(T, T)`` with ``T = h·w``, or ``word_maps`` not
        ``(W, hc·wc)`` (shapes are static, so this raises at trace time).
    """
    h, w = grid_hw
    hc, wc = cross_hw
    if self_map.shape != (h * w, h * w):
        raise ValueError(f"self_map has shape {self_map.shape}; expected (T, T) with "
                         f"T = {h}·{w} = {h * w}")
    if word_maps.ndim != 2 or word_maps.shape[1] != hc * wc:
        raise ValueError(f"word_maps has shape {word_maps.shape}; expected (W, {hc * wc}) "
                         f"for the cross grid {cross_hw}")
    res = kmeans(self_map.astype(jnp.float32), k, key, n_init=n_init)
    wm = resize_nearest(word_maps.reshape(-1, hc, wc), (h, w))          # (W, h, w)
    wm = normalise_reference(wm.reshape(wm.shape[0], h * w))            # (W, T)
    cluster_word, scores = label_clusters(res.labels, wm, valid, k, threshold)
    return {"clusters": res.labels.reshape(h, w), "cluster_word": cluster_word,
            "scores": scores, "labels": cluster_word[res.labels].reshape(h, w),
            "word_maps": wm.reshape(-1, h, w), "inertia": res.inertia}


def upsample_labels(clusters: Array, cluster_word: Array, k: int, size: tuple[int, int],
                    mode: str = "nearest") -> Array:
    """Label map at image size from a cluster map on the attention grid.

    Args:
      clusters: int ``(h, w)`` cluster ids in ``[0, k)``.
      cluster_word: int ``(k,)`` label of each cluster (0 background).
      k: number of clusters (static).
      size: ``(H, W)`` pixels (static).
      mode: ``"nearest"`` (the reference: ``nn.Upsample(mode="nearest")``, each attention
        cell a flat block) or ``"bilinear"`` (each cluster's indicator resized bilinearly,
        half-pixel centres, and every pixel takes the cluster of highest value: boundaries
        follow the cells' centres instead of their edges).
    Returns:
      int32 ``(H, W)`` labels.
    Raises:
      ValueError: unknown mode.
    """
    if mode == "nearest":
        return cluster_word[resize_nearest(clusters, size)].astype(jnp.int32)
    if mode == "bilinear":
        onehot = jax.nn.one_hot(clusters, k, dtype=jnp.float32)          # (h, w, k)
        up = jax.image.resize(onehot, (int(size[0]), int(size[1]), k), "bilinear")
        return cluster_word[jnp.argmax(up, axis=-1)].astype(jnp.int32)
    raise ValueError(f"upsample={mode!r}: choose one of {UPSAMPLE_MODES}")
