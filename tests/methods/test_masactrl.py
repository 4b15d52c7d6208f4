"""MasaCtrl (jattn.methods.masactrl) on the tiny random pipeline: the reference's layers
(block 10 of 16) on SD1/SD2 UNets and the fraction rule on tiny configs, the source
bit-identical to plain generation (plain variant), a zero-step window = plain, the mask
variants, the auto masks against a NumPy restatement of ``aggregate_cross_attn_map`` +
threshold, no recompilation for new prompts/windows/masks, the real-image path."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.methods import masactrl as mc
from jattn.models.unet import UNetConfig, list_sites
from jattn.policy.cross_masks import CrossMapMask, threshold_maps
from jattn.policy.ops import MemberSource
from jattn.policy.shared import AuxMask, GivenMask, SharedAttention

N = 4
SRC, TGT = "a red circle", "a red circle on the right"
TINY_CFG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), cross_attention_dim=32, norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SD1 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
           cross_attention_dim=768, attention_head_dim=8, sample_size=8,
           down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
           up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    return jattn.load(tiny_sd_dir)


@pytest.mark.slow
@pytest.mark.parametrize("sd2", [False, True], ids=["sd1", "sd2"])
def test_reference_layers_on_sd1_sd2(sd2):
    """On SD1/SD2 the default (decoder at its two largest resolutions), the fraction 10/16
    and the int 10 all select the reference's ``cur_att_layer // 2 >= 10``: the
    self-attention of up_blocks.2 and up_blocks.3."""
    cfg = dict(SD1, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
               use_linear_projection=True) if sd2 else SD1
    sites = list_sites(UNetConfig.from_diffusers(cfg))
    want = [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1"
            for b in (2, 3) for a in range(3)]
    assert [s.path for s in mc.masactrl_sites(sites)] == want
    assert [s.path for s in mc.masactrl_sites(sites, 10)] == want
    assert [s.path for s in mc.masactrl_sites(sites, 0.625)] == want
    assert mc.auto_mask_resolution(list_sites(UNetConfig.from_diffusers(
        dict(cfg, sample_size=64)))) == (16, 16)


@pytest.mark.parametrize("sd2", [False, True], ids=["sd1", "sd2"])
def test_fraction_rule_on_tiny_sd1_sd2(sd2):
    """The default on a decoder with one attention resolution: all its layers; the fraction
    rule ceil(0.625 · L) of the L self-attention layers in call order (tiny: L = 4 -> the
    last decoder layer); every variant's op resolves there."""
    from jattn.policy.core import Layout, Select, resolve

    c = UNetConfig.from_diffusers(dict(TINY_CFG, attention_head_dim=(2, 4) if sd2 else 2,
                                       use_linear_projection=sd2, upcast_attention=sd2))
    sites = list_sites(c)
    assert [s.path for s in mc.masactrl_sites(sites)] == [
        f"up_blocks.1.attentions.{a}.transformer_blocks.0.attn1" for a in (0, 1)]
    chosen = mc.masactrl_sites(sites, 0.625)
    selfs = [s for s in sites if s.kind == "self"]
    assert chosen == selfs[math.ceil(0.625 * len(selfs)):]
    assert [s.path for s in chosen] == ["up_blocks.1.attentions.1.transformer_blocks.0.attn1"]
    ops = [MemberSource(k_from=jnp.zeros((3, 2), jnp.int32)),
           SharedAttention(jnp.zeros((3, 2), jnp.int32), own=False,
                           mask=GivenMask(jnp.ones((2, 4, 4))), match_query=True)]
    for op in ops:
        pol = resolve([(Select(path=chosen[0].path), op)], sites, layout=Layout(1, 2, True))
        assert [p for p, _ in pol.table] == [chosen[0].path]
    with pytest.raises(ValueError, match="start_layer"):
        mc.masactrl_sites(sites, 1.5)


def _ref_auto_mask(probs, idx, thres):
    """NumPy restatement of MasaCtrl's ``aggregate_cross_attn_map`` + binarisation: mean over
    the layers of head-averaged maps (B, T, S), sum over the token indices, min-max per image,
    ``>= thres``."""
    m = np.mean(np.stack(probs, 1), 1)                     # (B, T, S)
    img = m[..., idx].sum(-1)                              # (B, T)
    lo, hi = img.min(-1, keepdims=True), img.max(-1, keepdims=True)
    img = (img - lo) / (hi - lo)
    return (img >= thres).astype(np.float32)


def test_cross_map_mask_matches_reference():
    """CrossMapMask's record + aux_update (two layers, CFG, 2 members) equals the NumPy
    restatement on the conditional rows; a constant map gives all ones."""
    from jattn.models.attention import AttentionSite
    from jattn.policy.core import Layout, SiteContext

    lay = Layout(1, 2, True)
    site = AttentionSite("up.attn2", "cross", (4, 4), 2, 8, "up")
    rng = np.random.default_rng(0)
    w = np.zeros((2, 77), np.float32)
    w[0, [2, 3]] = 1
    w[1, 5] = 1
    op = CrossMapMask(jnp.asarray(w), jnp.float32(0.1), resolution=(4, 4))
    probs = [rng.dirichlet(np.ones(77), size=(4, 2, 16)).astype(np.float32) for _ in range(2)]
    ctx = SiteContext(site, jnp.int32(0), lay)
    per = {f"l{i}": op.record(ctx, jnp.asarray(p), None) for i, p in enumerate(probs)}
    acc = op.aux_update(op.aux_init([site], lay, 77), per, jnp.int32(0), [site])
    heads = [p.mean(1)[2:] for p in probs]                 # cond rows, head mean
    want = np.stack([_ref_auto_mask(heads, [2, 3], 0.1)[0], _ref_auto_mask(heads, [5], 0.1)[1]])
    np.testing.assert_array_equal(np.asarray(acc["mask"])[0].reshape(2, 16), want)
    assert np.asarray(threshold_maps(jnp.ones((3, 5)), 0.5)).min() == 1.0


@pytest.fixture(scope="module")
def plain(pipe):
    return pipe.generate([SRC, TGT], num_inference_steps=N, scheduler="ddim", seed=[2, 2],
                         decode=False)


def test_plain_variant_source_unchanged_target_edited(pipe, plain):
    """The source is bit-identical to plain generation of the same batch and noise; the
    target differs; a window of zero steps (start_step=1) is plain generation bit for bit;
    new prompts and windows never recompile."""
    out = mc.masactrl(pipe, SRC, TGT, seed=2, num_inference_steps=N)
    np.testing.assert_array_equal(out.latents[0], plain.latents[0])
    assert np.abs(out.latents[1] - plain.latents[1]).max() > 1e-3
    before = dict(pipe.trace_counts)
    off = mc.masactrl(pipe, SRC, TGT, seed=2, num_inference_steps=N, start_step=1.0)
    np.testing.assert_array_equal(off.latents, plain.latents)
    other = mc.masactrl(pipe, "a blue square", ["a big blue square"], seed=7,
                        num_inference_steps=N, start_step=0.5)
    assert other.settings["first_step"] == 2
    assert pipe.trace_counts.get("sample") == before.get("sample")


def test_mask_variant_and_new_masks_do_not_recompile(pipe, plain):
    """The mask variant edits the target, keeps the source bit for bit (the source's rows
    take the fused plain attention although the site runs on materialised probabilities;
    breaks if SharedAttention.edit_output stops selecting them); full masks = the plain
    variant's attention (all source tokens allowed); new masks never recompile."""
    ones = np.ones((8, 8), np.float32)
    full = mc.masactrl(pipe, SRC, TGT, seed=2, num_inference_steps=N, variant="mask",
                       mask_s=ones, mask_t=ones)
    ref = mc.masactrl(pipe, SRC, TGT, seed=2, num_inference_steps=N)
    np.testing.assert_allclose(full.latents, ref.latents, atol=2e-4)
    before = dict(pipe.trace_counts)
    left = np.zeros((16, 16), np.float32)
    left[:, :8] = 1
    out = mc.masactrl(pipe, SRC, TGT, seed=2, num_inference_steps=N, variant="mask",
                      mask_s=left, mask_t=left[:, ::-1].copy())
    assert pipe.trace_counts.get("sample") == before.get("sample")
    np.testing.assert_array_equal(out.latents[0], plain.latents[0])
    assert np.abs(out.latents[1] - ref.latents[1]).max() > 1e-4
    assert out.masks.shape == (2, 8, 8)  # image-size masks -> latent grid
    with pytest.raises(ValueError, match="mask_s"):
        mc.masactrl(pipe, SRC, TGT, num_inference_steps=N, variant="mask",
                    mask_s=np.ones((5, 5)), mask_t=ones)


@pytest.mark.slow
def test_union_and_auto_mask_variants(pipe, plain):
    """Union: K, V = concat[own; source], the source bit-identical to plain generation;
    auto-mask: binary masks (M, 8, 8) from the token's cross maps, bound from the
    accumulator; its source equal up to rounding only (recording the cross maps
    materialises the probabilities of every row at the cross-attention sites)."""
    u = mc.masactrl(pipe, SRC, TGT, seed=2, num_inference_steps=N, variant="union")
    np.testing.assert_array_equal(u.latents[0], plain.latents[0])
    assert np.abs(u.latents[1] - plain.latents[1]).max() > 1e-4
    a = mc.masactrl(pipe, SRC, TGT, seed=2, num_inference_steps=N, variant="auto-mask",
                    token="circle")
    assert a.masks.shape == (2, 8, 8) and set(np.unique(a.masks)) <= {0.0, 1.0}
    np.testing.assert_allclose(a.latents[0], plain.latents[0], atol=2e-4)
    pol = mc.masactrl_policy(pipe, members=2, num_inference_steps=N, variant="auto-mask",
                             token_weights=np.ones((2, 77), np.float32))
    assert isinstance(pol.ops[0], CrossMapMask) and isinstance(pol.ops[1].mask, AuxMask)


@pytest.mark.slow
def test_real_image_inversion_and_reimposition(pipe):
    """Real image: every member starts from z*_T (DDIM inversion with ""); with
    follow_inversion the source's final latents are z*_0 (re-imposed each step)."""
    from jattn.sampling.inversion import invert

    img = np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    out = mc.masactrl(pipe, None, TGT, image=img, num_inference_steps=N,
                      follow_inversion=True)
    inv = invert(pipe, img[None], "", method="ddim", num_inference_steps=N)
    np.testing.assert_array_equal(out.latents[0], inv.latents[0].transpose(0, 3, 1, 2)[0])
    regen = mc.masactrl(pipe, None, TGT, image=img, num_inference_steps=N)
    plain = pipe.generate(["", TGT], num_inference_steps=N, scheduler="ddim",
                          latents=np.repeat(inv.x_t, 2, 0), decode=False)
    np.testing.assert_array_equal(regen.latents[0], plain.latents[0])


def test_errors_name_the_argument(pipe):
    with pytest.raises(ValueError, match="target_prompts"):
        mc.masactrl(pipe, SRC, [], num_inference_steps=N)
    with pytest.raises(ValueError, match="start_step"):
        mc.masactrl_policy(pipe, members=2, num_inference_steps=N, start_step=1.5)
    with pytest.raises(ValueError, match="token"):
        mc.masactrl(pipe, SRC, TGT, num_inference_steps=N, variant="auto-mask", token="dog")
    with pytest.raises(ValueError, match="variant"):
        mc.masactrl_policy(pipe, members=2, num_inference_steps=N, variant="blend")
    with pytest.raises(ValueError, match="members"):
        mc.masactrl_policy(pipe, members=1, num_inference_steps=N)
