"""The policy pytree core: rule resolution, composition, batch layout, the seam hook
(identity bit-identity, fused path), and the no-retrace contract of compiled P2P edits."""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

import jattn.policy.core as core
from jattn.models.attention import AttentionSite, attend, default_attention
from jattn.policy.core import Layout, Op, PolicyError, Select, compose, in_window, resolve

HEADS, HEAD_DIM = 2, 4


def _site(path, kind, res, block):
    return AttentionSite(path=path, kind=kind, resolution=(res, res), num_heads=HEADS,
                         head_dim=HEAD_DIM, block=block)


def _tb(prefix, attn):
    return f"{prefix}.transformer_blocks.0.{attn}"


# the sites of the tiny test pipeline (conftest's tiny_sd_dir), in call order
SITES = [
    _site(_tb("down_blocks.0.attentions.0", "attn1"), "self", 8, "down"),
    _site(_tb("down_blocks.0.attentions.0", "attn2"), "cross", 8, "down"),
    _site(_tb("mid_block.attentions.0", "attn1"), "self", 4, "mid"),
    _site(_tb("mid_block.attentions.0", "attn2"), "cross", 4, "mid"),
    _site(_tb("up_blocks.1.attentions.0", "attn1"), "self", 8, "up"),
    _site(_tb("up_blocks.1.attentions.0", "attn2"), "cross", 8, "up"),
    _site(_tb("up_blocks.1.attentions.1", "attn1"), "self", 8, "up"),
    _site(_tb("up_blocks.1.attentions.1", "attn2"), "cross", 8, "up"),
]


@struct.dataclass
class Scale(Op):
    """q := q * factor (an op that only changes where Q comes from: fused path)."""

    factor: jax.Array

    def qkv(self, ctx, q, k, v):
        return q * self.factor.astype(q.dtype), k, v


@struct.dataclass
class Shift(Op):
    """q := q + amount."""

    amount: jax.Array

    def qkv(self, ctx, q, k, v):
        return q + self.amount.astype(q.dtype), k, v


@struct.dataclass
class Noop(Op):
    """Touches a site and changes nothing (fused path, no record)."""


@struct.dataclass
class SourceKV(Op):
    """Shared-attention style: every member attends to member 0's keys/values (per half
    and group). Changes only Q/K/V, so the fused kernel must run."""

    def qkv(self, ctx, q, k, v):
        lay = ctx.layout
        k0 = jnp.broadcast_to(lay.split(k)[:, :, :1], lay.split(k).shape)
        v0 = jnp.broadcast_to(lay.split(v)[:, :, :1], lay.split(v).shape)
        return q, lay.merge(k0), lay.merge(v0)


@struct.dataclass
class Uniform(Op):
    """Replaces the probabilities by a uniform map (needs materialised probs)."""

    needs_probs = True

    def edit_probs(self, ctx, p):
        return jnp.full_like(p, 1.0 / p.shape[-1])


def _qkv(seed=0, b=2, t=64, s=64):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, HEADS, HEAD_DIM)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, s, HEADS, HEAD_DIM)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, s, HEADS, HEAD_DIM)), jnp.float32)
    return q, k, v


def _f(x=1.0):
    return jnp.asarray(x, jnp.float32)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd_dir):
    """The tiny random SD pipeline (conftest) loaded with jattn."""
    import jattn

    return jattn.load(tiny_sd_dir)


# ------------------------------------------------------------------------------ resolve


def test_first_matching_rule_wins():
    """Each site gets the ops of the FIRST rule that matches it; later rules only get the
    sites not taken yet. Breaks if rules were merged or the last rule won."""
    pol = resolve([(Select(kind="cross", blocks=("up",)), Scale(_f(2.0))),
                   ({"kind": "cross"}, Shift(_f(1.0))),
                   ("", Noop())], SITES)
    table = dict(pol.table)
    for s in SITES:
        if s.kind == "cross" and s.block == "up":
            assert table[s.path] == (0,)
        elif s.kind == "cross":
            assert table[s.path] == (1,)
        else:
            assert table[s.path] == (2,)
    assert pol.sites_of(0) == tuple(s for s in SITES if s.kind == "cross" and s.block == "up")
    assert pol.op_indices("not.a.site") == ()


def test_rule_with_several_ops_keeps_their_order():
    """A rule given a tuple of ops applies them in the given order at its sites."""
    pol = resolve([("attn2", (Scale(_f(2.0)), Shift(_f(1.0))))], SITES)
    assert {idx for _, idx in pol.table} == {(0, 1)}
    assert len(pol.table) == 4  # the cross sites only ('attn2' in the path)


def test_selector_forms_and_resolutions():
    """Selectors as regex strings, dicts and Select; resolutions as int or (h, w); blocks."""
    by_res = resolve([({"resolutions": (4,)}, Noop())], SITES)
    assert [p for p, _ in by_res.table] == [SITES[2].path, SITES[3].path]
    by_hw = resolve([(Select(resolutions=((8, 8),), kind="self"), Noop())], SITES)
    assert [p for p, _ in by_hw.table] == [SITES[0].path, SITES[4].path, SITES[6].path]
    by_block = resolve([({"blocks": ("mid", "down")}, Noop())], SITES)
    assert len(by_block.table) == 4
    by_regex = resolve([(r"up_blocks\.1\.attentions\.1\..*attn1$", Noop())], SITES)
    assert [p for p, _ in by_regex.table] == [SITES[6].path]


def test_selector_matching_no_site_raises_and_names_it():
    """A rule that matches no site is a user error (typo, wrong resolution) and must raise
    naming the selector, not silently do nothing."""
    with pytest.raises(PolicyError, match="down_blocks.7"):
        resolve([("attn2", Noop()), ("down_blocks.7", Noop())], SITES)
    with pytest.raises(PolicyError, match=r"resolutions=\(32,\)"):
        resolve([({"kind": "cross", "resolutions": (32,)}, Noop())], SITES)
    with pytest.raises(PolicyError, match="matches no attention site"):
        resolve([(Select(kind="self", blocks=("mid",), path="attn2"), Noop())], SITES)


def test_shadowed_rule_does_not_raise():
    """A rule whose sites were all taken by an earlier rule matches sites, so it does not
    raise (documented 'first rule wins'); it simply gets no site."""
    pol = resolve([("", Noop()), ({"kind": "cross"}, Scale(_f(2.0)))], SITES)
    assert {idx for _, idx in pol.table} == {(0,)}
    assert pol.sites_of(1) == ()


def test_unknown_selector_key_raises():
    """Unknown keys in a dict selector raise (and name the key) instead of being ignored."""
    with pytest.raises(PolicyError, match="paht"):
        resolve([({"paht": "attn2"}, Noop())], SITES)
    with pytest.raises(PolicyError, match="resolution"):
        resolve([({"kind": "cross", "resolution": 8}, Noop())], SITES)


@pytest.mark.parametrize("bad", [
    {"kind": "crosss"},
    {"blocks": ("upp",)},
    {"blocks": ("down", "middle")},
    {"path": "attn[2"},
])
def test_bad_selector_values_raise(bad):
    """Invalid kind, block names or a broken regex raise PolicyError at resolve time."""
    with pytest.raises(PolicyError):
        resolve([(bad, Noop())], SITES)


def test_bad_rule_shapes_raise():
    """A selector of the wrong type or a rule target that is not an Op raises."""
    with pytest.raises(PolicyError, match="selector"):
        resolve([(3, Noop())], SITES)
    with pytest.raises(PolicyError, match="not a jattn policy Op"):
        resolve([("attn2", lambda x: x)], SITES)


def test_empty_rules_give_empty_policy():
    pol = resolve([], SITES)
    assert pol.ops == () and pol.table == ()
    assert jax.tree_util.tree_leaves(pol) == []


# ------------------------------------------------------------------------------ compose


def test_compose_applies_policies_in_order():
    """At a site touched by both, compose(A, B) runs A's ops then B's: (q*2)+1, while
    compose(B, A) gives (q+1)*2. Sites touched by one policy get only its ops; op indices
    of B are offset by A's op count. Breaks if composition reorders or drops ops."""
    a = resolve([({"kind": "cross"}, Scale(_f(2.0)))], SITES)
    b = resolve([("attn2", Shift(_f(1.0))), ({"blocks": ("mid",)}, Noop())], SITES)
    ab, ba = compose(a, b), compose(b, a)
    cross = SITES[1]
    assert ab.op_indices(cross.path) == (0, 1)
    assert ba.op_indices(cross.path) == (0, 2)
    assert ab.op_indices(SITES[2].path) == (2,)  # mid self: only b's Noop
    assert ab.op_indices(SITES[0].path) == ()
    assert [p for p, _ in ab.table] == [s.path for s in SITES if s.path in dict(ab.table)]
    q, k, v = _qkv(1, t=64, s=77)
    out_ab, _ = attend(cross, q, k, v, ab, jnp.int32(0))
    out_ba, _ = attend(cross, q, k, v, ba, jnp.int32(0))
    np.testing.assert_array_equal(out_ab, default_attention(q * 2 + 1, k, v))
    np.testing.assert_array_equal(out_ba, default_attention((q + 1) * 2, k, v))
    assert not np.allclose(out_ab, out_ba)


def test_compose_errors():
    a = resolve([("attn2", Noop())], SITES, layout=Layout(1, 2))
    b = resolve([("attn2", Noop())], SITES, layout=Layout(1, 3))
    with pytest.raises(PolicyError, match="layouts"):
        compose(a, b)
    with pytest.raises(PolicyError):
        compose()
    assert compose(a, None).table == a.table


# ------------------------------------------------------------------------------ layout


def test_layout_split_merge_and_cond():
    """Row ``h·G·M + g·M + m`` is half h, group g, member m; merge inverts split; cond is
    the last half. Breaks if the group-major order or CFG halves were mixed up, which
    would make every member-relating op read the wrong image."""
    lay = Layout(groups=2, members=3, cfg=True)
    assert (lay.halves, lay.rows) == (2, 12)
    x = jnp.arange(12 * 5).reshape(12, 5)
    s = lay.split(x)
    assert s.shape == (2, 2, 3, 5)
    for h in range(2):
        for g in range(2):
            for m in range(3):
                np.testing.assert_array_equal(s[h, g, m], x[h * 6 + g * 3 + m])
    np.testing.assert_array_equal(lay.merge(s), x)
    np.testing.assert_array_equal(lay.cond(x), s[1])
    nocfg = Layout(groups=2, members=3, cfg=False)
    assert nocfg.rows == 6 and nocfg.split(x[:6]).shape == (1, 2, 3, 5)
    with pytest.raises(PolicyError, match="12 rows"):
        nocfg.split(x)


def test_in_window():
    w = jnp.asarray([2, 5], jnp.int32)
    assert [bool(in_window(jnp.int32(i), w)) for i in range(7)] == [
        False, False, True, True, True, False, False]
    assert bool(in_window(None, w))


# ------------------------------------------------------------------------------ the seam


def test_identity_and_empty_policy_bit_identical_at_the_seam():
    """No policy, an empty policy and a policy whose op changes nothing all give the
    bit-identical fused-kernel output (the design's identity rule)."""
    q, k, v = _qkv(2, t=64, s=77)
    cross = SITES[1]
    ref, aux = attend(cross, q, k, v, None, jnp.int32(0))
    assert aux == {}
    empty = resolve([], SITES)
    noop = resolve([("", Noop())], SITES)
    for pol in (empty, noop):
        out, aux = attend(cross, q, k, v, pol, jnp.int32(3))
        np.testing.assert_array_equal(out, ref)
        assert aux == {}


def test_fused_path_when_no_op_needs_probs(monkeypatch):
    """An op that only changes Q/K/V (member 0's K/V for every member) runs the fused
    kernel: no logits are materialised (attention_logits would raise) and the output is
    bit-identical to the fused kernel on the rewritten K/V. An op that needs probs goes the
    materialised path. Breaks if the seam always materialises probabilities (memory) or
    mis-wires the Q/K/V stage."""
    lay = Layout(groups=2, members=2, cfg=True)
    q, k, v = _qkv(3, b=lay.rows, t=64, s=64)
    self_site = SITES[0]
    pol = resolve([({"kind": "self"}, SourceKV())], SITES, layout=lay)
    calls = []

    def forbidden(*a, **kw):
        calls.append(1)
        raise AssertionError("attention logits materialised on the fused path")

    monkeypatch.setattr(core, "attention_logits", forbidden)
    out, aux = attend(self_site, q, k, v, pol, jnp.int32(0))
    assert not calls and aux == {}
    k0 = lay.merge(jnp.broadcast_to(lay.split(k)[:, :, :1], lay.split(k).shape))
    v0 = lay.merge(jnp.broadcast_to(lay.split(v)[:, :, :1], lay.split(v).shape))
    np.testing.assert_array_equal(out, default_attention(q, k0, v0))
    # member 0 of each group/half attends to itself: unchanged
    np.testing.assert_array_equal(lay.split(out)[:, :, 0],
                                  lay.split(default_attention(q, k, v))[:, :, 0])
    monkeypatch.undo()
    probs_pol = resolve([({"kind": "self"}, Uniform())], SITES, layout=lay)
    out_u, _ = attend(self_site, q, k, v, probs_pol, jnp.int32(0))
    np.testing.assert_allclose(out_u, jnp.broadcast_to(v.mean(1, keepdims=True), v.shape),
                               atol=1e-6)


@struct.dataclass
class TokenValue(Op):
    """edit_output: replace key token ``j``'s value by a per-query value ``w`` (B, T, N, H)
    through the probabilities: ``out + p[..., j] * (w - v_j)`` (the shape of Nested
    Attention's per-query value)."""

    j: int = struct.field(pytree_node=False)
    w: jax.Array
    needs_probs = True

    def edit_output(self, ctx, out, p, q, k, v):
        pj = jnp.moveaxis(p[..., self.j], 1, 2)[..., None]          # (B, T, N, 1)
        return out + pj * (self.w - v[:, self.j][:, None])


@struct.dataclass
class AddOut(Op):
    """edit_output without probabilities: out + c (fused path kept)."""

    c: jax.Array

    def edit_output(self, ctx, out, p, q, k, v):
        assert p is None
        return out + self.c


def test_edit_output_stage():
    """The fifth stage: an op replacing token j's value by a per-query value through
    ``edit_output`` equals attention with that value substituted row by row (NumPy); the
    stage runs after edit_probs on the edited probabilities; ops compose in rule order;
    without probabilities it gets p=None on the fused path. Breaks if the stage is not
    wired, runs before edit_probs, or ignores ops after the first."""
    q, k, v = _qkv(5, b=2, t=64, s=7)
    cross = SITES[1]
    w = jnp.asarray(np.random.default_rng(6).standard_normal(q.shape), jnp.float32)
    pol = resolve([("", TokenValue(j=3, w=w))], SITES)
    out, _ = attend(cross, q, k, v, pol, jnp.int32(0))
    qn, kn, vn, wn = (np.asarray(a, np.float64) for a in (q, k, v, w))
    logits = np.einsum("btnh,bsnh->bnts", qn, kn) / np.sqrt(HEAD_DIM)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    vt = np.broadcast_to(vn[:, None], (2, 64, 7, HEADS, HEAD_DIM)).copy()  # b t s n h
    vt[:, :, 3] = wn
    ref = np.einsum("bnts,btsnh->btnh", p, vt)
    np.testing.assert_allclose(out, ref, atol=2e-5)
    # after edit_probs: uniform probabilities, then token 3's value replaced
    both = resolve([("", [Uniform(), TokenValue(j=3, w=w)])], SITES)
    out2, _ = attend(cross, q, k, v, both, jnp.int32(0))
    ref2 = np.einsum("bnts,btsnh->btnh", np.full_like(p, 1 / 7), vt)
    np.testing.assert_allclose(out2, ref2, atol=2e-5)
    # fused path: p is None, two ops in order
    add = resolve([("", [AddOut(c=_f(1.0)), AddOut(c=_f(2.0))])], SITES)
    out3, _ = attend(cross, q, k, v, add, jnp.int32(0))
    np.testing.assert_allclose(out3, default_attention(q, k, v) + 3.0, atol=1e-6)


def test_policy_output_shape_checked():
    """A policy returning a wrongly shaped output is caught at the seam."""

    class Bad:
        def attend(self, site, q, k, v, step, *, upcast):
            return q[:, :1], {}

    q, k, v = _qkv(4, t=64, s=77)
    with pytest.raises(ValueError, match="policy returned shape"):
        attend(SITES[1], q, k, v, Bad(), None)


def test_identity_policy_bit_identical_through_unet(tiny_pipe):
    """Through the (jitted) tiny UNet: empty policy and a Noop at every site give
    bit-identical eps to no policy. Breaks if the policy plumbing perturbs the computation
    when it should not (the compose test shows a real op does change the output)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    t = jnp.asarray([10.0, 500.0], jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 77, 32)), jnp.float32)
    fn = jax.jit(tiny_pipe.unet_fn(tiny_pipe.params["unet"]))
    sites = tiny_pipe.sites()
    ref, aux = fn(x, t, ctx, None, jnp.int32(0))
    assert aux == {}
    for pol in (resolve([], sites), resolve([("", Noop())], sites)):
        out, aux = fn(x, t, ctx, pol, jnp.int32(0))
        np.testing.assert_array_equal(out, ref)
        assert aux == {}


# ------------------------------------------------------------------------------ retracing

P2P_BASE = dict(num_inference_steps=2, guidance_scale=7.5, self_max_tokens=16,
                self_replace_steps=0.5, cross_replace_steps=0.8,
                equalize={"blue": 2.0}, blend_words=["circle"], subtract_words=["a"],
                start_blend=0.0, capture=True)


def test_p2p_edit_does_not_retrace_on_new_values(tiny_pipe):
    """A compiled P2P edit is reused when only array values change: prompts (same count
    and mode), equalizer values, cross/self step windows, blend and subtract words (the
    masks), thresholds and the blend start. The pipeline counts traces of its sampler;
    any recompile here means a value leaked into the static structure."""
    from jattn.methods.p2p import edit

    out = edit(tiny_pipe, "a red circle", ["a blue circle"], seed=0, **P2P_BASE)
    assert out.images.shape == (2, 16, 16, 3)
    before = dict(tiny_pipe.trace_counts)
    variants = [
        dict(source="a green circle", targets=["a blue circle"]),
        dict(equalize={"blue": -1.0}),
        dict(cross_replace_steps=0.3, self_replace_steps=(0.5, 1.0)),
        # int(2 * 0.4) = 0: an empty self window is a value, not a structure change
        dict(self_replace_steps=0.4),
        dict(cross_replace_steps={"default_": 1.0, "blue": 0.4}),
        dict(source="a red square", targets=["a blue square"], blend_words=["square"],
             subtract_words=["red"]),
        dict(blend_threshold=0.6, start_blend=0.5),
    ]
    for change in variants:
        kw = dict(P2P_BASE, source="a red circle", targets=["a blue circle"], seed=1)
        kw.update(change)
        edit(tiny_pipe, kw.pop("source"), kw.pop("targets"), **kw)
        assert tiny_pipe.trace_counts == before, change


def test_p2p_edit_retraces_on_new_structure(tiny_pipe):
    """A different number of targets (batch layout) or mode (op structure) is a new
    program: the trace counter must see it (proves the no-retrace test can fail)."""
    from jattn.methods.p2p import edit

    edit(tiny_pipe, "a red circle", ["a blue circle"], seed=0, **P2P_BASE)
    n = tiny_pipe.trace_counts["sample"]
    edit(tiny_pipe, "a red circle", ["a blue circle", "a blue square"], seed=0, **P2P_BASE)
    assert tiny_pipe.trace_counts["sample"] == n + 1


def test_self_replace_via_queries_and_keys_equals_replacing_maps(tiny_pipe):
    """P2P self replacement done by handing the targets the source's queries and keys (the
    fused path) gives the same edit as replacing the materialised maps."""
    from jattn.methods.p2p import p2p_policy
    from jattn.methods.p2p_ops import SelfReplace
    prompts = ["a red circle", "a blue circle", "a green circle"]
    pol = p2p_policy(tiny_pipe, prompts[0], prompts[1:], num_steps=3, self_max_tokens=64,
                     self_replace_steps=(0.0, 0.7))
    ops = [o for o in pol.ops if isinstance(o, SelfReplace)]
    assert ops and all(o.via_qkv and not o.needs_probs for o in ops)
    maps_pol = dataclasses.replace(pol, ops=tuple(
        dataclasses.replace(o, via_qkv=False) if isinstance(o, SelfReplace) else o
        for o in pol.ops))
    kw = dict(num_inference_steps=3, guidance_scale=7.5, seed=0)
    a = tiny_pipe.generate(prompts, policy=pol, **kw)
    b = tiny_pipe.generate(prompts, policy=maps_pol, **kw)
    # fused and materialised softmax differ by float rounding only (every row, source too)
    np.testing.assert_allclose(a.latents, b.latents, rtol=0, atol=1e-5 * np.abs(b.latents).max())
    c = tiny_pipe.generate(prompts, **kw)  # and the replacement did something
    assert np.abs(a.latents[1:] - c.latents[1:]).max() > 1e-3
