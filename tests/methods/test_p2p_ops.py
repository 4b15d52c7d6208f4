"""P2P attention ops against a direct NumPy restatement of the reference formulas.

Reference: google/prompt-to-prompt@9c472e4, ``prompt-to-prompt_stable.ipynb`` and
``null_text_w_ptp.ipynb``:

* ``AttentionReplace.replace_cross_attention``: ``einsum('hpw,bwn->bhpn', base, mapper)``;
* ``AttentionRefine``: ``base[:, :, mapper].permute(2, 0, 1, 3) * alphas
  + att_replace * (1 - alphas)``;
* ``AttentionReweight``: ``base[None] * equalizer[:, None, None, :]``, after the previous
  controller's replace/refine when chained;
* ``AttentionControlEdit.forward``: ``new * alpha_words + (1 - alpha_words) * att_replace``
  for cross maps, ``base`` expanded over the targets for self maps in the step window,
  both on the conditional half only (``attn[h // 2:]``) and never on the source;
* ``LocalBlend``: words summed, layer/head mean, 3×3 max-pool (pad 1), nearest
  upsampling, divide by the max, threshold, OR with the source, minus the (unpooled)
  ``substruct_words`` mask, from ``start_blend`` on: ``x = x_src + mask·(x − x_src)``;
* ``AttentionStore``: maps summed over steps, ``aggregate_attention`` averages the layers
  of one resolution and divides by the number of steps.

The batch is ``Layout(G=2 groups, M=3 members)`` with CFG: 12 rows ``[uncond; cond]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.methods.p2p_ops import CrossEdit, LocalBlend, SelfReplace, local_blend_mask
from jattn.models.attention import AttentionSite, attend
from jattn.policy.capture import Capture, captured_maps
from jattn.policy.core import Layout, SiteContext, compose, resolve

G, M, N, S = 2, 3, 2, 6
LAYOUT = Layout(groups=G, members=M, cfg=True)
ROWS = LAYOUT.rows  # 12
STEPS = 4
TOL = 1e-6


def _site(path, kind, res, heads=N, head_dim=4, block="down"):
    return AttentionSite(path=path, kind=kind, resolution=(res, res), num_heads=heads,
                         head_dim=head_dim, block=block)


CROSS = _site("down_blocks.0.attentions.0.transformer_blocks.0.attn2", "cross", 2)
SELF = _site("down_blocks.0.attentions.0.transformer_blocks.0.attn1", "self", 2)


def _probs(rng, t, s, rows=ROWS, heads=N):
    """Random attention probabilities ``(rows, N, T, S)`` (rows sum to 1)."""
    logits = rng.standard_normal((rows, heads, t, s)) * 2
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def _ctx(step, site=CROSS, layout=LAYOUT):
    return SiteContext(site, None if step is None else jnp.int32(step), layout)


def _cond_rows(g):
    """Row indices of group g's members in the conditional half."""
    base = LAYOUT.groups * LAYOUT.members  # uncond rows come first
    return [base + g * M + m for m in range(M)]


# ---------------------------------------------------------------- NumPy restatement


def np_replace(base, mapper):
    """AttentionReplace: base (h, p, w), mapper (b, w, n) -> (b, h, p, n)."""
    return np.einsum("hpw,bwn->bhpn", base, mapper)


def np_refine(base, att_replace, mapper, ralphas):
    """AttentionRefine: base[:, :, mapper].permute(2, 0, 1, 3) * a + tgt * (1 - a)."""
    a = ralphas.reshape(ralphas.shape[0], 1, 1, ralphas.shape[1])
    gathered = base[:, :, mapper].transpose(2, 0, 1, 3)  # NumPy indexing wraps -1 as torch
    return gathered * a + att_replace * (1 - a)


def np_reweight(base_or_edited, equalizer):
    """AttentionReweight: base[None] * eq[:, None, None, :]; chained, the previous
    controller's (b, h, p, n) output is weighted per target b."""
    x = base_or_edited[None] if base_or_edited.ndim == 3 else base_or_edited
    return x * equalizer[:, None, None, :]


def np_cross_forward(p, step, alphas, mode, mapper=None, ralphas=None, equalizer=None):
    """AttentionControlEdit.forward on the conditional half, per group (is_cross)."""
    out = p.copy()
    for g in range(G):
        rows = _cond_rows(g)
        attn = p[rows]  # (M, h, T, S)
        base, att_replace = attn[0], attn[1:]
        if mode == "replace":
            new = np_replace(base, mapper)
        elif mode == "refine":
            new = np_refine(base, att_replace, mapper, ralphas)
        else:
            new = base[None]
        if equalizer is not None:
            new = np_reweight(new, equalizer)
        new = np.broadcast_to(new, att_replace.shape)
        alpha_words = alphas[step].reshape(M - 1, 1, 1, S)
        out[rows[1:]] = new * alpha_words + (1 - alpha_words) * att_replace
    return out


def _rand_alphas(rng):
    """Per step/target/token blend weights: 0/1 (as the reference) plus fractional ones."""
    a = (rng.random((STEPS + 1, M - 1, S)) > 0.4).astype(np.float32)
    a[1] = rng.random((M - 1, S))
    return a


def _mapper_replace(rng):
    m = np.zeros((M - 1, S, S), np.float32)
    for b in range(M - 1):
        perm = rng.permutation(S)
        m[b, np.arange(S), perm] = 1.0
        m[b, 2, :] = 0.0
        m[b, 2, [3, 4]] = 0.5  # a word split over two tokens: weight 1/len
    return m


@pytest.mark.parametrize("step", [0, 1, 3])
def test_replace_matches_reference(step):
    """Word swap: einsum over the mapper, alpha blend with the target's own map, only the
    targets of the conditional half change. Breaks on a wrong einsum, a blend with the
    wrong sign, editing the uncond half or the source, or mixing groups."""
    rng = np.random.default_rng(step)
    p = _probs(rng, 4, S)
    alphas, mapper = _rand_alphas(rng), _mapper_replace(rng)
    op = CrossEdit(alphas=jnp.asarray(alphas), mapper=jnp.asarray(mapper), mode="replace")
    got = np.asarray(op.edit_probs(_ctx(step), jnp.asarray(p)))
    want = np_cross_forward(p, step, alphas, "replace", mapper=mapper)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    half = ROWS // 2
    np.testing.assert_array_equal(got[:half], p[:half])           # uncond untouched
    np.testing.assert_array_equal(got[[_cond_rows(g)[0] for g in range(G)]],
                                  p[[_cond_rows(g)[0] for g in range(G)]])  # sources
    assert np.abs(got[half:] - p[half:]).max() > 1e-3              # targets edited


@pytest.mark.parametrize("step", [0, 2])
def test_refine_matches_reference(step):
    """Refinement: gather the source's columns through the mapper (``-1`` for new tokens
    wraps to S-1 as in torch, weighted by alpha 0), blend by the refinement alphas, then
    by the step alphas."""
    rng = np.random.default_rng(10 + step)
    p = _probs(rng, 4, S)
    alphas = _rand_alphas(rng)
    mapper = np.stack([rng.integers(0, S, S) for _ in range(M - 1)]).astype(np.int32)
    ralphas = np.ones((M - 1, S), np.float32)
    mapper[0, 3], ralphas[0, 3] = -1, 0.0
    mapper[1, 1], ralphas[1, 1] = -1, 0.0
    op = CrossEdit(alphas=jnp.asarray(alphas), mapper=jnp.asarray(mapper),
                   refine_alphas=jnp.asarray(ralphas), mode="refine")
    got = np.asarray(op.edit_probs(_ctx(step), jnp.asarray(p)))
    want = np_cross_forward(p, step, alphas, "refine", mapper=mapper, ralphas=ralphas)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    np.testing.assert_array_equal(got[:ROWS // 2], p[:ROWS // 2])


@pytest.mark.parametrize("mode", ["reweight", "replace", "refine"])
def test_reweight_alone_and_chained(mode):
    """Reweighting multiplies columns of the (edited) source map by the equalizer without
    renormalising; with replace/refine it runs after them (``prev_controller``), then the
    alpha blend. Breaks if the equalizer is applied to the target's own map, renormalised,
    or applied per member instead of per target."""
    rng = np.random.default_rng(20)
    p = _probs(rng, 4, S)
    alphas = _rand_alphas(rng)
    eq = np.ones((M - 1, S), np.float32)
    eq[0, 2], eq[1, 4], eq[1, 1] = 5.0, -1.0, 3.0
    kw, ref_kw = {}, {}
    if mode == "replace":
        mapper = _mapper_replace(rng)
        kw, ref_kw = dict(mapper=jnp.asarray(mapper)), dict(mapper=mapper)
    elif mode == "refine":
        mapper = np.stack([rng.permutation(S) for _ in range(M - 1)]).astype(np.int32)
        ralphas = (rng.random((M - 1, S)) > 0.3).astype(np.float32)
        kw = dict(mapper=jnp.asarray(mapper), refine_alphas=jnp.asarray(ralphas))
        ref_kw = dict(mapper=mapper, ralphas=ralphas)
    op = CrossEdit(alphas=jnp.asarray(alphas), equalizer=jnp.asarray(eq), mode=mode, **kw)
    for step in (0, 1):
        got = np.asarray(op.edit_probs(_ctx(step), jnp.asarray(p)))
        want = np_cross_forward(p, step, alphas, mode, equalizer=eq, **ref_kw)
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
        np.testing.assert_array_equal(got[:ROWS // 2], p[:ROWS // 2])
    # no renormalisation: where alpha is 1 everywhere the edited rows do not sum to 1
    full = CrossEdit(alphas=jnp.ones_like(jnp.asarray(alphas)), equalizer=jnp.asarray(eq),
                     mode=mode, **kw)
    sums = np.asarray(full.edit_probs(_ctx(0), jnp.asarray(p))).sum(-1)
    assert np.abs(sums[_cond_rows(0)[1]] - 1).max() > 1e-2


def test_cross_edit_through_the_seam():
    """The op inside a resolved Policy at the seam: output = edited probs @ V, where the
    probabilities are softmax(q·k/√H) edited as the reference does."""
    rng = np.random.default_rng(30)
    head_dim, t = 4, 4
    q = rng.standard_normal((ROWS, t, N, head_dim)).astype(np.float32)
    k = rng.standard_normal((ROWS, S, N, head_dim)).astype(np.float32)
    v = rng.standard_normal((ROWS, S, N, head_dim)).astype(np.float32)
    alphas, mapper = _rand_alphas(rng), _mapper_replace(rng)
    op = CrossEdit(alphas=jnp.asarray(alphas), mapper=jnp.asarray(mapper), mode="replace")
    pol = resolve([({"kind": "cross"}, op)], [SELF, CROSS], layout=LAYOUT)
    out, aux = attend(CROSS, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), pol,
                      jnp.int32(1))
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(head_dim)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    p = np_cross_forward(p, 1, alphas, "replace", mapper=mapper)
    want = np.einsum("bnts,bsnh->btnh", p, v)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5, rtol=0)
    assert aux == {}


@pytest.mark.parametrize("step,inside", [(0, False), (1, True), (2, True), (3, False),
                                         (None, True)])
def test_self_replace_window(step, inside):
    """Self replacement: inside [start, end) every target's map of the conditional half
    is its group's source map; outside, nothing changes; the uncond half never changes."""
    rng = np.random.default_rng(40)
    t = 4
    p = _probs(rng, t, t)
    op = SelfReplace(window=jnp.asarray([1, 3], jnp.int32))
    got = np.asarray(op.edit_probs(_ctx(step, SELF), jnp.asarray(p)))
    want = p.copy()
    if inside:
        for g in range(G):
            rows = _cond_rows(g)
            base = p[rows[0]]
            want[rows[1:]] = np.broadcast_to(base[None], (M - 1,) + base.shape)
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- local blend


def np_blend_mask(maps, words, latent_hw, th, pool, or_source=True):
    """LocalBlend.get_mask: maps (G, M, h', w', S) layer/head means."""
    wmap = (maps * words[None, :, None, None, :]).sum(-1)  # (G, M, h', w')
    g, m, hh, ww = wmap.shape
    if pool:
        padded = np.pad(wmap, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
        wmap = np.max([padded[:, :, i:i + hh, j:j + ww] for i in range(3) for j in range(3)],
                      axis=0)
    h, w = latent_hw
    iy = np.floor(np.arange(h) * (hh / h)).astype(int)  # torch nearest: floor(dst * in/out)
    ix = np.floor(np.arange(w) * (ww / w)).astype(int)
    up = wmap[:, :, iy][:, :, :, ix]
    up = up / up.max(axis=(2, 3), keepdims=True)
    mask = up > th
    return mask | mask[:, :1] if or_source else mask  # mask[:1] + mask: OR with the source


def _blend_inputs(rng, side=4, latent=8):
    maps = (rng.random((G, M, side, side, S)) ** 6).astype(np.float32)  # peaked
    maps /= maps.sum(-1, keepdims=True)
    words = np.zeros((M, S), np.float32)
    words[0, 2] = words[1, 2] = 1.0
    words[2, [2, 3]] = 1.0  # a two-token word in the second target
    sub = np.zeros((M, S), np.float32)
    sub[:, 4] = 1.0
    lat = rng.standard_normal((G * M, latent, latent, 4)).astype(np.float32)
    return maps, words, sub, lat


def test_local_blend_mask_matches_reference():
    """Max-pool 3×3, nearest upsampling ×2, divide by the max, threshold 0.3 (pooled) and
    no pool for the subtract words. Breaks on a pooling padding, an upsampling index or a
    normalisation mistake."""
    rng = np.random.default_rng(50)
    maps, words, sub, _ = _blend_inputs(rng)
    flat = jnp.asarray(maps.reshape(G, M, 16, S))
    for pool, w in ((True, words), (False, sub)):
        got = np.asarray(local_blend_mask(flat, jnp.asarray(w), (8, 8), 0.3, pool=pool))
        assert got.shape == (G, M, 8, 8, 1) and got.dtype == bool
        want = np_blend_mask(maps, w, (8, 8), 0.3, pool, or_source=False)
        np.testing.assert_array_equal(got[..., 0], want)
        assert want.any() and not want.all()


def test_local_blend_on_step_matches_reference():
    """LocalBlend as the sampler runs it: maps recorded at two sites for two steps (sum of
    the layer means), blended from ``start_step`` on with ``mask = (words OR source) AND
    NOT (subtract OR source)``; the source's latents never change."""
    rng = np.random.default_rng(60)
    _, words, sub, lat = _blend_inputs(rng)
    sites = [_site(f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn2", "cross", 4,
                   block="up") for i in range(2)]
    op = LocalBlend(words=jnp.asarray(words), threshold=jnp.asarray([0.3, 0.4], jnp.float32),
                    start_step=jnp.asarray(1, jnp.int32), subtract=jnp.asarray(sub))
    pol = resolve([({"kind": "cross"}, op)], sites, layout=LAYOUT, context_tokens=S)
    acc = pol.aux_init()
    total = np.zeros((G, M, 4, 4, S), np.float32)
    for step in range(2):
        per_site = {}
        for s in sites:
            p = _probs(rng, 16, S)
            rec = op.record(_ctx(step, s), jnp.asarray(p), None)
            per_site[s.path] = {"0": rec}
            total += p[ROWS // 2:].mean(1).reshape(G, M, 4, 4, S) / len(sites)
        acc = pol.aux_update(acc, per_site, jnp.int32(step))
        state = pol.on_step({"latents": jnp.asarray(lat), "step": jnp.int32(step),
                             "aux": acc, "x0": None})
        got = np.asarray(state["latents"])
        if step < 1:
            np.testing.assert_array_equal(got, lat)
            continue
        mask = (np_blend_mask(total, words, (8, 8), 0.3, True)
                & ~np_blend_mask(total, sub, (8, 8), 0.4, False))
        x = lat.reshape(G, M, 8, 8, 4)
        want = x[:, :1] + mask[..., None] * (x - x[:, :1])
        np.testing.assert_allclose(got, want.reshape(lat.shape), atol=TOL, rtol=0)
        assert 0 < mask[:, 1:].mean() < 1
        np.testing.assert_array_equal(got.reshape(G, M, 8, 8, 4)[:, 0], x[:, 0])


def test_local_blend_mask_non_square():
    """Non-square latents (64×96 px images): the maps' grid follows the latent aspect
    ratio (T = h'·w'), not a square root of T."""
    rng = np.random.default_rng(70)
    maps = rng.random((G, M, 2, 3, S)).astype(np.float32)
    words = np.zeros((M, S), np.float32)
    words[:, 1] = 1.0
    got = np.asarray(local_blend_mask(jnp.asarray(maps.reshape(G, M, 6, S)),
                                      jnp.asarray(words), (8, 12), 0.5, pool=True))[..., 0]
    want = np_blend_mask(maps, words, (8, 12), 0.5, True, or_source=False)
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- capture


def test_capture_aggregation_matches_reference():
    """Capture: per (kind, resolution) the mean over that resolution's sites of the
    head-mean conditional maps, summed over the steps inside the window; captured_maps
    divides by the number of captured steps (P2P aggregate_attention). Also: all_halves
    keeps the uncond rows; record_post_edit (the reference's aliasing quirk) records the
    edited maps."""
    rng = np.random.default_rng(80)
    sites = [_site(f"down_blocks.0.attentions.{i}.transformer_blocks.0.attn2", "cross", 2)
             for i in range(2)]
    sites += [_site("mid_block.attentions.0.transformer_blocks.0.attn2", "cross", 1,
                    block="mid"),
              _site("mid_block.attentions.0.transformer_blocks.0.attn1", "self", 1,
                    block="mid")]
    window = jnp.asarray([1, 3], jnp.int32)
    for all_halves in (False, True):
        cap = Capture(window=window, all_halves=all_halves)
        pol = resolve([("", cap)], sites, layout=LAYOUT, context_tokens=S)
        acc = pol.aux_init()[0]
        want = {"cross2x2": 0.0, "cross1x1": 0.0, "self1x1": 0.0}
        n_sites = {"cross2x2": 2, "cross1x1": 1, "self1x1": 1}
        for step in range(4):
            aux = {}
            for s in sites:
                t = s.query_tokens
                p = _probs(rng, t, S if s.is_cross else t)
                aux[s.path] = {"0": cap.record(_ctx(step, s), jnp.asarray(p), None)}
                key = f"{s.kind}{s.resolution[0]}x{s.resolution[1]}"
                if 1 <= step < 3:
                    rows = p if all_halves else p[ROWS // 2:]
                    want[key] = want[key] + rows.mean(1) / n_sites[key]
            acc = pol.aux_update((acc,), aux, jnp.int32(step))[0]
        assert int(acc["steps"]) == 2
        maps = captured_maps(acc)
        assert set(maps) == set(want)
        for key in want:
            np.testing.assert_allclose(maps[key], want[key] / 2, atol=TOL, rtol=0)
            assert maps[key].shape[0] == (ROWS if all_halves else ROWS // 2)


def test_capture_records_pre_or_post_edit_maps():
    """Composed after a word swap at the seam: by default the capture holds the
    unedited maps; with record_post_edit=True (reference quirk) the edited ones."""
    rng = np.random.default_rng(90)
    alphas, mapper = np.ones((STEPS + 1, M - 1, S), np.float32), _mapper_replace(rng)
    q = jnp.asarray(rng.standard_normal((ROWS, 4, N, 4)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((ROWS, S, N, 4)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((ROWS, S, N, 4)), jnp.float32)
    logits = np.einsum("btnh,bsnh->bnts", np.asarray(q), np.asarray(k)) / 2.0
    e = np.exp(logits - logits.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    edited = np_cross_forward(p, 0, alphas, "replace", mapper=mapper)
    for post, ref in ((False, p), (True, edited)):
        edit = resolve([({"kind": "cross"}, CrossEdit(alphas=jnp.asarray(alphas),
                                                      mapper=jnp.asarray(mapper)))],
                       [CROSS], layout=LAYOUT)
        cap = resolve([("", Capture())], [CROSS], layout=LAYOUT, context_tokens=S,
                      record_post_edit=post)
        pol = compose(edit, cap)
        _, aux = attend(CROSS, q, k, v, pol, jnp.int32(0))
        np.testing.assert_allclose(np.asarray(aux["1"]["probs"]), ref[ROWS // 2:].mean(1),
                                   atol=TOL, rtol=0)


def test_ops_jit_with_traced_step():
    """The ops run under jit with a traced step (the sampler's scan index)."""
    rng = np.random.default_rng(100)
    p = jnp.asarray(_probs(rng, 4, S))
    alphas, mapper = _rand_alphas(rng), _mapper_replace(rng)
    op = CrossEdit(alphas=jnp.asarray(alphas), mapper=jnp.asarray(mapper))
    f = jax.jit(lambda op, step, p: op.edit_probs(_ctx_traced(step), p))
    for step in (0, 2):
        want = np_cross_forward(np.asarray(p), step, alphas, "replace", mapper=mapper)
        np.testing.assert_allclose(np.asarray(f(op, jnp.int32(step), p)), want, atol=TOL)


def _ctx_traced(step):
    return SiteContext(CROSS, step, LAYOUT)
