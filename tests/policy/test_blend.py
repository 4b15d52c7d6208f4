"""MemberBlend (weighted Q/K/V from another member) and TieLatents (jattn.policy.blend)
against NumPy restatements (ConsiStory's ``QueryStore.inject_query``)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jattn.policy.blend import MemberBlend, TieLatents
from jattn.policy.core import Layout, SiteContext


def _ctx(step, g=2, m=4):
    from jattn.models.attention import AttentionSite

    site = AttentionSite(path="up_blocks.1.attentions.0.transformer_blocks.0.attn1",
                         kind="self", resolution=(2, 2), block="up", num_heads=2, head_dim=3)
    return SiteContext(site, jnp.int32(step), Layout(g, m, True))


def test_member_blend_matches_inject_query():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2 * 2 * 4, 4, 2, 3)).astype(np.float32)
    table = np.array([[0, 1, 2, 3], [2, 3, 2, 3], [0, 1, 2, 3]], np.int32)  # step 1: 0<-2, 1<-3
    w = np.array([0.0, 0.9, 0.5], np.float32)
    op = MemberBlend(q_from=jnp.asarray(table), weight=jnp.asarray(w))
    out, k, v = op.qkv(_ctx(1), jnp.asarray(q), jnp.asarray(q), jnp.asarray(q))
    x = q.reshape(2, 2, 4, 4, 2, 3)
    want = x.copy()
    want[:, :, 0] = 0.9 * x[:, :, 2] + 0.1 * x[:, :, 0]
    want[:, :, 1] = 0.9 * x[:, :, 3] + 0.1 * x[:, :, 1]
    np.testing.assert_allclose(np.asarray(out), want.reshape(q.shape), rtol=1e-6, atol=1e-6)
    assert np.array_equal(np.asarray(k), q)                    # K, V untouched
    same, _, _ = op.qkv(_ctx(2), jnp.asarray(q), jnp.asarray(q), jnp.asarray(q))
    assert np.array_equal(np.asarray(same), q)                 # members = own: bit-identical


def test_tie_latents_copies_members():
    x = np.arange(2 * 4 * 3, dtype=np.float32).reshape(8, 1, 1, 3)
    op = TieLatents(jnp.asarray([0, 1, 0, 1], jnp.int32))
    out = np.asarray(op.on_step(jnp.asarray(x), None, jnp.int32(0), Layout(2, 4, True)))
    g = x.reshape(2, 4, 1, 1, 3)
    np.testing.assert_array_equal(out.reshape(2, 4, 1, 1, 3)[:, [2, 3]], g[:, [0, 1]])
    np.testing.assert_array_equal(out.reshape(2, 4, 1, 1, 3)[:, [0, 1]], g[:, [0, 1]])
