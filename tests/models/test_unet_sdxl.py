"""SDXL's UNet (issue 16): added text/time conditioning (``addition_embed_type="text_time"``),
a DownBlock2D first, per-block transformer depth and heads, no attention in the last up
block. Parity with diffusers on a tiny random SDXL-like UNet, converter, config round trip,
bad ``added_cond``, sites by diffusers path; and the real SDXL base configuration checked
without weights (140 attention sites at 128² latents, 2,567,463,684 parameters)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import _randomize_torch_module  # noqa: E402
from flax import traverse_util  # noqa: E402

from jattn.io.convert import CheckpointMismatchError, flax_key_to_torch  # noqa: E402
from jattn.models.unet import (ADDED_EMBEDDINGS, TextTimeEmbedding,  # noqa: E402
                               UNet2DConditionModel, UNetConfig, convert_unet_state_dict,
                               init_params, list_sites, param_shapes, unet_state_dict)

CTX_DIM = 64
TEXT_DIM = 16  # pooled text embedding width P (SDXL: 1280)
TIME_DIM = 8  # addition_time_embed_dim (SDXL: 256)
N_IDS = 6  # time ids K (SDXL: original size, crop top-left, target size)

# SDXL's layout, tiny: no attention at the largest grid, depth 1 then 2 (SDXL 2 then 10),
# per-block heads, linear projections, mirrored up path with UpBlock2D last
TINY_SDXL = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=CTX_DIM,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8),
    use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=N_IDS * TIME_DIM + TEXT_DIM)

# diffusers' stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL_BASE = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64,
    addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280], center_input_sample=False, class_embed_type=None,
    class_embeddings_concat=False, conv_in_kernel=3, conv_out_kernel=3,
    cross_attention_dim=2048, cross_attention_norm=None,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1, dual_cross_attention=False, encoder_hid_dim=None,
    encoder_hid_dim_type=None, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_only_cross_attention=None, mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-05, norm_num_groups=32,
    num_attention_heads=None, num_class_embeds=None, only_cross_attention=False,
    out_channels=4, projection_class_embeddings_input_dim=2816,
    resnet_out_scale_factor=1.0, resnet_skip_time_act=False,
    resnet_time_scale_shift="default", sample_size=128, time_cond_proj_dim=None,
    time_embedding_act_fn=None, time_embedding_dim=None, time_embedding_type="positional",
    timestep_post_act=None, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    upcast_attention=None, use_linear_projection=True)
SDXL_PARAMS = 2_567_463_684  # diffusers' SDXL base UNet


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny SDXL-like UNet, random weights (torch manual_seed), saved with
    save_pretrained; returns (folder, torch model)."""
    torch.manual_seed(0)
    tm = _randomize_torch_module(diffusers.UNet2DConditionModel(**TINY_SDXL), seed=0)
    path = tmp_path_factory.mktemp("sdxl_unet")
    tm.save_pretrained(path, safe_serialization=True)
    return path, tm


def _load(path):
    """Config and params through jattn's own reader (no torch)."""
    import json

    from safetensors.numpy import load_file

    cfg = UNetConfig.from_diffusers(json.loads((path / "config.json").read_text()))
    sd = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    return cfg, convert_unet_state_dict(sd, cfg)


def _inputs(batch=2, tokens=7, seed=0, size=16):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 4, size, size)).astype(np.float32)  # NCHW
    t = np.array([10.0, 731.0][:batch], np.float32)
    ctx = rng.standard_normal((batch, tokens, CTX_DIM)).astype(np.float32)
    text = rng.standard_normal((batch, TEXT_DIM)).astype(np.float32)
    # (original h, w, crop top, left, target h, w), different per sample
    ids = np.array([[128, 128, 0, 0, 128, 128], [96, 160, 8, 4, 128, 128]][:batch],
                   np.float32)
    return x, t, ctx, {"text_embeds": text, "time_ids": ids}


def _nhwc(x):
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def _apply(cfg):
    model = UNet2DConditionModel(cfg)
    return jax.jit(lambda p, x, t, c, a: model.apply({"params": p}, x, t, c, added_cond=a))


def test_parity_with_diffusers(tiny_dir):
    """save_pretrained folder -> jattn's converter -> same output as diffusers' SDXL-like
    UNet (fp32, batch 2, different timesteps, pooled embeddings and time ids). Fails on a
    wrong time-id projection (order of the concat, flip_sin_to_cos, flattening), a missing
    add to temb, per-block depth/heads, the up path of a DownBlock2D-first layout, or a
    conversion mistake."""
    path, tm = tiny_dir
    cfg, params = _load(path)
    x, t, ctx, added = _inputs()
    with torch.no_grad():
        ref = tm(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                 added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}
                 ).sample.numpy()
    apply = _apply(cfg)  # one compilation for both calls
    out, aux = apply(params, _nhwc(x), jnp.asarray(t), jnp.asarray(ctx),
                     {k: jnp.asarray(v) for k, v in added.items()})
    out = np.transpose(np.asarray(out), (0, 3, 1, 2))
    assert out.shape == ref.shape and aux == {}
    err = np.abs(out - ref).max()
    scale = max(1.0, float(np.abs(ref).max()))
    assert err <= 1e-5 * scale, (err, scale)
    # the added conditioning matters: other time ids change the output
    other = dict(added, time_ids=added["time_ids"][::-1].copy())
    out2, _ = apply(params, _nhwc(x), jnp.asarray(t), jnp.asarray(ctx),
                    {k: jnp.asarray(v) for k, v in other.items()})
    assert np.abs(np.asarray(out2).transpose(0, 3, 1, 2) - out).max() > 1e-3


def test_converter_and_state_dict_round_trip(tiny_dir, torch_to_numpy_state_dict):
    """add_embedding.linear_1/linear_2 convert and export back exactly; a checkpoint
    without them (an SD1-style file under an SDXL config) names both missing keys; a
    misshapen linear_1 names the key and both shapes; an SDXL checkpoint under the same
    config without added conditioning names them as unexpected."""
    path, tm = tiny_dir
    sd = torch_to_numpy_state_dict(tm)
    cfg = UNetConfig.from_diffusers(dict(tm.config))
    params = convert_unet_state_dict(sd, cfg)
    assert params["add_embedding"]["linear_1"]["kernel"].shape == (
        N_IDS * TIME_DIM + TEXT_DIM, 128)
    back = unet_state_dict(params)
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)

    names = [f"add_embedding.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")]
    no_add = {k: v for k, v in sd.items() if not k.startswith("add_embedding.")}
    with pytest.raises(CheckpointMismatchError) as e:
        convert_unet_state_dict(no_add, cfg)
    assert all(n in str(e.value) for n in names), str(e.value)
    bad = dict(sd, **{"add_embedding.linear_1.weight": np.zeros((128, 60), np.float32)})
    with pytest.raises(CheckpointMismatchError, match=r"add_embedding\.linear_1\.weight") as e:
        convert_unet_state_dict(bad, cfg)
    assert "(128, 60)" in str(e.value)
    plain = cfg.replace(addition_embed_type=None, addition_time_embed_dim=None,
                        projection_class_embeddings_input_dim=None)
    with pytest.raises(CheckpointMismatchError) as e:
        convert_unet_state_dict(sd, plain)
    assert "in checkpoint, not in model (4)" in str(e.value)
    assert all(n in str(e.value) for n in names)

    # jattn-initialised params load into diffusers with strict=True
    fresh = diffusers.UNet2DConditionModel(**TINY_SDXL)
    fresh.load_state_dict({k: torch.tensor(v) for k, v in
                           unet_state_dict(init_params(cfg, jax.random.key(0))).items()},
                          strict=True)


def test_config_round_trip(tiny_dir):
    """from_diffusers(to_diffusers(c)) == c for the SDXL-like and the real SDXL config,
    the added-embedding fields are read, and to_diffusers builds a diffusers UNet with
    jattn's parameter names and shapes. Fails if exported SDXL configs lose the added
    conditioning."""
    path, tm = tiny_dir
    cfg = UNetConfig.from_diffusers(dict(tm.config))
    assert (cfg.addition_embed_type, cfg.addition_time_embed_dim,
            cfg.projection_class_embeddings_input_dim) == ("text_time", TIME_DIM, 64)
    assert cfg.transformer_layers_per_block == (1, 1, 2) and cfg.num_heads == (2, 4, 8)
    d = cfg.to_diffusers()
    assert UNetConfig.from_diffusers(d) == cfg
    tm2 = diffusers.UNet2DConditionModel(**{k: v for k, v in d.items() if k[0] != "_"})
    ours = unet_state_dict(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), param_shapes(cfg)))
    assert {k: tuple(v.shape) for k, v in tm2.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ours.items()}
    xl = UNetConfig.from_diffusers(SDXL_BASE)
    assert UNetConfig.from_diffusers(xl.to_diffusers()) == xl
    assert xl.num_heads == (5, 10, 20) and xl.head_dims == (64, 64, 64)
    assert xl.transformer_layers_per_block == (1, 2, 10)
    assert set(ADDED_EMBEDDINGS) == {"text_time"}
    assert isinstance(ADDED_EMBEDDINGS["text_time"], TextTimeEmbedding)


def test_config_errors():
    """Unsupported added-conditioning variants and incomplete text_time configs raise one
    clear ValueError naming the key. Fails if such checkpoints half-load."""
    with pytest.raises(ValueError, match="addition_embed_type='text'.*not supported"):
        UNetConfig.from_diffusers(dict(SDXL_BASE, addition_embed_type="text"))
    with pytest.raises(ValueError, match="addition_embed_type='image'.*not supported"):
        UNetConfig.from_diffusers(dict(SDXL_BASE, addition_embed_type="image"))
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        UNetConfig.from_diffusers(dict(SDXL_BASE, projection_class_embeddings_input_dim=None))
    with pytest.raises(ValueError, match="addition_time_embed_dim"):
        UNetConfig.from_diffusers(dict(SDXL_BASE, addition_time_embed_dim=None))
    with pytest.raises(ValueError, match="addition_time_embed_dim.*without an added"):
        UNetConfig.from_diffusers(dict(SDXL_BASE, addition_embed_type=None))
    with pytest.raises(ValueError, match="reverse_transformer_layers_per_block"):
        UNetConfig.from_diffusers(dict(SDXL_BASE, reverse_transformer_layers_per_block=[
            [10, 10, 10], [2, 2, 2], [1, 1, 1]]))
    with pytest.raises(ValueError, match="nested per-layer"):
        UNetConfig.from_diffusers(dict(SDXL_BASE, transformer_layers_per_block=[
            1, [2, 2], 10]))


def test_bad_added_cond():
    """added_cond missing, with missing/unexpected keys, of the wrong rank/batch/width, or
    given to a UNet without added conditioning: a ValueError naming added_cond and the
    expected keys/shapes. Checked with eval_shape (no FLOPs). Fails if SDXL runs silently
    without its pooled embedding, or SD1 silently ignores it."""
    cfg = UNetConfig.from_diffusers(TINY_SDXL)
    model = UNet2DConditionModel(cfg)
    x = jax.ShapeDtypeStruct((2, 16, 16, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    c = jax.ShapeDtypeStruct((2, 7, CTX_DIM), jnp.float32)

    def run(added, cfg=cfg, model=model):
        return jax.eval_shape(lambda x, t, c, a: model.init_with_output(
            jax.random.key(0), x, t, c, added_cond=a), x, t, c, added)

    s = jax.ShapeDtypeStruct
    good = {"text_embeds": s((2, TEXT_DIM), jnp.float32), "time_ids": s((2, N_IDS), jnp.float32)}
    (out, _), _ = run(good)
    assert out.shape == (2, 16, 16, 4)
    run(dict(good, text_embeds=s((1, TEXT_DIM), jnp.float32)))  # batch 1 broadcasts
    # another split of the same width is valid (the refiner's 5 ids + aesthetic score)
    run({"text_embeds": s((2, TEXT_DIM + TIME_DIM), jnp.float32),
         "time_ids": s((2, N_IDS - 1), jnp.float32)})
    cases = [
        (None, r"needs added_cond=\{'text_embeds': \(B, P\).*'time_ids': \(B, K\)"),
        ({"text_embeds": good["text_embeds"]}, r"added_cond keys missing \['time_ids'\]"),
        (dict(good, extra=good["time_ids"]), r"added_cond keys unexpected \['extra'\]"),
        (dict(good, time_ids=s((2, N_IDS, 1), jnp.float32)), r"added_cond\['time_ids'\]"),
        (dict(good, text_embeds=s((3, TEXT_DIM), jnp.float32)), r"added_cond\['text_embeds'\]"),
        (dict(good, text_embeds=s((2, TEXT_DIM + 1), jnp.float32)),
         r"added_cond widths .* != projection_class_embeddings_input_dim 64"),
        ([1, 2], "added_cond must be a dict"),
    ]
    for added, match in cases:
        with pytest.raises(ValueError, match=match):
            run(added)
    plain = cfg.replace(addition_embed_type=None, addition_time_embed_dim=None,
                        projection_class_embeddings_input_dim=None)
    with pytest.raises(ValueError, match="added_cond was given .* no added conditioning"):
        run(good, plain, UNet2DConditionModel(plain))


def _torch_attention_calls(tm, inputs):
    """(path, query tokens, heads, head_dim) of each diffusers Attention call, in order."""
    calls, hooks = [], []
    for path, mod in tm.named_modules():
        if path.endswith(("attn1", "attn2")):
            hook = (lambda p, m: lambda mod_, args, kwargs, out: calls.append(
                (p, args[0].shape[1], m.heads, m.inner_dim // m.heads)))(path, mod)
            hooks.append(mod.register_forward_hook(hook, with_kwargs=True))
    x, t, ctx, added = inputs
    with torch.no_grad():
        tm(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
           added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()})
    for h in hooks:
        h.remove()
    return calls


def test_sites_by_diffusers_path(tiny_dir):
    """list_sites of the SDXL-like UNet names every diffusers attn1/attn2, in diffusers'
    call order, with its grid, heads and head dim; down_blocks.0 and up_blocks.2 have none,
    down_blocks.2 / mid / up_blocks.0 have two transformer blocks. Fails if a site path
    is misnamed or the per-block depth is read in the wrong order on the up path."""
    _, tm = tiny_dir
    cfg = UNetConfig.from_diffusers(dict(tm.config))
    calls = _torch_attention_calls(tm, _inputs(batch=1))
    sites = list_sites(cfg, context_tokens=7)
    assert [(s.path, s.query_tokens, s.num_heads, s.head_dim) for s in sites] == calls
    paths = [s.path for s in sites]
    assert not [p for p in paths if p.startswith(("down_blocks.0.", "up_blocks.2."))]
    assert "up_blocks.0.attentions.2.transformer_blocks.1.attn2" in paths
    assert "up_blocks.1.attentions.2.transformer_blocks.0.attn2" in paths
    assert "up_blocks.1.attentions.0.transformer_blocks.1.attn1" not in paths
    assert "mid_block.attentions.0.transformer_blocks.1.attn1" in paths


def test_real_sdxl_sites_and_parameter_count():
    """The real SDXL base config (no weights; eval_shape): 140 attention sites at 128²
    latents (70 self + 70 cross, at 64² and 32²; 10 heads at 64², 20 at 32², head dim 64),
    and exactly diffusers' parameter count (2,567,463,684), both per key against a
    diffusers model built on the meta device. Fails if per-block depth, heads or the added
    embedding differ from SDXL."""
    cfg = UNetConfig.from_diffusers(SDXL_BASE)
    sites = list_sites(cfg, 128)
    assert len(sites) == 140
    assert sum(s.kind == "self" for s in sites) == 70
    assert {(s.resolution, s.num_heads, s.head_dim) for s in sites} == {
        ((64, 64), 10, 64), ((32, 32), 20, 64)}
    assert sum(s.path.startswith("mid_block.") for s in sites) == 20
    shapes = param_shapes(cfg)
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert n == SDXL_PARAMS
    with torch.device("meta"):
        tm = diffusers.UNet2DConditionModel(**SDXL_BASE)
    assert {k: tuple(v.shape) for k, v in tm.state_dict().items()} == _torch_shapes(shapes)


def _torch_shapes(shapes) -> dict:
    """{diffusers key: torch-layout shape} of a params-shape tree, nothing allocated."""
    out = {}
    for path, s in traverse_util.flatten_dict(shapes).items():
        shp = tuple(s.shape)
        if path[-1] == "kernel":
            shp = (shp[3], shp[2], shp[0], shp[1]) if len(shp) == 4 else shp[::-1]
        out[flax_key_to_torch(path)] = shp
    return out
