"""Dense correspondence and injection along it (jattn.policy.correspondence) against a NumPy
restatement of NVlabs/consistory (``utils/general_utils.py``: ``gaussian_smooth``,
``cos_dist``, ``gen_nn_map``, ``cyclic_nn_map``; ``consistory_utils.py``:
``FeatureInjector.inject_outputs`` with ``swap_strategy='min'``, ``dist_thr='dynamic'``), and
torch's bilinear ``F.interpolate`` for the resize."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from skimage.filters import threshold_otsu

from jattn.policy import correspondence as cr
from jattn.policy.core import Layout, PolicyError, SiteContext
from jattn.models.attention import AttentionSite


def _np_smooth(x, size=3, sigma=1.0):
    """gaussian_smooth: per channel conv2d with the normalised kernel, zero padding."""
    k = np.fromfunction(lambda a, b: (1 / (2 * np.pi * sigma ** 2)) * np.exp(
        -((a - (size - 1) / 2) ** 2 + (b - (size - 1) / 2) ** 2) / (2 * sigma ** 2)),
        (size, size))
    k = k / k.sum()
    h, w, c = x.shape
    p = size // 2
    xp = np.pad(x, ((p, p), (p, p), (0, 0)))
    out = np.zeros_like(x, dtype=np.float64)
    for i in range(h):
        for j in range(w):
            out[i, j] = np.einsum("abc,ab->c", xp[i:i + size, j:j + size], k)
    return out


def _np_nn(src, src_mask, tgt):
    """gen_nn_map (features already at the target size, (S, C) / (T, C))."""
    a = src / np.maximum(np.linalg.norm(src, axis=-1, keepdims=True), 1e-12)
    b = tgt / np.maximum(np.linalg.norm(tgt, axis=-1, keepdims=True), 1e-12)
    d = 1 - a @ b.T                                       # (S, T)
    d[~src_mask] = 2.0
    return d.argmin(0), d.min(0)


def _np_inject(out, feats, masks, mapping, alpha, inplace=True):
    """cyclic_nn_map + FeatureInjector.inject_outputs for one group, in place as the
    reference (old_output = output, no clone); inplace=False: with the clone."""
    m, t = masks.shape
    nn_map = np.zeros((m, m, t), int)
    nn_d = np.full((m, m, t), np.inf)
    for i in range(m):
        for j in range(m):
            if i != j:
                nn_map[i, j], nn_d[i, j] = _np_nn(feats[j], masks[j], feats[i])
    output = out.copy()
    old = output if inplace else output.copy()
    for i in range(m):
        cm = mapping[i]
        if not np.any(np.concatenate([cm[:i], cm[i + 1:]])):
            continue
        rows = np.where(cm)[0]
        md = nn_d[i][rows].argmin(0)
        nn = nn_map[i][rows][md, np.arange(t)]
        d = nn_d[i][rows][md, np.arange(t)]
        final = masks[i] & (d < threshold_otsu(d))
        other = old[rows][md, nn][final]
        output[i][final] = alpha * other + (1 - alpha) * old[i][final]
    return output


def test_gaussian_smooth_matches_the_reference():
    x = np.random.default_rng(0).normal(size=(2, 5, 6, 3)).astype(np.float32)
    got = np.asarray(cr.gaussian_smooth(jnp.asarray(x)))
    for b in range(2):
        np.testing.assert_allclose(got[b], _np_smooth(x[b]), atol=1e-5)


@pytest.mark.parametrize("hw", [(8, 8), (16, 12), (4, 4)])
def test_resize_bilinear_matches_torch_interpolate(hw):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 5)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=hw,
                                           mode="bilinear", align_corners=False)
    got = np.asarray(cr.resize_bilinear(jnp.asarray(x), hw))
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_nearest_neighbours_match_gen_nn_map():
    rng = np.random.default_rng(2)
    src = rng.normal(size=(20, 6)).astype(np.float32)
    tgt = rng.normal(size=(15, 6)).astype(np.float32)
    mask = rng.random(20) < 0.4
    i, d = cr.nearest_neighbours(jnp.asarray(tgt), jnp.asarray(src), jnp.asarray(mask))
    wi, wd = _np_nn(src.astype(np.float64), mask, tgt.astype(np.float64))
    np.testing.assert_array_equal(np.asarray(i), wi)
    np.testing.assert_allclose(np.asarray(d), wd, atol=1e-5)
    assert mask[np.asarray(i)].all()
    _, d0 = cr.nearest_neighbours(jnp.asarray(tgt), jnp.asarray(src), jnp.zeros(20, bool))
    assert np.all(np.asarray(d0) == 2.0)                   # empty mask: distance 2


@pytest.mark.parametrize("sequential", [True, False])
def test_injection_matches_feature_injector(sequential):
    """Two groups of 4 members, anchors 0 and 1 (create_anchor_mapping): the op's output in
    the conditional half equals the reference's in-place loop (sequential=True) or the same
    loop reading a copy of the outputs (False); the unconditional half is unchanged."""
    rng = np.random.default_rng(3)
    g, m, h, w, c, n_h, hd = 2, 4, 4, 4, 5, 2, 3
    t = h * w
    feats = rng.normal(size=(g, m, h, w, c)).astype(np.float32)
    masks = rng.random((g, m, t)) < 0.5
    mapping = np.eye(m, dtype=bool)
    mapping[:, [0, 1]] = True
    sources = np.array([[1, 0], [0, 1], [0, 1], [0, 1]], np.int32)   # off slot = m itself
    member, token, dist = cr.member_correspondence(jnp.asarray(feats), jnp.asarray(masks),
                                                   jnp.asarray(sources))
    inj = cr.injection_mask(jnp.asarray(masks), dist)
    lay = Layout(groups=g, members=m, cfg=True)
    site = AttentionSite(path="up_blocks.1.attentions.0.transformer_blocks.0.attn1",
                         kind="self", resolution=(h, w), num_heads=n_h, head_dim=hd,
                         block="up")
    op = cr.CorrespondenceInject(member, token, inj, alpha=jnp.float32(0.8),
                                 window=jnp.asarray([2, 5], jnp.int32), sequential=sequential)
    out = rng.normal(size=(2 * g * m, t, n_h, hd)).astype(np.float32)
    got = np.asarray(op.edit_output(SiteContext(site, jnp.int32(3), lay), jnp.asarray(out),
                                    None, None, None, None))
    parts = out.reshape(2, g, m, t, n_h * hd)
    gp = got.reshape(2, g, m, t, n_h * hd)
    np.testing.assert_array_equal(gp[0], parts[0])
    for gi in range(g):
        want = _np_inject(parts[1, gi].astype(np.float64), feats[gi].reshape(m, t, c)
                          .astype(np.float64), masks[gi], mapping, 0.8, inplace=sequential)
        np.testing.assert_allclose(gp[1, gi], want, atol=1e-5)
    assert np.asarray(inj).any() and not np.asarray(inj).all()
    # outside the window: unchanged, bit for bit
    same = op.edit_output(SiteContext(site, jnp.int32(5), lay), jnp.asarray(out), None, None,
                          None, None)
    np.testing.assert_array_equal(np.asarray(same), out)


def test_member_without_source_is_not_injected():
    """n_anchors = 1: the anchor has no other member mapped (the reference skips it)."""
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(1, 3, 2, 2, 4)).astype(np.float32)
    masks = np.ones((1, 3, 4), bool)
    src = np.array([[0], [0], [0]], np.int32)
    _, _, dist = cr.member_correspondence(jnp.asarray(feats), jnp.asarray(masks),
                                          jnp.asarray(src))
    inj = np.asarray(cr.injection_mask(jnp.asarray(masks), dist))
    assert not inj[0, 0].any() and np.isinf(np.asarray(dist)[0, 0]).all()


def test_bad_shapes_raise():
    lay = Layout(groups=1, members=2, cfg=False)
    site = AttentionSite(path="x.attn1", kind="self", resolution=(2, 2), num_heads=1,
                         head_dim=2, block="up")
    op = cr.CorrespondenceInject(jnp.zeros((1, 2, 9), jnp.int32), jnp.zeros((1, 2, 9), jnp.int32),
                                 jnp.ones((1, 2, 9), bool))
    with pytest.raises(PolicyError, match=r"expected \(G, M, T\)"):
        op.edit_output(SiteContext(site, jnp.int32(0), lay), jnp.zeros((2, 4, 1, 2)), None,
                       None, None, None)
