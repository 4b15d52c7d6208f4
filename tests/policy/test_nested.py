"""Nested Attention's op (jattn.policy.nested): per-query value of s* against a NumPy
restatement, conditional half only, identity when no subject, the outer softmax untouched,
λ, several subjects, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from jattn.models.attention import AttentionSite, attend, default_attention
from jattn.policy.core import Layout, Op, PolicyError, compose, resolve
from jattn.policy.nested import NestedAttention, nested_policy

N, H, R, S, T = 2, 4, 3, 7, 16
CROSS = AttentionSite(path="down_blocks.0.attentions.0.transformer_blocks.0.attn2",
                      kind="cross", resolution=(4, 4), num_heads=N, head_dim=H, block="down")
SELF = AttentionSite(path="down_blocks.0.attentions.0.transformer_blocks.0.attn1",
                     kind="self", resolution=(4, 4), num_heads=N, head_dim=H, block="down")
SITES = [SELF, CROSS]


@struct.dataclass
class RecordProbs(Op):
    """Records the probabilities it sees (forces materialised probabilities)."""

    needs_probs = True

    def record(self, ctx, p_pre, p_post):
        return {"p": p_post}


def _rand(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _inputs(rows, seed=0):
    return _rand(seed, rows, T, N, H), _rand(seed + 1, rows, S, N, H), _rand(seed + 2, rows, S,
                                                                              N, H)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _numpy_nested(q, k, v, kn, vn, pos, lam=1.0):
    """Restatement: per row and query, v with v[s*_j] replaced by V*_{q,j}; outer softmax
    over the text tokens unchanged. q (B,T,N,H), kn (B,J,R,N,H), pos (B,J)."""
    q, k, v, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v, kn, vn))
    p = _softmax(np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H))
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        vt = np.broadcast_to(v[b][None], (T, S, N, H)).copy()  # per query a copy of v
        for j, s in enumerate(pos[b]):
            if s < 0:
                continue
            w = _softmax(np.einsum("tnh,rnh->ntr", q[b], kn[b, j]) / np.sqrt(H))
            vt[:, s] = lam * np.einsum("ntr,rnh->tnh", w, vn[b, j])
        out[b] = np.einsum("nts,tsnh->tnh", p[b], vt)
    return out


def test_nested_matches_numpy_cond_half_only():
    """With CFG (2 groups): the conditional rows equal the NumPy restatement (value of s*
    replaced per query by softmax(q·K̃ᵀ/√H)·Ṽ, two subjects in row 0, one in row 1), the
    unconditional rows are bit-identical to plain attention. Breaks if V* is not per query,
    the wrong half is edited, or a second subject is ignored."""
    layout = Layout(groups=2, members=1, cfg=True)
    q, k, v = _inputs(4)
    kn, vn = _rand(5, 2, 2, R, N, H), _rand(6, 2, 2, R, N, H)
    pos = np.array([[2, 5], [4, -1]], np.int32)
    pol = nested_policy(SITES, {CROSS.path: kn}, {CROSS.path: vn}, pos, layout=layout,
                        context_tokens=S)
    out, _ = attend(CROSS, q, k, v, pol, jnp.int32(0))
    plain = default_attention(q, k, v)
    np.testing.assert_array_equal(out[:2], plain[:2])
    ref = _numpy_nested(q[2:], k[2:], v[2:], kn, vn, pos)
    np.testing.assert_allclose(out[2:], ref, atol=2e-5)
    assert float(jnp.abs(out[2:] - plain[2:]).max()) > 1e-2  # it did something
    # the self-attention site is not touched by the policy
    assert dict(pol.table).keys() == {CROSS.path}


def test_scale_lambda_and_single_slot_shape():
    """λ multiplies V* (λ = 0 zeroes s*'s value for every query); positions (B,) with
    keys (B, R, N, H) mean one subject slot. Breaks if λ scales something else."""
    layout = Layout(groups=1, members=1, cfg=False)
    q, k, v = _inputs(1, seed=10)
    kn, vn = _rand(11, 1, R, N, H), _rand(12, 1, R, N, H)
    for lam in (0.0, 0.6):
        pol = nested_policy(SITES, {CROSS.path: kn}, {CROSS.path: vn}, np.array([3]),
                            scale=lam, layout=layout, context_tokens=S)
        out, _ = attend(CROSS, q, k, v, pol, jnp.int32(0))
        ref = _numpy_nested(q, k, v, kn[:, None], vn[:, None], np.array([[3]]), lam)
        np.testing.assert_allclose(out, ref, atol=2e-5)


def test_no_subject_is_bit_identical():
    """positions all -1: the output is bit-identical to plain attention (the fused kernel's
    output is kept, nothing added). Breaks if the op forced materialised probabilities or
    added a non-zero term for absent subjects."""
    layout = Layout(groups=2, members=1, cfg=True)
    q, k, v = _inputs(4, seed=20)
    kn, vn = _rand(21, 2, 2, R, N, H), _rand(22, 2, 2, R, N, H)
    pol = nested_policy(SITES, {CROSS.path: kn}, {CROSS.path: vn}, -np.ones((2, 2), np.int32),
                        layout=layout, context_tokens=S)
    out, _ = attend(CROSS, q, k, v, pol, jnp.int32(0))
    np.testing.assert_array_equal(out, default_attention(q, k, v))
    assert not NestedAttention.needs_probs


def test_outer_softmax_unchanged():
    """The probabilities recorded at the site with Nested Attention composed after a
    recorder are equal to those without it (the outer softmax over the text tokens is not
    touched), and the op gives the same output whether it reads the materialised
    probabilities or computes the s* column itself. Breaks if the op edited the
    probabilities or its own column of them disagreed with the softmax."""
    layout = Layout(groups=1, members=1, cfg=True)
    q, k, v = _inputs(2, seed=30)
    kn, vn = _rand(31, 1, 1, R, N, H), _rand(32, 1, 1, R, N, H)
    nest = nested_policy(SITES, {CROSS.path: kn}, {CROSS.path: vn}, np.array([[4]]),
                         layout=layout, context_tokens=S)
    rec = resolve([({"kind": "cross"}, RecordProbs())], SITES, layout=layout, context_tokens=S)
    _, aux_plain = attend(CROSS, q, k, v, rec, jnp.int32(0))
    out_both, aux_both = attend(CROSS, q, k, v, compose(rec, nest), jnp.int32(0))
    np.testing.assert_array_equal(aux_both["0"]["p"], aux_plain["0"]["p"])
    out_nest, _ = attend(CROSS, q, k, v, nest, jnp.int32(0))
    np.testing.assert_allclose(out_both, out_nest, atol=2e-6)


def test_new_values_do_not_retrace():
    """New nested keys/values, positions and λ are array leaves: a jitted attention call
    traces once. Breaks if any of them became static."""
    layout = Layout(groups=1, members=1, cfg=True)
    q, k, v = _inputs(2, seed=40)
    count = {"n": 0}

    @jax.jit
    def run(pol):
        count["n"] += 1
        return attend(CROSS, q, k, v, pol, jnp.int32(0))[0]

    for seed, p, lam in ((41, 2, 1.0), (42, 5, 0.5), (43, -1, 0.9)):
        pol = nested_policy(SITES, {CROSS.path: _rand(seed, 1, 1, R, N, H)},
                            {CROSS.path: _rand(seed + 9, 1, 1, R, N, H)}, np.array([[p]]),
                            scale=lam, layout=layout, context_tokens=S)
        run(pol)
    assert count["n"] == 1


def test_errors():
    """Clear errors: keys for a site the model lacks or a self-attention site, keys and
    values for different sites, shapes disagreeing with positions."""
    kn = _rand(0, 1, 1, R, N, H)
    with pytest.raises(PolicyError, match="not cross-attention sites"):
        nested_policy(SITES, {SELF.path: kn}, {SELF.path: kn}, np.array([[1]]))
    with pytest.raises(PolicyError, match="different sites"):
        nested_policy(SITES, {CROSS.path: kn}, {SELF.path: kn}, np.array([[1]]))
    with pytest.raises(PolicyError, match="do not match positions"):
        nested_policy(SITES, {CROSS.path: kn}, {CROSS.path: kn}, np.array([[1, 2]]))


def test_gradients_reach_nested_keys_and_values():
    """Training differentiates through the op: the gradient of the output w.r.t. K̃ and Ṽ
    is finite, non-zero for a row with a subject and exactly zero for a row without one.
    Breaks if the where-masking let absent slots train or the op stopped gradients."""
    layout = Layout(groups=2, members=1, cfg=False)
    q, k, v = _inputs(2, seed=60)
    kn, vn = _rand(61, 2, 1, R, N, H), _rand(62, 2, 1, R, N, H)
    pos = np.array([[3], [-1]], np.int32)

    def loss(kn, vn):
        pol = nested_policy(SITES, {CROSS.path: kn}, {CROSS.path: vn}, pos, layout=layout,
                            context_tokens=S)
        return jnp.sum(attend(CROSS, q, k, v, pol, jnp.int32(0))[0] ** 2)

    gk, gv = jax.grad(loss, argnums=(0, 1))(kn, vn)
    for g in (gk, gv):
        assert bool(jnp.all(jnp.isfinite(g)))
        assert float(jnp.abs(g[0]).max()) > 1e-6
        assert float(jnp.abs(g[1]).max()) == 0.0
