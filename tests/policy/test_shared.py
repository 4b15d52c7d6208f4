"""Attention-sharing ops of jattn/policy/shared.py against NumPy restatements of the
references (StyleAligned's adain / concat_first / shifted attention, ConsiStory's extended
attention mask), mask dropout batch invariance, windows, and through the tiny UNet."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.models.attention import AttentionSite
from jattn.models.attention import default_attention as _default_attention
from jattn.policy.core import Layout, Op, Policy, PolicyError, Select, SiteContext, resolve
from jattn.policy.ops import member_table
from jattn.policy.shared import (AdaIN, AuxMask, GivenMask, SharedAttention, drop_mask,
                                 shared_table)

SITE = AttentionSite("up_blocks.1.attentions.0.transformer_blocks.0.attn1", "self", (4, 4), 2,
                     3, "up")
T = 16


def _qkv(layout, seed=0, t=T):
    rng = np.random.default_rng(seed)
    return tuple((rng.standard_normal((layout.rows, t, 2, 3)) * (1 + i)).astype(np.float32)
                 for i in range(3))


default_attention = jax.jit(_default_attention)
drop_mask_jit = jax.jit(drop_mask, static_argnums=(4,))


@jax.jit
def _attend_jit(pol, q, k, v, step):
    return pol.attend(SITE, q, k, v, step)[0]


def _attend(ops, layout, q, k, v, step=0):
    pol = resolve([(Select(), ops)], [SITE], layout=layout)
    return np.asarray(_attend_jit(pol, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                  jnp.int32(step)))


# ---------------------------------------------------------------- NumPy restatements
# torch layout (b, heads, tokens, d); batch [uncond M; cond M] of ONE group (the reference)

def _t(x):                      # ours (B, T, N, H) -> reference (B, N, T, H)
    return np.transpose(x, (0, 2, 1, 3)).astype(np.float64)


def ref_expand_first(feat, scale=1.0):
    b = feat.shape[0]
    style = np.stack([feat[0], feat[b // 2]])[:, None]
    style = np.repeat(style, b // 2, axis=1)
    if scale != 1.0:
        style = np.concatenate([style[:, :1], scale * style[:, 1:]], axis=1)
    return style.reshape(feat.shape)


def ref_adain(feat, eps=1e-5):
    mean = feat.mean(axis=-2, keepdims=True)
    std = np.sqrt(feat.var(axis=-2, ddof=1, keepdims=True) + eps)
    return (feat - mean) / std * ref_expand_first(std) + ref_expand_first(mean)


def ref_style_aligned(q, k, v, scale=1.0, shift=0.0, adain_q=True, adain_k=True):
    q, k, v = _t(q), _t(k), _t(v)
    if adain_q:
        q = ref_adain(q)
    if adain_k:
        k = ref_adain(k)
    k = np.concatenate([k, ref_expand_first(k, scale)], axis=-2)
    v = np.concatenate([v, ref_expand_first(v)], axis=-2)
    logits = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits[..., q.shape[2]:] += shift
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.transpose(np.einsum("bhqk,bhkd->bhqd", p, v), (0, 2, 1, 3))


def ref_consistory(q, k, v, masks):
    """NVlabs/consistory extended attention: row i of each half attends to every member
    j's tokens of its half where j == i or masks[j] (extended_mapping all True)."""
    q, k, v = _t(q), _t(k), _t(v)
    b = q.shape[0]
    m = b // 2
    out = np.zeros_like(q)
    for i in range(b):
        half = slice(0, m) if i < m else slice(m, b)
        allowed = np.concatenate([np.ones(masks.shape[1], bool) if j == i % m else masks[j]
                                  for j in range(m)])
        kk = np.concatenate(list(k[half]), axis=-2)[:, allowed]      # (heads, S', d)
        vv = np.concatenate(list(v[half]), axis=-2)[:, allowed]
        logits = np.einsum("hqd,hkd->hqk", q[i], kk) / np.sqrt(q.shape[-1])
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[i] = np.einsum("hqk,hkd->hqd", p, vv)
    return np.transpose(out, (0, 2, 1, 3))


# ---------------------------------------------------------------- AdaIN, StyleAligned

def test_adain_matches_reference():
    layout = Layout(groups=1, members=3, cfg=True)
    q, k, v = _qkv(layout)
    table = jnp.asarray(member_table(1, 3, {1: 0, 2: 0}))
    q2, k2, v2 = jax.jit(lambda op, *x: op.qkv(SiteContext(SITE, jnp.int32(0), layout), *x))(
        AdaIN(q_from=table, k_from=table), jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    want = np.transpose(ref_adain(_t(q)), (0, 2, 1, 3))
    np.testing.assert_allclose(q2, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(k2, np.transpose(ref_adain(_t(k)), (0, 2, 1, 3)), rtol=1e-5,
                               atol=1e-5)
    # the source rows (member 0 of each half) are untouched bit for bit; V is not touched
    np.testing.assert_array_equal(np.asarray(q2)[[0, 3]], q[[0, 3]])
    np.testing.assert_array_equal(v2, v)


@pytest.mark.parametrize("scale,shift", [(1.0, None), (1.0, float(np.log(2))), (0.5, 0.7)])
def test_style_aligned_shared_attention_matches_reference(scale, shift):
    """AdaIN(Q, K) + concat[own; member 0] with score scale and shift, every member of both
    halves (member 0 too: the reference's [own; own] gives its plain attention)."""
    layout = Layout(groups=1, members=3, cfg=True)
    q, k, v = _qkv(layout, seed=1)
    table = jnp.asarray(member_table(1, 3, {1: 0, 2: 0}))
    op = SharedAttention(sources=jnp.asarray(shared_table(1, 3, "first")),
                         k_scale=None if scale == 1.0 else jnp.float32(scale),
                         shift=None if shift is None else jnp.float32(shift))
    assert (op.logit_bias(SiteContext(SITE, None, layout), None,
                          jnp.zeros((6, 2 * T, 2, 3))) is None) == (shift is None)
    got = _attend((AdaIN(q_from=table, k_from=table), op), layout, q, k, v)
    want = ref_style_aligned(q, k, v, scale=scale, shift=shift or 0.0)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_groups_are_independent():
    """Two groups: each group equals the reference run on that group alone."""
    layout = Layout(groups=2, members=2, cfg=True)
    q, k, v = _qkv(layout, seed=2)
    table = jnp.asarray(member_table(1, 2, {1: 0}))
    ops = (AdaIN(q_from=table, k_from=table),
           SharedAttention(sources=jnp.asarray(shared_table(1, 2, "first")),
                           shift=jnp.float32(0.3)))
    got = _attend(ops, layout, q, k, v)
    for g in range(2):
        rows = [g * 2, g * 2 + 1, 4 + g * 2, 4 + g * 2 + 1]          # (half, group, member)
        want = ref_style_aligned(q[rows], k[rows], v[rows], shift=0.3)
        np.testing.assert_allclose(got[rows], want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shift", [None, 0.5])
def test_outside_the_window_is_plain_attention(shift):
    """Steps outside the window: all slots off; the source rows at every step: plain
    attention bit for bit, on the fused path (duplicated keys) and on the bias path (-inf
    columns) alike (SharedAttention.edit_output selects the fused plain attention for
    them; breaks if it stops doing so or the rows' Q, K, V are touched)."""
    layout = Layout(groups=1, members=3, cfg=True)
    q, k, v = _qkv(layout, seed=3)
    table = shared_table(10, 3, "first", window=(2, 5))
    ops = (AdaIN(q_from=jnp.asarray(table[..., 0]), k_from=jnp.asarray(table[..., 0])),
           SharedAttention(sources=jnp.asarray(table), k_scale=jnp.float32(0.8),
                           shift=None if shift is None else jnp.float32(shift)))
    plain = np.asarray(default_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)))
    for step in (0, 1, 5, 9):
        np.testing.assert_array_equal(_attend(ops, layout, q, k, v, step), plain)
    inside = _attend(ops, layout, q, k, v, 3)
    assert np.abs(inside[[1, 2, 4, 5]] - plain[[1, 2, 4, 5]]).max() > 1e-3
    np.testing.assert_array_equal(inside[[0, 3]], plain[[0, 3]])
    masked = SharedAttention(sources=jnp.asarray(table), own=False, match_query=True,
                             mask=GivenMask(jnp.ones((3, 4, 4), jnp.float32)))
    np.testing.assert_array_equal(_attend(masked, layout, q, k, v, 3)[[0, 3]], plain[[0, 3]])


def test_full_attention_share_and_replace():
    """sources='all' = every member attends to every member of its half (StyleAligned's
    full_attention_share, plain attention over the half's concatenated tokens);
    own=False = the source's K, V only (MasaCtrl), member 0 bit-identical."""
    layout = Layout(groups=1, members=3, cfg=True)
    q, k, v = _qkv(layout, seed=4)
    got = _attend(SharedAttention(sources=jnp.asarray(shared_table(1, 3, "all"))), layout,
                  q, k, v)
    want = ref_consistory(q, k, v, np.ones((3, T), bool))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    rep = _attend(SharedAttention(sources=jnp.asarray([0, 0, 0], jnp.int32), own=False),
                  layout, q, k, v)
    plain = np.asarray(default_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)))
    np.testing.assert_array_equal(rep[[0, 3]], plain[[0, 3]])
    src = np.asarray(default_attention(jnp.asarray(q), jnp.asarray(k[[0, 0, 0, 3, 3, 3]]),
                                       jnp.asarray(v[[0, 0, 0, 3, 3, 3]])))
    np.testing.assert_allclose(rep, src, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- masked sharing, dropout

def test_masked_sharing_matches_consistory():
    layout = Layout(groups=1, members=3, cfg=True)
    q, k, v = _qkv(layout, seed=5)
    rng = np.random.default_rng(6)
    masks = rng.random((3, 4, 4)) > 0.5
    op = SharedAttention(sources=jnp.asarray(shared_table(1, 3, "all")),
                         mask=GivenMask(jnp.asarray(masks)))
    got = _attend(op, layout, q, k, v)
    np.testing.assert_allclose(got, ref_consistory(q, k, v, masks.reshape(3, -1)),
                               rtol=2e-5, atol=2e-5)


def test_masked_replace_limits_to_the_source_foreground():
    """own=False with a mask: the target attends to member 0's foreground tokens only
    (MasaCtrl's masked variant); an empty mask falls back to the whole source."""
    layout = Layout(groups=1, members=2, cfg=False)
    q, k, v = _qkv(layout, seed=7)
    fg = np.zeros((2, 4, 4), bool)
    fg[0, :2] = True
    op = SharedAttention(sources=jnp.asarray([0, 0], jnp.int32), own=False,
                         mask=GivenMask(jnp.asarray(fg)))
    got = _attend(op, layout, q, k, v)
    sel = fg[0].reshape(-1)
    want = default_attention(jnp.asarray(q[1:]), jnp.asarray(k[:1, sel]), jnp.asarray(v[:1, sel]))
    np.testing.assert_allclose(got[1:], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[:1], default_attention(*(jnp.asarray(x[:1]) for x in (q, k, v))),
                               rtol=1e-5, atol=1e-6)
    empty = SharedAttention(sources=jnp.asarray([0, 0], jnp.int32), own=False,
                            mask=GivenMask(jnp.zeros((2, 4, 4))))
    whole = default_attention(jnp.asarray(q[1:]), jnp.asarray(k[:1]), jnp.asarray(v[:1]))
    np.testing.assert_allclose(_attend(empty, layout, q, k, v)[1:], whole, rtol=1e-5, atol=1e-6)


def test_match_query_is_masactrl_foreground_background_blend():
    """MasaCtrl's mask variant (MutualSelfAttentionControlMask): the target's output is
    attention to the source's foreground times the target's mask plus attention to the
    source's background times (1 - mask); here one attention restricted per query row."""
    layout = Layout(groups=1, members=2, cfg=True)
    q, k, v = _qkv(layout, seed=12)
    rng = np.random.default_rng(13)
    masks = rng.random((2, 4, 4)) > 0.5                               # source 0, target 1
    op = SharedAttention(sources=jnp.asarray([0, 0], jnp.int32), own=False,
                         mask=GivenMask(jnp.asarray(masks)), match_query=True)
    got = _attend(op, layout, q, k, v)
    fs, ft = masks[0].reshape(-1), masks[1].reshape(-1)
    for tgt, src in ((1, 0), (3, 2)):                                 # both halves
        qq = jnp.asarray(q[tgt:tgt + 1])
        fg = default_attention(qq, jnp.asarray(k[src:src + 1, fs]), jnp.asarray(v[src:src + 1, fs]))
        bg = default_attention(qq, jnp.asarray(k[src:src + 1, ~fs]),
                               jnp.asarray(v[src:src + 1, ~fs]))
        want = np.where(ft[None, :, None, None], fg, bg)
        np.testing.assert_allclose(got[tgt:tgt + 1], want, rtol=1e-5, atol=1e-6)
    plain = default_attention(*(jnp.asarray(x[[0, 2]]) for x in (q, k, v)))
    np.testing.assert_allclose(got[[0, 2]], plain, rtol=1e-5, atol=1e-6)


def test_mask_dropout_is_per_group_and_step():
    """Group g's dropped mask depends on its own key and the step only (batch-invariant),
    drops about p of the tokens, changes with the step, and p = 0 drops nothing."""
    rng = np.random.default_rng(8)
    mask = jnp.asarray(rng.random((2, 3, 256)) > 0.2)
    both = drop_mask_jit(mask, 0.5, jnp.asarray([11, 22]), jnp.int32(3), salt=16)
    alone = drop_mask_jit(mask[1:], 0.5, jnp.asarray([22]), jnp.int32(3), salt=16)
    np.testing.assert_array_equal(both[1:], alone)
    kept = float(both.sum() / mask.sum())
    assert 0.4 < kept < 0.6
    assert not np.array_equal(drop_mask_jit(mask, 0.5, jnp.asarray([11, 22]), jnp.int32(4), 16), both)
    np.testing.assert_array_equal(drop_mask_jit(mask, 0.0, jnp.asarray([11, 22]), jnp.int32(3), 16), mask)
    assert not np.any(np.asarray(both) & ~np.asarray(mask))


def test_dropout_through_the_op_is_batch_invariant():
    layout2, layout1 = Layout(groups=2, members=3, cfg=True), Layout(groups=1, members=3, cfg=True)
    q, k, v = _qkv(layout2, seed=9)
    masks = np.random.default_rng(10).random((2, 3, 4, 4))

    def op(m, keys):
        return SharedAttention(sources=jnp.asarray(shared_table(1, 3, "all")),
                               mask=GivenMask(jnp.asarray(m)), dropout=jnp.float32(0.5),
                               keys=jnp.asarray(keys, jnp.uint32))

    got2 = _attend(op(masks, [5, 6]), layout2, q, k, v, step=2)
    rows = [3, 4, 5, 9, 10, 11]                                       # group 1, both halves
    got1 = _attend(op(masks[1:], [6]), layout1, q[rows], k[rows], v[rows], step=2)
    np.testing.assert_allclose(got2[rows], got1, rtol=1e-6, atol=1e-6)
    other = _attend(op(masks, [5, 7]), layout2, q, k, v, step=2)
    np.testing.assert_array_equal(other[[0, 1, 2, 6, 7, 8]], got2[[0, 1, 2, 6, 7, 8]])


def test_errors():
    with pytest.raises(PolicyError, match="halves"):
        SharedAttention(sources=jnp.zeros(3, jnp.int32), halves="all")
    with pytest.raises(PolicyError, match="dropout"):
        SharedAttention(sources=jnp.zeros(3, jnp.int32), dropout=jnp.float32(0.5))
    with pytest.raises(PolicyError, match="match_query needs a mask"):
        SharedAttention(sources=jnp.zeros(3, jnp.int32), match_query=True)
    with pytest.raises(PolicyError, match="exclude_off"):
        SharedAttention(sources=jnp.asarray(shared_table(1, 3, {1: [0, 2], 2: [0]})))
    SharedAttention(sources=jnp.asarray(shared_table(1, 3, {1: [0, 2], 2: [0]})),
                    exclude_off=True)
    with pytest.raises(PolicyError, match="one source slot"):
        SharedAttention(sources=jnp.asarray(shared_table(1, 3, "all")), own=False)
    with pytest.raises(ValueError, match="no member has a source"):
        shared_table(4, 1, "first")
    with pytest.raises(ValueError, match="lists itself"):
        shared_table(4, 2, {1: 1})
    with pytest.raises(ValueError, match="window"):
        shared_table(4, 2, "first", window=(0.5, 1.5))
    lay = Layout(groups=1, members=3, cfg=True)
    q, k, v = _qkv(lay)
    with pytest.raises(PolicyError, match="mask of shape"):
        _attend(SharedAttention(sources=jnp.asarray(shared_table(1, 3, "all")),
                                mask=GivenMask(jnp.ones((2, 4, 4)))), lay, q, k, v)
    with pytest.raises(PolicyError, match="AuxMask"):
        _attend(SharedAttention(sources=jnp.asarray(shared_table(1, 3, "all")),
                                mask=AuxMask(op_index=0)), lay, q, k, v)


def test_shared_table():
    t = shared_table(10, 3, {1: 0, 2: [0, 1]}, window=(0.2, 0.5))
    assert t.dtype == np.int32 and t.shape == (10, 3, 2)
    np.testing.assert_array_equal(t[0], [[0, 0], [1, 1], [2, 2]])
    np.testing.assert_array_equal(t[3], [[0, 0], [0, 1], [0, 1]])
    np.testing.assert_array_equal(shared_table(2, 3, "all")[0], [[1, 2], [0, 2], [0, 1]])


# ---------------------------------------------------------------- mask from an accumulator

class _Producer(Op):
    pass


def test_aux_mask_is_bound_from_the_accumulators():
    """The sampler binds AuxMask to the accumulators before each UNet call (the previous
    step's): a toy UNet reads the bound mask."""
    from jattn.sampling import schedulers as sch
    from jattn.sampling.sampler import sample

    op = SharedAttention(sources=jnp.asarray(shared_table(1, 2, "all")),
                         mask=AuxMask(op_index=0, key="m"))
    pol = Policy(ops=(_Producer(), op), layout=Layout(1, 2, False))
    seen = []

    def unet(x, t, ctx, policy, step):
        seen.append(policy.ops[1].mask.mask)
        return 0.0 * x + jnp.sum(policy.ops[1].mask.mask), {}

    schedule = sch.make_schedule(sch.SchedulerConfig(kind="ddim"), 3)
    acc0 = ({"m": jnp.zeros((2, 4, 4))}, None)
    upd = lambda acc, aux, i: ({"m": acc[0]["m"] + 1.0}, None)        # noqa: E731
    x0 = jnp.zeros((2, 4, 4, 1))
    keys = jax.random.split(jax.random.key(0), 2)
    out, acc = sample(unet, schedule, x0, jnp.zeros((2, 3, 5)), None, 1.0, keys, policy=pol,
                      aux_init=acc0, aux_update=upd)
    assert float(acc[0]["m"][0, 0, 0]) == 3.0
    assert len(seen) == 1                                             # traced once (scan)


# ---------------------------------------------------------------- through the UNet

@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd_dir):
    import jattn

    return jattn.load(tiny_sd_dir)


def test_style_aligned_through_the_unet(tiny_pipe):
    """AdaIN + shared attention at every self site, one compiled program: member 0 stays
    what it is with sharing off (its plain generation, to float32 rounding: it attends to
    [own; own]; off = plain attention is test_outside_the_window_is_plain_attention);
    member 1 changes; new tables, shift and masks never recompile."""
    sites = tiny_pipe.sites()
    layout = Layout(groups=1, members=2, cfg=True)
    kw = dict(num_inference_steps=3, guidance_scale=7.5, seed=0, decode=False)
    prompts = ["a red circle", "a blue square"]

    def run(window, shift, mask):
        t = shared_table(3, 2, "first", window=window)
        ops = (AdaIN(q_from=jnp.asarray(t[..., 0]), k_from=jnp.asarray(t[..., 0])),
               SharedAttention(sources=jnp.asarray(t), shift=jnp.float32(shift),
                               mask=GivenMask(jnp.asarray(mask, jnp.float32))))
        pol = resolve([(Select(kind="self"), ops)], sites, layout=layout)
        return tiny_pipe.generate(prompts, policy=pol, **kw)

    shared = run((0, 3), 0.5, np.ones((2, 8, 8)))
    n = tiny_pipe.trace_counts["sample"]
    off = run((0, 0), 0.0, np.zeros((2, 8, 8)))
    assert tiny_pipe.trace_counts["sample"] == n                      # values only
    np.testing.assert_allclose(shared.latents[0], off.latents[0], rtol=1e-4, atol=1e-4)
    assert np.abs(shared.latents[1] - off.latents[1]).max() > 1e-3
