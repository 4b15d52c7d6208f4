"""Cross-Image Attention's generic ops against NumPy restatements of the reference formulas
(garibida/cross-image-attention ``utils/attention_utils.py`` ``enhance_tensor`` and
``utils/adain.py`` ``masked_adain``/``calc_mean_std``): contrast with and without the
reference's mean broadcast, the Contrast op on chosen members and steps, masked AdaIN."""

import jax.numpy as jnp
import numpy as np
import pytest

from jattn.models.attention import AttentionSite
from jattn.policy.core import Layout, SiteContext
from jattn.policy.ops import Contrast, contrast_probs, masked_adain


def _probs(rng, shape):
    logits = rng.standard_normal(shape).astype(np.float32) * 2
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_contrast(p, s, quirk):
    """Restatement: per head ``clip((t - t.mean(dim=-1)) * s + t.mean(dim=-1), 0, 1)``;
    torch broadcasts the (T,) mean along the last axis (quirk); clean = keepdim."""
    out = np.empty_like(p)
    for idx in np.ndindex(p.shape[:-2]):
        t = p[idx]
        m = t.mean(axis=-1) if quirk else t.mean(axis=-1, keepdims=True)
        out[idx] = np.clip((t - m) * s + m, 0.0, 1.0)
    return out


@pytest.mark.parametrize("quirk", [False, True])
def test_contrast_matches_reference_formula(quirk):
    """Breaks if the contrast formula or the quirk's mean broadcast drifts."""
    p = _probs(np.random.default_rng(0), (2, 3, 16, 16))
    got = np.asarray(contrast_probs(jnp.asarray(p), 1.67, reference_quirks=quirk))
    np.testing.assert_allclose(got, _np_contrast(p, 1.67, quirk), atol=1e-6)


def test_contrast_quirk_only_matters_off_the_simplex_and_needs_square():
    """Every row of a softmax has mean 1/S, so on probabilities the reference's broadcast
    mean equals the row mean (the quirk is harmless there, up to rounding); on rows that do
    not sum to 1 (maps edited earlier) it is a different formula. Only defined for T == S."""
    p = jnp.asarray(_probs(np.random.default_rng(1), (1, 1, 8, 8)))
    np.testing.assert_allclose(contrast_probs(p, 1.67),
                               contrast_probs(p, 1.67, reference_quirks=True), atol=1e-6)
    q = p * jnp.linspace(0.5, 2.0, 8)[:, None]          # rows with different sums
    assert not np.allclose(contrast_probs(q, 1.67), contrast_probs(q, 1.67, reference_quirks=True))
    np.testing.assert_allclose(contrast_probs(q, 1.67, reference_quirks=True),
                               _np_contrast(np.asarray(q), 1.67, True), atol=1e-6)
    with pytest.raises(ValueError, match="T == S"):
        contrast_probs(jnp.ones((1, 1, 4, 6)) / 6, 1.67, reference_quirks=True)
    np.testing.assert_allclose(contrast_probs(p, 1.0), p, atol=1e-7)  # strength 1: identity


def test_contrast_op_only_chosen_members_and_steps():
    """Contrast edits member 0 at steps where its table row says so, and no other row."""
    site = AttentionSite("up_blocks.1.attentions.0.transformer_blocks.0.attn1", "self",
                         (4, 4), 2, 8, "up")
    lay = Layout(groups=2, members=3, cfg=False)
    p = jnp.asarray(_probs(np.random.default_rng(2), (6, 2, 16, 16)))
    table = np.zeros((5, 3), bool)
    table[2:, 0] = True
    op = Contrast(strength=jnp.float32(1.67), members=jnp.asarray(table))
    off = op.edit_probs(SiteContext(site, jnp.int32(1), lay), p)
    np.testing.assert_array_equal(off, p)
    on = np.asarray(op.edit_probs(SiteContext(site, jnp.int32(3), lay), p))
    want = _np_contrast(np.asarray(p), 1.67, False)
    for row in range(6):
        np.testing.assert_allclose(on[row], want[row] if row % 3 == 0 else p[row], atol=1e-6)


def _np_masked_adain(content, style, cmask, smask, eps=1e-5):
    """Restatement of the reference on one (C, h, w) latent (torch var: unbiased)."""
    c = content.reshape(content.shape[0], -1)
    s = style.reshape(style.shape[0], -1)
    cm, sm = cmask.reshape(-1) == 1, smask.reshape(-1) == 1
    s_mean, s_std = s[:, sm].mean(1), np.sqrt(s[:, sm].var(1, ddof=1) + eps)
    c_mean, c_std = c[:, cm].mean(1), np.sqrt(c[:, cm].var(1, ddof=1) + eps)
    norm = (content - c_mean[:, None, None]) / c_std[:, None, None]
    moved = norm * s_std[:, None, None] + s_mean[:, None, None]
    return content * (1 - cmask) + moved * cmask


def test_masked_adain_matches_reference():
    """Breaks if the statistics (masked, unbiased, eps inside the sqrt) or the blend drift."""
    rng = np.random.default_rng(3)
    content = rng.standard_normal((4, 8, 8)).astype(np.float32)
    style = (rng.standard_normal((4, 8, 8)) * 3 + 1).astype(np.float32)
    cm = (rng.random((8, 8)) > 0.5).astype(np.float32)
    sm = (rng.random((8, 8)) > 0.3).astype(np.float32)
    got = masked_adain(jnp.asarray(content.transpose(1, 2, 0)), jnp.asarray(style.transpose(1, 2, 0)),
                       jnp.asarray(cm), jnp.asarray(sm))
    np.testing.assert_allclose(np.asarray(got).transpose(2, 0, 1),
                               _np_masked_adain(content, style, cm, sm), rtol=1e-5, atol=1e-5)
    ones = np.ones((8, 8), np.float32)  # no masks = plain AdaIN (the reference's adain)
    got = masked_adain(jnp.asarray(content.transpose(1, 2, 0)), jnp.asarray(style.transpose(1, 2, 0)))
    np.testing.assert_allclose(np.asarray(got).transpose(2, 0, 1),
                               _np_masked_adain(content, style, ones, ones), rtol=1e-5, atol=1e-5)


def test_masked_adain_empty_mask_keeps_content_and_batches():
    """An empty mask leaves the latents as they are (no NaN); leading axes batch."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    cm = jnp.stack([jnp.zeros((8, 8)), jnp.ones((8, 8))])
    out = np.asarray(masked_adain(x, y, cm, jnp.ones((2, 8, 8))))
    np.testing.assert_array_equal(out[0], np.asarray(x[0]))
    np.testing.assert_allclose(out[1], np.asarray(masked_adain(x[1], y[1])), atol=1e-6)
    assert np.isfinite(out).all()
