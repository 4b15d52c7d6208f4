"""Otsu's threshold in-graph (jattn.policy.otsu) against skimage.filters.threshold_otsu, the
Otsu mask provider, and CrossMapMask's Otsu mode with a step history against a NumPy
restatement of ConsiStory's ``AttentionStore.aggregate_last_steps_attention``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.filters import threshold_otsu

from jattn.policy.core import Layout, SiteContext
from jattn.policy.cross_masks import CrossMapMask
from jattn.policy.otsu import OtsuMask, otsu_mask, otsu_threshold

_thr = jax.jit(otsu_threshold, static_argnums=1)
_mask = jax.jit(otsu_mask)


def _maps(rng, n, t):
    out = []
    for i in range(n):
        x = rng.random(t).astype(np.float32) ** rng.uniform(0.3, 3.0)
        if i % 3 == 0:  # bimodal, as a subject's cross map
            x = np.where(rng.random(t) < 0.3, 0.6 + 0.4 * x, 0.3 * x).astype(np.float32)
        out.append(x)
    return np.stack(out)


def test_threshold_matches_skimage_on_random_maps():
    rng = np.random.default_rng(0)
    for t in (64, 1024):
        x = _maps(rng, 12, t)
        got = np.asarray(_thr(jnp.asarray(x), 256))
        want = np.array([threshold_otsu(r) for r in x], np.float32)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # batched over leading axes, other bin counts
    x = _maps(rng, 6, 64).reshape(2, 3, 64)
    got = np.asarray(_thr(jnp.asarray(x), 32))
    want = np.array([[threshold_otsu(r, nbins=32) for r in g] for g in x])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_constant_map_and_mask_is_strict():
    c = jnp.full((5,), 0.25)
    assert float(_thr(c, 256)) == pytest.approx(0.25)
    assert float(_mask(c).sum()) == 0.0          # map > thr: empty, as the reference
    x = _maps(np.random.default_rng(1), 3, 64)
    m = np.asarray(_mask(jnp.asarray(x)))
    want = np.stack([(r > threshold_otsu(r)) for r in x]).astype(np.float32)
    np.testing.assert_array_equal(m, want)


def test_otsu_mask_provider_thresholds_at_the_site_resolution():
    """The map is upsampled bilinearly (torch ``F.interpolate(mode='bilinear')``) to the site
    grid and thresholded there, as the reference's masks at 32² and 64²."""
    import torch
    import torch.nn.functional as F

    from jattn.models.attention import AttentionSite

    rng = np.random.default_rng(2)
    mp = rng.random((1, 2, 4, 4)).astype(np.float32)
    site = AttentionSite(path="up_blocks.1.attentions.0.transformer_blocks.0.attn1",
                         kind="self", resolution=(8, 8), block="up", num_heads=1, head_dim=4)
    ctx = SiteContext(site, jnp.int32(3), Layout(1, 2, True))
    prov = OtsuMask(op_index=1).bind([None, {"map": jnp.asarray(mp)}])
    got = np.asarray(jax.jit(lambda p: p.site_mask(ctx))(prov))                       # (1, 2, 64)
    up = F.interpolate(torch.from_numpy(mp[0]).unsqueeze(1), size=8, mode="bilinear"
                       ).squeeze(1).numpy()
    want = np.stack([(u > threshold_otsu(u)).reshape(-1) for u in up]).astype(np.float32)
    np.testing.assert_array_equal(got[0], want)


def test_cross_map_mask_otsu_mode_keeps_the_last_steps():
    """Mean over the sites and the last ``history`` calls, then Otsu per member."""
    lay = Layout(1, 2, True)
    op = CrossMapMask(jnp.ones((2, 3)), resolution=(4, 4), mode="otsu", history=3)
    acc = op.aux_init((), lay, 3)
    rng = np.random.default_rng(3)
    calls = [rng.random((2, 1, 2, 16)).astype(np.float32) for _ in range(5)]  # sites
    upd = jax.jit(lambda a, ps, i: op.aux_update(a, ps, i, ()))
    for i, c in enumerate(calls):
        per_site = {f"s{j}": {"map": jnp.asarray(c[j])} for j in range(2)}
        acc = upd(acc, per_site, jnp.int32(i))
    mean = np.mean(np.concatenate(calls[-3:], axis=0), axis=0)           # (1, 2, 16)
    np.testing.assert_allclose(np.asarray(acc["map"]).reshape(1, 2, 16), mean, rtol=1e-5)
    want = np.stack([(r > threshold_otsu(r)) for r in mean[0]]).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(acc["mask"]).reshape(2, 16), want)
    # MasaCtrl's mode is unchanged: a single entry
    assert set(CrossMapMask(jnp.ones((2, 3)), resolution=(4, 4)).aux_init((), lay, 3)) == {
        "mask"}
    with pytest.raises(ValueError, match="mode"):
        CrossMapMask(jnp.ones((2, 3)), resolution=(4, 4), mode="kmeans")


def test_otsu_is_jittable_without_retrace():
    f = jax.jit(otsu_threshold)
    x = _maps(np.random.default_rng(4), 2, 64)
    f(jnp.asarray(x))
    n = f._cache_size()
    f(jnp.asarray(x[::-1].copy()))
    assert f._cache_size() == n
