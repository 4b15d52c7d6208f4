"""Prompt mixing (jattn/methods/mix.py): the K/V sourcing, the background blend and the
self-attention localisation against NumPy restatements; the original member against plain
generation; composition with Prompt-to-Prompt; no recompilation for new prompts/proxies;
errors; the CLI's files."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.methods.mix import (MixBlend, SelfLocalise, mix, mix_policy, mix_prompts,
                               window_steps)
from jattn.models.attention import AttentionSite, attention_probs
from jattn.policy.core import Layout, SiteContext, compose
from jattn.policy.ops import MemberSource

PROMPT = "a red circle on the left"
PROXIES = ["square", "star"]


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    return jattn.load(tiny_sd_dir)


def _cross_site(pipe):
    return next(s for s in pipe.sites() if s.kind == "cross")


# ------------------------------------------------------------------ K/V sourcing
def test_window_steps_scale_with_step_count():
    assert window_steps(50, (7 / 50, 17 / 50)) == (7, 17)
    assert window_steps(100, (7 / 50, 17 / 50)) == (14, 34)
    assert window_steps(10, (7 / 50, 17 / 50)) == (1, 3)
    with pytest.raises(ValueError, match="window"):
        window_steps(50, (0.5, 0.2))


def test_kv_sourcing_matches_numpy(pipe):
    """Proxies (members ≥ 1, conditional half) take member 0's K at every step and member
    0's V outside the window; the unconditional half and the original are untouched."""
    n, m, g = 20, 3, 2
    pol = mix_policy(pipe, [PROMPT, "a blue square at the top"], ["circle", "square"],
                     [PROXIES, ["circle", "heart"]], num_steps=n, window=(0.25, 0.5),
                     blend_step=None)
    op = pol.ops[0]
    assert isinstance(op, MemberSource)
    layout = Layout(groups=g, members=m, cfg=True)
    site = _cross_site(pipe)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((layout.rows, 4, 2, 3)).astype(np.float32)
    k = rng.standard_normal((layout.rows, 7, 2, 3)).astype(np.float32)
    v = rng.standard_normal((layout.rows, 7, 2, 3)).astype(np.float32)
    for step in range(n):
        ctx = SiteContext(site, jnp.int32(step), layout)
        _, k2, v2 = (np.asarray(a) for a in op.qkv(ctx, *map(jnp.asarray, (q, k, v))))
        kk = k.reshape(2, g, m, 7, 2, 3).copy()
        vv = v.reshape(2, g, m, 7, 2, 3).copy()
        kk[1, :, 1:] = kk[1, :, :1]                         # keys: always the original's
        if not 5 <= step < 10:                              # values: proxy inside [5, 10)
            vv[1, :, 1:] = vv[1, :, :1]
        np.testing.assert_array_equal(k2, kk.reshape(k.shape))
        np.testing.assert_array_equal(v2, vv.reshape(v.shape))


def test_blend_once_with_dilated_union_mask():
    """MixBlend at its step: x_p ← x_0 + dilate(M_0 ∪ M_p)·(x_p − x_0); other steps: as
    is."""
    g, m, h, s = 1, 3, 8, 5
    rng = np.random.default_rng(1)
    acc = np.zeros((g, m, 4, 4, s), np.float32)
    acc[0, 0, 0, 0, 2] = 1.0                          # original: top-left cell
    acc[0, 1, 3, 3, 2] = 1.0                          # proxy 1: bottom-right cell
    acc[0, 2, 0, 3, 2] = 1.0                          # proxy 2: top-right cell
    acc += 0.01 * rng.random(acc.shape).astype(np.float32)
    words = np.zeros((m, s), np.float32)
    words[:, 2] = 1
    op = MixBlend(words=jnp.asarray(words), threshold=jnp.asarray([0.3, 0.3]),
                  start_step=jnp.asarray(7, jnp.int32), dilation=1)
    lat = rng.standard_normal((g * m, h, h, 4)).astype(np.float32)
    layout = Layout(groups=g, members=m)
    lat_j, acc_j = jnp.asarray(lat), jnp.asarray(acc)
    np.testing.assert_array_equal(op.on_step(lat_j, acc_j, jnp.int32(6), layout), lat)
    got = np.asarray(op.on_step(lat_j, acc_j, jnp.int32(7), layout))
    # NumPy restatement: word map → threshold of the max → nearest ×2 → union → dilation
    wmap = acc[..., 2]
    mk = wmap / wmap.max(axis=(2, 3), keepdims=True) > 0.3
    mk = mk.repeat(2, axis=2).repeat(2, axis=3)
    mk = mk | mk[:, :1]
    pad = np.pad(mk, ((0, 0), (0, 0), (1, 1), (1, 1)))
    dil = np.zeros_like(mk)
    for dy in range(3):
        for dx in range(3):
            dil |= pad[:, :, dy:dy + h, dx:dx + h]
    x = lat.reshape(g, m, h, h, 4)
    want = x[:, :1] + dil[..., None] * (x - x[:, :1])
    np.testing.assert_allclose(got, want.reshape(lat.shape), atol=1e-6)
    np.testing.assert_array_equal(got.reshape(g, m, h, h, 4)[:, 0], x[:, 0])
    assert dil[0, 1, 0:3, 0:3].all() and dil[0, 1, 5:8, 5:8].all() and not dil[0, 1, 0, 7]


def test_self_localise_matches_numpy():
    layout = Layout(groups=1, members=3, cfg=True)
    t, n_heads = 4, 2
    keep = np.array([0, 1, 0, 0], np.float32)
    op = SelfLocalise(keep=jnp.asarray(keep), window=jnp.asarray([0, 5], jnp.int32))
    site = AttentionSite("x.attn1", "self", (2, 2), n_heads, 3, "up")
    p = np.random.default_rng(2).random((layout.rows, n_heads, t, t)).astype(np.float32)
    got = np.asarray(op.edit_probs(SiteContext(site, jnp.int32(1), layout), jnp.asarray(p)))
    k2 = np.maximum(keep[:, None], keep[None, :])
    want = p.reshape(2, 1, 3, n_heads, t, t).copy()
    want[1, :, 1:] = want[1, :, 1:] * (1 - k2) + want[1, :, :1] * k2
    np.testing.assert_allclose(got, want.reshape(p.shape), atol=1e-7)
    out = np.asarray(op.edit_probs(SiteContext(site, jnp.int32(5), layout), jnp.asarray(p)))
    np.testing.assert_array_equal(out, p)                          # outside its window


# ------------------------------------------------------------------ through the model
@pytest.mark.slow  # ~17 s; the default suite keeps to 15 min
def test_original_member_is_plain_generation(pipe):
    """Without the blend (no materialised maps) the original member's latents are
    bit-identical to plain generation of the original prompt at the same batch size;
    with the blend (its maps need materialised probabilities at the mask's sites) equal
    to float32 rounding. Proxies differ from the original."""
    m = 1 + len(PROXIES)
    plain = pipe.generate([PROMPT] * m, seed=[3] * m, num_inference_steps=4)
    out = mix(pipe, PROMPT, "circle", PROXIES, seed=3, num_inference_steps=4, blend_step=None,
              window=(0.25, 1.0))
    np.testing.assert_array_equal(out.latents[0], plain.latents[0])
    assert not np.allclose(out.latents[1], out.latents[0])
    blended = mix(pipe, PROMPT, "circle", PROXIES, seed=3, num_inference_steps=4,
                  window=(0.25, 1.0), blend_step=0.5)
    np.testing.assert_allclose(blended.latents[0], plain.latents[0], atol=1e-4)
    single = pipe.generate([PROMPT], seed=3, num_inference_steps=4)
    np.testing.assert_allclose(out.latents[0], single.latents[0], atol=1e-4)


def test_new_prompts_and_proxies_do_not_recompile(pipe):
    mix(pipe, PROMPT, "circle", PROXIES, seed=0, num_inference_steps=3)
    before = dict(pipe.trace_counts)
    mix(pipe, "a green star at the top", "star", ["heart", "circle"], seed=5,
        num_inference_steps=3, window=(0.0, 1.0), blend_step=0.34)
    assert pipe.trace_counts.get("sample") == before.get("sample")


def test_composes_with_p2p(pipe):
    """Mix (keys from member 0) then P2P word swap (targets' cross maps := the source's
    through the mapper) at one cross site: the proxies' output is
    softmax(q_0 k_0ᵀ) · v_proxy inside both windows."""
    from jattn.methods.p2p import p2p_policy

    n = 10
    targets = [PROMPT.replace("circle", p) for p in PROXIES]
    mpol = mix_policy(pipe, PROMPT, "circle", PROXIES, num_steps=n, window=(0.0, 1.0),
                      blend_step=None)
    ppol = p2p_policy(pipe, PROMPT, targets, num_steps=n, cross_replace_steps=1.0,
                      self_replace_steps=0.0)
    pol = compose(mpol, ppol)
    site = _cross_site(pipe)
    layout = pol.layout
    rng = np.random.default_rng(4)
    q = rng.standard_normal((layout.rows, site.query_tokens, site.num_heads, site.head_dim))
    k = rng.standard_normal((layout.rows, 77, site.num_heads, site.head_dim))
    v = rng.standard_normal((layout.rows, 77, site.num_heads, site.head_dim))
    q, k, v = (jnp.asarray(a, jnp.float32) for a in (q, k, v))
    out, _ = pol.attend(site, q, k, v, jnp.int32(2))
    half = layout.rows // 2
    p = np.asarray(attention_probs(q, k))                     # (B, N, T, S)
    src = half                                                # cond row of the original
    for r in range(half + 1, layout.rows):                    # cond rows of the proxies
        want = np.einsum("NTS,SNH->TNH", p[src], np.asarray(v[r]))
        np.testing.assert_allclose(np.asarray(out[r]), want, atol=1e-5)
    # mix alone: proxies use their own queries against the original's keys
    out_mix, _ = mpol.attend(site, q, k, v, jnp.int32(2))
    pk = np.asarray(attention_probs(q, jnp.asarray(np.repeat(np.asarray(k)[src:src + 1],
                                                             layout.rows, 0))))
    for r in range(half + 1, layout.rows):
        want = np.einsum("NTS,SNH->TNH", pk[r], np.asarray(v[r]))
        np.testing.assert_allclose(np.asarray(out_mix[r]), want, atol=1e-5)
    # and the composed policy runs through the sampler (one group, both ops)
    res = mix(pipe, PROMPT, "circle", PROXIES, seed=1, num_inference_steps=3, policy=ppol,
              window=(0.0, 1.0))
    assert res.images.shape[0] == 3


def test_preserve_localisation_runs(pipe):
    out = mix(pipe, PROMPT, "circle", PROXIES, seed=0, num_inference_steps=3,
              preserve=["left"])
    assert out.images.shape[0] == 3
    with pytest.raises(ValueError, match="preserve"):
        mix(pipe, PROMPT, "circle", PROXIES, seed=0, num_inference_steps=3,
            preserve=["dog"])


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("word, proxies, match", [
    ("dog", ["cat"], "word='dog'"),
    ("circle", [], "proxies"),
    ("circle", ["lasagne"], "proxies: 'lasagne' is 2 token"),
    ("circle", ["two words"], "proxies"),
])
def test_errors_name_the_argument(pipe, word, proxies, match):
    with pytest.raises(ValueError, match=match):
        mix(pipe, PROMPT, word, proxies, num_inference_steps=2)


def test_token_count_quirk_pairs_by_position(pipe):
    prompts, idx = mix_prompts(pipe.tokenizer, PROMPT, "circle", ["lasagne"],
                               reference_quirks=True)
    assert prompts[1] == "a red lasagne on the left" and list(idx) == [3]


# ------------------------------------------------------------------ CLI
def test_cli_files(tiny_sd_dir, tmp_path):
    from jattn.cli import main

    out = tmp_path / "mix"
    rc = main(["edit", "mix", "--model", str(tiny_sd_dir), "--prompt", PROMPT, "--word",
               "circle", "--proxy", "square", "--proxy", "star", "--steps", "2",
               "--out-dir", str(out)])
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000.png", "001.png", "002.png", "grid.png", "result.json"]
    res = json.loads((out / "result.json").read_text())
    assert res["command"] == "edit mix"
    assert res["prompts"] == [PROMPT, "a red square on the left", "a red star on the left"]
