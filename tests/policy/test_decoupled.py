"""Decoupled image cross-attention (jattn/policy/decoupled.py) against a NumPy restatement,
through a tiny UNet, and its errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.models import unet as unet_lib
from jattn.models.attention import AttentionSite, default_attention
from jattn.policy.core import Layout, PolicyError, Select, resolve
from jattn.policy.decoupled import DecoupledImageAttention

SITES = [AttentionSite("down_blocks.0.attentions.0.transformer_blocks.0.attn2", "cross", (4, 4),
                       2, 3, "down"),
         AttentionSite("up_blocks.1.attentions.0.transformer_blocks.0.attn2", "cross", (4, 4),
                       2, 3, "up"),
         AttentionSite("up_blocks.1.attentions.0.transformer_blocks.0.attn1", "self", (4, 4),
                       2, 3, "up")]


def _np_attn(q, k, v):
    """softmax(q kᵀ / √H) v per head; q (B, T, N, H), k/v (B, S, N, H)."""
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def _op(rng, b=3, r=4, d=5, scale=0.7):
    tokens = rng.standard_normal((b, r, d)).astype(np.float32)
    wk = {s.path: rng.standard_normal((d, 6)).astype(np.float32) for s in SITES[:2]}
    wv = {s.path: rng.standard_normal((d, 6)).astype(np.float32) for s in SITES[:2]}
    op = DecoupledImageAttention(jnp.asarray(tokens), {k: jnp.asarray(v) for k, v in wk.items()},
                                 {k: jnp.asarray(v) for k, v in wv.items()}, jnp.asarray(scale))
    return op, tokens, wk, wv


@pytest.mark.parametrize("scale", [0.7, [1.0, 0.0, 2.5]])
def test_decoupled_matches_numpy(scale):
    """out = Attn(q, K_txt, V_txt) + λ·Attn(q, tokens·W_k, tokens·W_v) per head at each
    cross site, with the site's own kernels, λ scalar or per row; self-attention untouched.
    Breaks if the image branch uses another site's kernels, the wrong scaling, or replaces
    instead of adding."""
    rng = np.random.default_rng(0)
    op, tokens, wk, wv = _op(rng, scale=scale)
    pol = resolve([(Select(kind="cross"), op)], SITES, layout=Layout(3, 1, cfg=False))
    q = rng.standard_normal((3, 16, 2, 3)).astype(np.float32)
    k, v = (rng.standard_normal((3, 7, 2, 3)).astype(np.float32) for _ in range(2))
    lam = np.asarray(scale, np.float32).reshape(-1, 1, 1, 1) if np.ndim(scale) else scale
    for site in SITES[:2]:
        out, aux = pol.attend(site, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.int32(0))
        ki = (tokens @ wk[site.path]).reshape(3, 4, 2, 3)
        vi = (tokens @ wv[site.path]).reshape(3, 4, 2, 3)
        ref = _np_attn(q, k, v) + lam * _np_attn(q, ki, vi)
        np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)
        assert aux == {}
    assert pol.attend(SITES[2], jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), None) is None


def test_zero_scale_is_the_text_attention_and_tokens_broadcast():
    """λ = 0 gives exactly the text attention's output; a batch-1 token array is shared by
    every row (same output as tiling it). Breaks if λ is ignored or broadcasting is wrong."""
    rng = np.random.default_rng(1)
    op, tokens, wk, wv = _op(rng, b=1, scale=0.0)
    pol = resolve([(Select(kind="cross"), op)], SITES)
    q = jnp.asarray(rng.standard_normal((3, 16, 2, 3)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 7, 2, 3)), jnp.float32)
    out, _ = pol.attend(SITES[0], q, k, k, None)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(default_attention(q, k, k)))
    op1 = op.replace(scale=jnp.float32(1.0))
    op3 = op1.replace(tokens=jnp.tile(op1.tokens, (3, 1, 1)))
    a = resolve([(Select(kind="cross"), op1)], SITES).attend(SITES[0], q, k, k, None)[0]
    b = resolve([(Select(kind="cross"), op3)], SITES).attend(SITES[0], q, k, k, None)[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_errors_name_the_problem():
    """A site without kernels, kernels of the wrong width, tokens of a wrong batch: one
    PolicyError naming it (not a shape error deep inside jit)."""
    rng = np.random.default_rng(2)
    op, *_ = _op(rng)
    q = jnp.zeros((3, 16, 2, 3))
    k = jnp.zeros((3, 7, 2, 3))
    missing = op.replace(to_k={SITES[0].path: op.to_k[SITES[0].path]})
    pol = resolve([(Select(kind="cross"), missing)], SITES)
    with pytest.raises(PolicyError, match="no to_k/to_v kernels for site up_blocks.1"):
        pol.attend(SITES[1], q, k, k, None)
    wide = op.replace(to_v={p: jnp.zeros((5, 7)) for p in op.to_v})
    with pytest.raises(PolicyError, match=r"expected \(5, 6\)"):
        resolve([(Select(kind="cross"), wide)], SITES).attend(SITES[0], q, k, k, None)
    with pytest.raises(PolicyError, match="tokens have batch 3, the UNet batch is 2"):
        resolve([(Select(kind="cross"), op)], SITES).attend(SITES[0], q[:2], k[:2], k[:2], None)


@pytest.mark.slow  # ~13 s: two compiles of a tiny UNet on the shared 2-core machine
def test_through_unet_changes_output_and_new_tokens_do_not_retrace():
    """Through a tiny UNet at every cross site: the image branch changes eps (it is wired
    in), λ = 0 leaves it as without the op, and new tokens / kernels / λ reuse the compiled
    program (dynamic leaves). Breaks if the op's arrays became static."""
    cfg = unet_lib.UNetConfig(sample_size=8, block_out_channels=(8,),
                              down_block_types=("CrossAttnDownBlock2D",),
                              up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1,
                              num_heads=2, norm_num_groups=4, cross_attention_dim=16)
    params = unet_lib.init_params(cfg, jax.random.key(0))
    sites = unet_lib.list_sites(cfg, 8)
    cross = [s for s in sites if s.kind == "cross"]
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    t = jnp.asarray([10.0, 500.0], jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 7, 16)), jnp.float32)
    traces = []

    def run(pol):
        traces.append(1)
        return unet_lib.UNet2DConditionModel(cfg).apply({"params": params}, x, t, ctx,
                                                         policy=pol)[0]

    fn = jax.jit(run)

    def pol(seed, scale):
        r = np.random.default_rng(seed)
        kern = lambda: {s.path: jnp.asarray(r.standard_normal((16, 8)), jnp.float32)  # noqa
                        for s in cross}
        op = DecoupledImageAttention(jnp.asarray(r.standard_normal((2, 4, 16)), jnp.float32),
                                     kern(), kern(), jnp.float32(scale))
        return resolve([(Select(kind="cross"), op)], sites, layout=Layout(2, 1, cfg=False))

    a = fn(pol(0, 1.0))
    b = fn(pol(1, 0.5))
    z = fn(pol(2, 0.0))
    assert len(traces) == 1
    plain = fn(resolve([], sites))  # no rule: the plain UNet (a second program)
    assert float(jnp.max(jnp.abs(a - plain))) > 1e-3 and float(jnp.max(jnp.abs(a - b))) > 1e-3
    np.testing.assert_allclose(np.asarray(z), np.asarray(plain), atol=1e-6)
