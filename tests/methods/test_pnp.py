"""Plug-and-Play (jattn.methods.pnp) on the tiny random pipeline: the reference's sites on
SD1/SD2 UNet configs, the residual-branch feature site against diffusers (conv2's output
before the shortcut add) and bit-identical when untouched, the generated source equal to
plain generation, zero windows = plain, no recompilation for new prompts/windows, the
real-image path (inversion + re-imposition)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.methods import pnp as pnp_lib
from jattn.models.unet import UNetConfig, list_feature_sites, list_sites
from jattn.policy.features import FeatureInject
from jattn.policy.ops import MemberSource

N = 4  # steps
SRC, TGT = "a red circle", "a blue circle"
SD1 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
           cross_attention_dim=768, attention_head_dim=8, sample_size=8,
           down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
           up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
TINY_CFG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), cross_attention_dim=32, norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SD2 = dict(SD1, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
           use_linear_projection=True)


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    return jattn.load(tiny_sd_dir)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [SD1, SD2], ids=["sd1", "sd2"])
def test_sites_are_the_reference_res_dict_on_sd1_sd2(cfg):
    """On SD1/SD2 UNets the rule 'every decoder self-attention layer but the first' is the
    reference's res_dict {1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}, and the residual site of
    up_blocks.1.resnets.1 exists."""
    c = UNetConfig.from_diffusers(cfg)
    att, feat = pnp_lib.pnp_sites(list_sites(c))
    want = [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1"
            for b, a in [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2)]]
    assert [s.path for s in att] == want
    res = [s for s in list_feature_sites(c) if s.kind == "resnet_residual"]
    assert feat == "up_blocks.1.resnets.1.conv2" and feat in {s.path for s in res}
    assert len(res) == len([s for s in list_feature_sites(c) if s.kind == "resnet"])


@pytest.mark.parametrize("sd2", [False, True], ids=["sd1", "sd2"])
def test_policy_resolves_on_tiny_sd1_sd2(sd2):
    """The tiny SD1/SD2-style configs: decoder self-attention but the first layer, and the
    residual site, resolve (the tiny UNet's decoder has one attention block)."""
    from jattn.policy.core import Layout, Select, resolve

    c = UNetConfig.from_diffusers(dict(TINY_CFG, attention_head_dim=(2, 4) if sd2 else 2,
                                       use_linear_projection=sd2, upcast_attention=sd2))
    sites = list_sites(c) + list_feature_sites(c)
    att, feat = pnp_lib.pnp_sites(sites)
    assert [s.path for s in att] == ["up_blocks.1.attentions.1.transformer_blocks.0.attn1"]
    pol = resolve([(Select(path=feat, kind="resnet_residual"),
                    FeatureInject(jnp.zeros((3, 2), jnp.int32)))], sites,
                  layout=Layout(1, 2, True))
    assert [p for p, _ in pol.table] == [feat]


def test_policy_tables_follow_the_reference_timesteps(pipe):
    """Q, K at steps [0, int(n·0.5)), the residual at [0, int(n·0.8)): the reference's
    ``scheduler.timesteps[:int(n·f)]``; member 0 never takes from anyone."""
    pol = pnp_lib.pnp_policy(pipe, members=3, num_inference_steps=50)
    ms = next(o for o in pol.ops if isinstance(o, MemberSource))
    fi = next(o for o in pol.ops if isinstance(o, FeatureInject))
    q, k, f = (np.asarray(t) for t in (ms.q_from, ms.k_from, fi.table))
    on = lambda t: np.flatnonzero((t != np.arange(3)).any(1))  # noqa: E731
    assert list(on(q)) == list(range(25)) and list(on(k)) == list(range(25))
    assert list(on(f)) == list(range(40)) and ms.v_from is None
    assert (q[:25] == [0, 0, 0]).all() and (f[:40] == [0, 0, 0]).all()
    touched = {p for p, _ in pol.table}
    assert "up_blocks.1.resnets.1.conv2" in touched
    assert "up_blocks.1.attentions.1.transformer_blocks.0.attn1" in touched
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn1" not in touched


def test_residual_site_is_conv2_output_before_the_shortcut(torch_to_numpy_state_dict,
                                                           randomize_torch_module):
    """The value at ``up_blocks.1.resnets.1.conv2`` equals diffusers' conv2 output (a forward
    hook) — the residual branch, not the block's output; a rule that only records there
    leaves the output bit-identical to no policy."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from jattn.models.unet import UNet2DConditionModel, convert_unet_state_dict
    from jattn.policy.core import Layout, Select, resolve
    from jattn.policy.features import FeatureRecord, recorded_features

    tiny = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                cross_attention_dim=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8,
                attention_head_dim=2)
    tm = randomize_torch_module(diffusers.UNet2DConditionModel(**tiny), std=0.08)
    cfg = UNetConfig.from_diffusers(dict(tm.config))
    params = convert_unet_state_dict(torch_to_numpy_state_dict(tm), cfg)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([10.0, 600.0], np.float32)
    c = rng.standard_normal((2, 5, 16)).astype(np.float32)
    got = {}
    hook = tm.up_blocks[1].resnets[1].conv2.register_forward_hook(
        lambda mod, i, o: got.__setitem__("r", o.detach().numpy().transpose(0, 2, 3, 1)))
    with torch.no_grad():
        tm(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
           torch.from_numpy(c))
    hook.remove()
    sites = list_sites(cfg) + list_feature_sites(cfg)
    layout = Layout(groups=1, members=2, cfg=False)
    path = "up_blocks.1.resnets.1.conv2"
    rec = resolve([(Select(path=path, kind="resnet_residual"), FeatureRecord(halves="both"))],
                  sites, layout=layout)
    model = UNet2DConditionModel(cfg)
    run = jax.jit(lambda pol: model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t),
                                          jnp.asarray(c), policy=pol, step=jnp.int32(0)))
    out, aux = run(rec)
    acc = rec.aux_update(rec.aux_init(), aux, jnp.int32(0))
    np.testing.assert_allclose(np.asarray(recorded_features(acc[0])[path]), got["r"],
                               rtol=1e-4, atol=1e-4)
    plain, _ = run(None)  # a record-only rule leaves the output bit for bit
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))


def test_generated_source_is_plain_and_windows_matter(pipe):
    """Member 0 is bit-identical to its plain generation (same negative prompt, seed, batch);
    the target differs; zero windows give the target's plain generation bit for bit; new
    prompts and windows never recompile."""
    neg = pnp_lib.REFERENCE_NEGATIVE
    plain = pipe.generate([SRC, TGT], negative_prompt=neg, num_inference_steps=N,
                          scheduler="ddim", seed=[3, 3], decode=False)
    out = pnp_lib.pnp(pipe, source_prompt=SRC, target_prompts=[TGT], seed=3,
                      num_inference_steps=N)
    np.testing.assert_array_equal(out.latents[0], plain.latents[0])
    assert np.abs(out.latents[1] - plain.latents[1]).max() > 1e-3
    before = dict(pipe.trace_counts)
    off = pnp_lib.pnp(pipe, source_prompt=SRC, target_prompts=[TGT], seed=3,
                      num_inference_steps=N, attn_fraction=0.0, feature_fraction=0.0)
    np.testing.assert_array_equal(off.latents, plain.latents)
    only_f = pnp_lib.pnp(pipe, source_prompt="a green square", target_prompts=["a red square"],
                         seed=4, num_inference_steps=N, attn_fraction=0.0)
    assert only_f.settings["qk_steps"] == [0, 0]
    assert pipe.trace_counts.get("sample") == before.get("sample")


@pytest.mark.slow
def test_real_image_source_follows_the_inversion(pipe):
    """With an image the source row is re-imposed from the DDIM-inversion trajectory each
    step (its final latents are z*_0), every member starts from z*_T, the target is edited."""
    from jattn.sampling.inversion import invert

    img = np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    out = pnp_lib.pnp(pipe, image=img, target_prompts=[TGT], num_inference_steps=N)
    inv = invert(pipe, img[None], "", method="ddim", num_inference_steps=N)
    np.testing.assert_array_equal(out.latents[0], inv.latents[0].transpose(0, 3, 1, 2)[0])
    assert out.images.shape == (2, 16, 16, 3) and out.settings["real_image"]
    regen = pipe.generate([TGT], negative_prompt=pnp_lib.REFERENCE_NEGATIVE,
                          num_inference_steps=N, scheduler="ddim", latents=inv.x_t,
                          decode=False)
    assert np.abs(out.latents[1] - regen.latents[0]).max() > 1e-3


def test_errors_name_the_argument(pipe):
    with pytest.raises(ValueError, match="target_prompts"):
        pnp_lib.pnp(pipe, source_prompt=SRC, target_prompts=[], num_inference_steps=N)
    with pytest.raises(ValueError, match="source_prompt"):
        pnp_lib.pnp(pipe, target_prompts=[TGT], num_inference_steps=N)
    with pytest.raises(ValueError, match="attn_fraction"):
        pnp_lib.pnp_policy(pipe, members=2, num_inference_steps=N, attn_fraction=1.5)
    with pytest.raises(ValueError, match="feature_fraction"):
        pnp_lib.pnp_policy(pipe, members=2, num_inference_steps=N, feature_fraction=-0.1)
    with pytest.raises(ValueError, match="members"):
        pnp_lib.pnp_policy(pipe, members=1, num_inference_steps=N)
