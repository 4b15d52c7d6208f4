"""StyleAligned (jattn.methods.style_aligned) on the tiny random pipeline: the policy on SD1
and SD2 configs, one shared self-attention site and one shared GroupNorm site against
NumPy restatements of google/style-aligned's ``sa_handler.py``, the reference member left
as plain generation, the reference image's re-imposed trajectory, no recompilation for new
prompts/scale/shift, and the compositions StyleAligned + Prompt-to-Prompt and + FreeU."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import jattn
from jattn.methods import style_aligned as sa
from jattn.policy.core import compose
from jattn.policy.features import SharedGroupNorm
from jattn.policy.shared import AdaIN, SharedAttention

P3 = ["a red circle", "a blue square", "a green heart"]
N = 3  # steps


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    return jattn.load(tiny_sd_dir)


@pytest.fixture(scope="module")
def runs(pipe):
    """Programs shared by the tests: StyleAligned (shift log 2), plain, same batch and seed."""
    kw = dict(num_inference_steps=N, seed=5, decode=False)
    return {"sa": sa.style_aligned(pipe, P3, shared_score_shift=float(np.log(2)), **kw),
            "plain": sa.style_aligned(pipe, P3, share=False, **kw)}


# ------------------------------------------------------------------- the policy
@pytest.mark.parametrize("sd2", [False, True])
def test_policy_resolves_on_sd1_and_sd2(tmp_path, sd2, pipe):
    """Every self-attention site gets AdaIN(q, k toward member 0) + SharedAttention (member 0's
    slot off), every GroupNorm site SharedGroupNorm(member 0); no cross site is touched."""
    if sd2:
        from conftest import _tiny_diffusers_pipeline

        _tiny_diffusers_pipeline(seed=1, sd2=True).save_pretrained(tmp_path,
                                                                   safe_serialization=True)
        p = jattn.load(tmp_path)
    else:
        p = pipe
    pol = sa.style_aligned_policy(p, 4, 6, groups=2)
    sites = {s.path: s for s in p.sites(features=True)}
    touched = {path: [type(pol.ops[i]) for i in idx] for path, idx in pol.table}
    selfs = [s for s in sites.values() if getattr(s, "kind", "") == "self"]
    gns = [s for s in sites.values() if getattr(s, "kind", "") == "group_norm"]
    assert selfs and gns
    for s in selfs:
        assert touched[s.path] == [AdaIN, SharedAttention]
    for s in gns:
        assert touched[s.path] == [SharedGroupNorm]
    assert set(touched) == {s.path for s in selfs + gns}
    ada = next(o for o in pol.ops if isinstance(o, AdaIN))
    share = next(o for o in pol.ops if isinstance(o, SharedAttention))
    np.testing.assert_array_equal(np.asarray(ada.q_from)[0], [0, 0, 0, 0])
    assert ada.v_from is None and share.shift is None
    np.testing.assert_array_equal(np.asarray(share.sources)[:, :, 0], [[0, 0, 0, 0]] * 6)
    full = sa.style_aligned_policy(p, 3, 6, full_attention_share=True, share_group_norm=False,
                                   window=(0.5, 1.0))
    src = np.asarray(full.ops[0].sources)
    assert src.shape == (6, 3, 2) and (src[:3] == np.arange(3)[None, :, None]).all()
    np.testing.assert_array_equal(src[3], [[1, 2], [0, 2], [0, 1]])


def test_switch_vector_matches_reference():
    """The reference's ``_get_switch_vec`` restated: level 0 none off, 1 all off, 0.3 every
    3rd, 0.7 flipped."""
    def ref(n, level):
        if level == 0:
            return np.zeros(n, bool)
        if level == 1:
            return np.ones(n, bool)
        flip = level > .5
        level = 1 - level if flip else level
        vec = np.arange(n) % (n // int(level * n)) == 0
        return ~vec if flip else vec
    for n, lv in [(16, 0.0), (16, 1.0), (16, 0.3), (16, 0.7), (70, 0.25), (7, 0.5)]:
        np.testing.assert_array_equal(sa.switch_vector(n, lv), ref(n, lv))
    with pytest.raises(ValueError, match="only_self_level"):
        sa.switch_vector(4, 1.5)


# ------------------------------------------------------------------- one site vs reference
def _np_adain(x, b):
    """sa_handler.adain on (B, N, T, H) with the style rows feat[0], feat[b//2]."""
    mean = x.mean(axis=2, keepdims=True)
    std = np.sqrt(x.var(axis=2, ddof=1, keepdims=True) + 1e-5)
    def first(f):
        st = np.stack([f[0], f[b // 2]])[:, None]
        return np.broadcast_to(st, (2, b // 2) + f.shape[1:]).reshape(f.shape)
    return (x - mean) / std * first(std) + first(mean)


def _np_shared_call(q, k, v, scale, shift):
    """sa_handler.SharedAttentionProcessor.shared_call after the projections (q, k, v in
    (B, N, T, H), B = 2 halves × M, one group)."""
    b = q.shape[0]
    q, k = _np_adain(q, b), _np_adain(k, b)
    def expand(f, s=1.0):
        st = np.stack([f[0], f[b // 2]])[:, None]
        st = np.repeat(st, b // 2, axis=1).copy()
        st[:, 1:] *= s
        return st.reshape(f.shape)
    kk = np.concatenate([k, expand(k, scale)], axis=2)
    vv = np.concatenate([v, expand(v)], axis=2)
    logits = np.einsum("bhqd,bhkd->bhqk", q, kk) / np.sqrt(q.shape[-1])
    logits[..., q.shape[2]:] += shift
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bhqd", p, vv)


@pytest.mark.parametrize("scale,shift", [(1.0, 0.0), (0.8, float(np.log(2)))])
def test_shared_site_matches_reference_formula(pipe, scale, shift):
    """One self-attention site of the composed policy (AdaIN q, k → SharedAttention with
    scale and shift) against the reference's shared_call, every member of both CFG halves
    (member 0: its plain attention, as the reference's [own; own])."""
    m = 3
    pol = sa.style_aligned_policy(pipe, m, 4, shared_score_scale=scale,
                                  shared_score_shift=shift, share_group_norm=False)
    site = next(s for s in pipe.sites() if s.kind == "self")
    rng = np.random.default_rng(0)
    t, n, h = site.query_tokens, 2, 8
    q, k, v = (rng.normal(size=(2 * m, t, n, h)).astype(np.float32) * (1 + i)
               for i in range(3))
    out, _ = jax.jit(lambda a, b, c: pol.attend(site, a, b, c, jnp.int32(1)))(q, k, v)
    ref = _np_shared_call(*(x.astype(np.float64).transpose(0, 2, 1, 3) for x in (q, k, v)),
                          scale, shift).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-4, atol=2e-4)


def test_shared_group_norm_site_matches_reference(pipe):
    """A GroupNorm site: statistics over [own; member 0] concatenated along H (the
    reference's register_shared_norm), member 0 its own GroupNorm."""
    m = 3
    pol = sa.style_aligned_policy(pipe, m, 4, only_self_level=1.0)
    site = next(s for s in pipe.feature_sites() if s.kind == "group_norm")
    rng = np.random.default_rng(1)
    hh, ww = site.resolution
    x = (rng.normal(size=(2 * m, hh, ww, site.channels)) * 2 + 1).astype(np.float32)
    got, _ = jax.jit(lambda a: pol.feature(site, a, jnp.int32(0)))(x)
    xn = x.astype(np.float64).transpose(0, 3, 1, 2)                    # NCHW
    first = np.concatenate([np.repeat(xn[:1], m, 0), np.repeat(xn[m:m + 1], m, 0)])
    cat = np.concatenate([xn, first], axis=2)                         # along H
    g = site.groups
    cg = cat.reshape(2 * m, g, -1)
    mean, var = cg.mean(-1, keepdims=True), cg.var(-1, keepdims=True)
    xg = xn.reshape(2 * m, g, -1)
    ref = ((xg - mean) / np.sqrt(var + site.eps)).reshape(xn.shape).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)
    from jattn.models.features import group_norm_stats, group_normalize

    own = jax.jit(lambda a: group_normalize(a, *group_norm_stats(a, g), g, site.eps))(x)
    for r in (0, m):  # member 0: its own GroupNorm bit for bit (the seam's `keep`)
        np.testing.assert_array_equal(np.asarray(got)[r], np.asarray(own)[r])


# ------------------------------------------------------------------- generation
def test_reference_member_is_plain_and_others_share(pipe, runs):
    """Member 0 (shared GroupNorm, AdaIN of Q and K, shift log 2: the bias path) equals
    plain generation of the same batch and seeds, members 1, 2 differ. Bit for bit in
    jattn's default build (measured: ``scripts/bench_edit.py`` prints it on the bundled
    model); under the tests' ``--xla_backend_optimization_level=0`` the GroupNorm after
    the decoder's first skip concatenation rounds differently (3e-5), hence the
    tolerance here and the attention-only bit-identity test below."""
    s, p = runs["sa"].latents, runs["plain"].latents
    np.testing.assert_allclose(s[0], p[0], atol=1e-4, rtol=1e-4)
    assert np.abs(s[1:] - p[1:]).max() > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("bundled", [False, True])
def test_reference_member_is_bit_identical(pipe, bundled):
    """Shared attention with AdaIN of Q and K and a score shift (the bias path: member 0's
    slot excluded with -inf) leaves member 0 bit-identical to plain generation of the same
    batch, seeds and steps (SharedAttention.edit_output gives it the fused plain attention),
    on the tiny pipeline and on the bundled model (2 groups × 3 members: each group's
    member 0); the other members differ. Breaks if the source rows leave the plain
    computation (edit_output, AdaIN's untouched rows). (~15 s each)"""
    p = jattn.load(None) if bundled else pipe
    groups = [["a red circle", "a blue square", "a green heart"],
              ["a yellow star", "a purple moon", "an orange square"]]
    kw = dict(num_inference_steps=4 if bundled else N, seed=3, decode=False)
    s = sa.style_aligned(p, groups, share_group_norm=False, shared_score_shift=0.5,
                         **kw).latents
    plain = sa.style_aligned(p, groups, share=False, **kw).latents
    np.testing.assert_array_equal(s[[0, 3]], plain[[0, 3]])
    assert np.abs(s[[1, 2, 4, 5]] - plain[[1, 2, 4, 5]]).max() > 1e-3


@pytest.mark.slow
def test_group_norm_sharing_alone(pipe, runs):
    """GroupNorm sharing alone (no attention shared): member 0 plain, the others changed;
    member 0 of StyleAligned = prompt 0 generated alone (up to the rounding of another
    batch size)."""
    p = runs["plain"].latents
    gn = sa.style_aligned(pipe, P3, num_inference_steps=N, seed=5, decode=False,
                          only_self_level=1.0)                         # GroupNorm only
    # bit for bit in the default build; -O0 (tests) rounds one GroupNorm differently
    np.testing.assert_allclose(gn.latents[0], p[0], atol=1e-4, rtol=1e-4)
    assert np.abs(gn.latents[1:] - p[1:]).max() > 1e-3
    s = runs["sa"].latents
    # plain generation of prompt 0 alone: same up to the batch size's rounding
    alone = pipe.generate(P3[:1], num_inference_steps=N, seed=5, scheduler="ddim",
                          decode=False)
    np.testing.assert_allclose(s[0], alone.latents[0], atol=1e-3, rtol=1e-3)


def test_no_recompile_for_new_prompts_scale_shift(pipe, runs):
    """A second run with other prompts, seeds, score scale and shift compiles nothing."""
    kw = dict(num_inference_steps=N, decode=False)
    before = dict(pipe.trace_counts)
    a = sa.style_aligned(pipe, ["a blue star", "a red moon", "a beige heart"], seed=9,
                         shared_score_shift=0.2, shared_score_scale=0.5, **kw)
    assert pipe.trace_counts == before
    assert np.isfinite(a.latents).all()


@pytest.mark.slow
def test_reference_image_member_follows_trajectory(pipe):
    """From a reference image: member 0 ends exactly on the inversion's z*_0 (the
    reconstruction) after following zts[max(offset + 1, i + 1)]; the others share."""
    from jattn.sampling.inversion import invert

    img = np.random.default_rng(3).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    out = sa.style_aligned(pipe, ["a blue square", "a green heart"], reference_image=img,
                           reference_prompt="a red circle", num_inference_steps=N, offset=1,
                           seed=2, guidance_scale=7.5, decode=False)
    inv = invert(pipe, img[None], "a red circle", method="ddim", num_inference_steps=N,
                 inversion_guidance=2.0)
    np.testing.assert_array_equal(out.latents[0], inv.latents[0][0].transpose(2, 0, 1))
    assert out.prompts == [["a red circle", "a blue square", "a green heart"]]
    plain = pipe.generate(["a red circle", "a blue square", "a green heart"], seed=2,
                          num_inference_steps=N, scheduler="ddim", decode=False)
    assert np.abs(out.latents[1:] - plain.latents[1:]).max() > 1e-3


# ------------------------------------------------------------------- composition
def _switch_off(policy, what):
    """The same policy (same compiled program) with one method's arrays set to 'off'."""
    from jattn.methods.p2p_ops import CrossEdit, SelfReplace

    ops = []
    for op in policy.ops:
        if what == "sa" and isinstance(op, AdaIN):
            ident = jnp.broadcast_to(jnp.arange(op.q_from.shape[-1]), op.q_from.shape)
            op = op.replace(q_from=ident, k_from=ident)
        elif what == "sa" and isinstance(op, SharedAttention):
            op = op.replace(sources=jnp.broadcast_to(
                jnp.arange(op.sources.shape[1])[None, :, None], op.sources.shape))
        elif what == "sa" and isinstance(op, SharedGroupNorm):
            op = op.replace(source=jnp.broadcast_to(jnp.arange(op.source.shape[-1]),
                                                    op.source.shape))
        elif what == "p2p" and isinstance(op, CrossEdit):
            op = op.replace(alphas=jnp.zeros_like(op.alphas))
        elif what == "p2p" and isinstance(op, SelfReplace):
            op = op.replace(window=jnp.zeros_like(op.window))
        ops.append(op)
    return policy.replace(ops=tuple(ops))


@pytest.mark.slow
def test_composes_with_p2p_word_swap(pipe):
    """StyleAligned + Prompt-to-Prompt word swap in one compiled run, members [R, R', R'']:
    R the style reference and the P2P source, R', R'' word swaps of R that take R's
    cross-attention maps (layout) and share its style. Both effects hold: switching either
    method off by array values alone (the same program, 0 compilations) leaves exactly the
    other method's run, and each differs from the composed run."""
    from jattn.methods.p2p import p2p_policy

    prompts = ["a red circle", "a blue circle", "a green circle"]
    n = N
    both = compose(sa.style_aligned_policy(pipe, 3, n),
                   p2p_policy(pipe, prompts[0], prompts[1:], num_steps=n))
    gen = lambda pol: pipe.generate(prompts, num_inference_steps=n, seed=4,  # noqa: E731
                                    scheduler="ddim", policy=pol, decode=False).latents
    out = gen(both)
    before = dict(pipe.trace_counts)
    p2p_alone = gen(_switch_off(both, "sa"))
    sa_alone = gen(_switch_off(both, "p2p"))
    assert pipe.trace_counts == before
    tol = dict(atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(p2p_alone, gen(p2p_policy(pipe, prompts[0], prompts[1:],
                                                         num_steps=n)), **tol)
    np.testing.assert_allclose(sa_alone, gen(sa.style_aligned_policy(pipe, 3, n)), **tol)
    plain = gen(None)
    for x in (out, p2p_alone, sa_alone):
        np.testing.assert_allclose(x[0], plain[0], **tol)             # the source is kept
    assert np.abs(out[1:] - p2p_alone[1:]).max() > 1e-3                # style sharing on
    assert np.abs(out[1:] - sa_alone[1:]).max() > 1e-3                 # P2P on


@pytest.mark.slow
def test_composes_with_freeu(pipe):
    """FreeU changes the run; member 0 of StyleAligned + FreeU = plain + FreeU (bit for bit
    in the default build; -O0 rounds one GroupNorm differently)."""
    kw = dict(num_inference_steps=N, seed=5, decode=False)
    with_f = sa.style_aligned(pipe, P3, freeu="sd1.5", **kw)
    plain_f = sa.style_aligned(pipe, P3, freeu="sd1.5", share=False, **kw)
    without = sa.style_aligned(pipe, P3, **kw)
    assert np.abs(with_f.latents - without.latents).max() > 1e-3
    np.testing.assert_allclose(with_f.latents[0], plain_f.latents[0], atol=1e-4, rtol=1e-4)
    assert np.abs(with_f.latents[1:] - plain_f.latents[1:]).max() > 1e-3


# ------------------------------------------------------------------- API / CLI
def test_api_errors(pipe):
    with pytest.raises(ValueError, match="group of one"):
        sa.style_aligned(pipe, ["a red circle"], num_inference_steps=2)
    with pytest.raises(ValueError, match="reference_prompt"):
        sa.style_aligned(pipe, ["a red circle"], num_inference_steps=2,
                         reference_image=np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="window"):
        sa.style_aligned_policy(pipe, 3, 4, window=(0.5, 1.5))
    with pytest.raises(ValueError, match="same number"):
        sa.style_aligned(pipe, [["a", "b"], ["c"]], num_inference_steps=2)


@pytest.mark.slow
def test_cli_writes_the_files(tmp_path, tiny_sd_dir):
    from jattn.cli import main

    img = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "ref.png")
    out = tmp_path / "out"
    rc = main(["style-aligned", "--model", str(tiny_sd_dir), "--prompt", "a blue square",
               "--prompt", "a green heart", "--reference-image", str(tmp_path / "ref.png"),
               "--reference-prompt", "a red circle", "--steps", "3", "--offset", "1",
               "--out-dir", str(out)])
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {"000.png", "001.png", "002.png", "grid.png", "result.json"} <= names
    res = json.loads((out / "result.json").read_text())
    assert res["command"] == "style-aligned"
    assert res["prompts"] == ["a red circle", "a blue square", "a green heart"]
    assert abs(res["settings"]["shared_score_shift"] - np.log(2)) < 1e-6
