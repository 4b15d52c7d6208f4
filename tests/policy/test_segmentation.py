"""jattn.policy.segmentation: the reference's cluster labelling restated in NumPy, the
normalisation, the resizes, and one image segmented end to end on synthetic attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.policy import segmentation as seg


def reference_cluster2noun(clusters: np.ndarray, noun_maps: np.ndarray, k: int,
                           threshold: float) -> list:
    """NumPy restatement of ``Segmentor.cluster2noun`` (orpatashnik/local-prompt-mixing,
    ``src/attention_based_segmentation.py``): ``noun_maps (h, w, W)`` at the cross grid,
    ``clusters (2h, 2w)``; returns per cluster the noun index or "BG"."""
    up = noun_maps.repeat(2, axis=0).repeat(2, axis=1)
    norm = np.zeros_like(up)
    for i in range(up.shape[-1]):
        m = up[:, :, i]
        norm[:, :, i] = (m - np.abs(m.min())) / m.max()
    out = []
    for c in range(k):
        mask = (clusters == c).astype(np.float64)
        scores = [(mask * norm[:, :, i]).sum() / mask.sum() for i in range(up.shape[-1])]
        out.append(int(np.argmax(scores)) if max(scores) > threshold else "BG")
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.35, 0.6])
def test_label_clusters_matches_reference_scoring(seed, threshold):
    """Scores = mean of the normalised (m − |min m|)/max m map over the cluster; argmax
    word above the threshold, else background (breaks on another normalisation, a sum
    instead of a mean, a ≥ instead of >, or a wrong argmax)."""
    rng = np.random.default_rng(seed)
    k, h, w, n_words = 5, 4, 4, 3
    clusters = rng.integers(0, k, (2 * h, 2 * w))
    clusters[0, :k] = np.arange(k)                      # every cluster non-empty
    noun_maps = rng.random((h, w, n_words)) ** 3
    ref = reference_cluster2noun(clusters, noun_maps, k, threshold)
    wm = seg.resize_nearest(jnp.asarray(noun_maps.transpose(2, 0, 1)), (2 * h, 2 * w))
    wm = seg.normalise_reference(wm.reshape(n_words, -1))
    cw, scores = seg.label_clusters(jnp.asarray(clusters.reshape(-1)), wm,
                                    jnp.ones(n_words, bool), k, threshold)
    assert [("BG" if int(c) == 0 else int(c) - 1) for c in cw] == ref
    assert scores.shape == (k, n_words)


def test_label_clusters_ignores_padding_and_empty_clusters():
    clusters = jnp.asarray([0, 0, 1, 1])
    maps = jnp.asarray([[0.9, 0.9, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])    # row 1 is padding
    cw, scores = seg.label_clusters(clusters, maps, jnp.asarray([True, False]), 3, 0.35)
    assert cw.tolist() == [1, 0, 0]                      # cluster 2 is empty → background
    assert float(scores[2, 0]) == 0.0


def test_normalise_reference_is_not_min_max():
    m = jnp.asarray([[0.2, 0.6, 1.0], [-0.5, 0.5, 1.5]])
    got = np.asarray(seg.normalise_reference(m))
    np.testing.assert_allclose(got[0], [0.0, 0.4, 0.8], atol=1e-6)     # (m − 0.2) / 1.0
    np.testing.assert_allclose(got[1], [-2 / 3, 0.0, 2 / 3], atol=1e-6)  # (m − 0.5) / 1.5
    assert np.isfinite(np.asarray(seg.normalise_reference(jnp.zeros((1, 4))))).all()


def test_resize_nearest_is_repeat_for_integer_factors():
    x = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(seg.resize_nearest(jnp.asarray(x), (6, 8)),
                                  x.repeat(2, 0).repeat(2, 1))
    np.testing.assert_array_equal(seg.resize_nearest(jnp.asarray(x), (3, 2)), x[:, [0, 2]])


def test_upsample_labels_nearest_and_bilinear():
    clusters = jnp.asarray(np.repeat([[0, 0, 1, 1]], 4, axis=0))        # left / right halves
    cw = jnp.asarray([0, 2])
    near = np.asarray(seg.upsample_labels(clusters, cw, 2, (8, 8), "nearest"))
    np.testing.assert_array_equal(near, np.repeat([[0] * 4 + [2] * 4], 8, axis=0))
    bil = np.asarray(seg.upsample_labels(clusters, cw, 2, (8, 8), "bilinear"))
    np.testing.assert_array_equal(bil, near)             # the boundary is at the middle
    with pytest.raises(ValueError, match="upsample"):
        seg.upsample_labels(clusters, cw, 2, (8, 8), "cubic")


def test_mean_map_divides_by_the_captured_steps():
    acc = {"self2x2": jnp.full((1, 4, 4), 6.0), "steps": jnp.asarray(3, jnp.int32)}
    np.testing.assert_allclose(seg.mean_map(acc, "self2x2"), 2.0)
    acc["steps"] = jnp.asarray(0, jnp.int32)
    np.testing.assert_allclose(seg.mean_map(acc, "self2x2"), 6.0)       # no NaN


def _blocky_attention(h: int, w: int, regions: np.ndarray, sharp: float, rng) -> np.ndarray:
    """Self-attention of a (h, w) grid whose cells attend to their own region."""
    r = regions.reshape(-1)
    logits = sharp * (r[:, None] == r[None, :]) + rng.normal(0, 0.3, (h * w, h * w))
    p = np.exp(logits - logits.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def test_segment_maps_finds_regions_and_labels_them():
    """Three regions (background, two objects); each word's cross map lights its object:
    the clusters are the regions and each object region takes its word (breaks on a wrong
    reshape between the (T,) cluster axis and the grid, or on word rows mixed up)."""
    rng = np.random.default_rng(0)
    h = w = 8
    regions = np.zeros((h, w), int)
    regions[1:4, 1:4] = 1
    regions[5:8, 4:8] = 2
    attn = _blocky_attention(h, w, regions, 4.0, rng)
    cross = np.stack([(regions == 1), (regions == 2), np.zeros_like(regions, bool)]
                     ).astype(np.float32) + 0.05                          # (W, h, w)
    cross4 = cross.reshape(3, 4, 2, 4, 2).mean((2, 4)).reshape(3, 16)   # to the 4x4 grid
    out = seg.segment_maps(jnp.asarray(attn), jnp.asarray(cross4),
                           jnp.asarray([True, True, False]), jax.random.key(1), k=3,
                           grid_hw=(h, w), cross_hw=(4, 4), threshold=0.35, n_init=4)
    labels = np.asarray(out["labels"])
    assert out["clusters"].shape == (h, w) and out["scores"].shape == (3, 3)
    np.testing.assert_array_equal(labels, regions)
    with pytest.raises(ValueError, match="self_map"):
        seg.segment_maps(jnp.asarray(attn[:10]), jnp.asarray(cross4), jnp.ones(3, bool),
                         jax.random.key(1), k=3, grid_hw=(h, w), cross_hw=(4, 4),
                         threshold=0.3)


def test_segment_maps_vmaps_over_images():
    rng = np.random.default_rng(1)
    regions = np.zeros((4, 4), int)
    regions[:2, :2] = 1
    attn = np.stack([_blocky_attention(4, 4, regions, 4.0, rng),
                     _blocky_attention(4, 4, regions.T[::-1], 4.0, rng)])
    words = np.stack([(regions == 1).reshape(1, 16), (regions.T[::-1] == 1).reshape(1, 16)]
                     ).astype(np.float32)

    def one(a, wm):
        return seg.segment_maps(a, wm, jnp.ones(1, bool), jax.random.key(1), k=2,
                                grid_hw=(4, 4), cross_hw=(4, 4), threshold=0.35, n_init=2)

    batched = jax.jit(jax.vmap(one))(jnp.asarray(attn), jnp.asarray(words))
    for i in range(2):
        np.testing.assert_array_equal(batched["labels"][i], one(attn[i], words[i])["labels"])
    np.testing.assert_array_equal(batched["labels"][1], regions.T[::-1])
