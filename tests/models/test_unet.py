"""UNet2DConditionModel: parity with diffusers on tiny random models, sites, policy seam,
converter and config round trips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jattn.io.convert import CheckpointMismatchError  # noqa: E402
from jattn.models.attention import default_attention  # noqa: E402
from jattn.models.unet import (UNet2DConditionModel, UNetConfig,  # noqa: E402
                               convert_unet_state_dict, init_params, list_sites, param_shapes,
                               timestep_features,
                               unet_state_dict)

CTX_DIM = 32

BASE = dict(
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
    cross_attention_dim=CTX_DIM, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=16,
)
CONFIGS = {
    # SD1.x: int attention_head_dim = number of heads, 1x1 conv proj_in/proj_out
    "sd1": dict(BASE, attention_head_dim=4),
    # SD2.x: per-block head counts, linear projections, upcast attention, 3 blocks,
    # attention in the last down block's pair; non-square latents not divisible by 4
    "sd2": dict(BASE, block_out_channels=(32, 64, 64), attention_head_dim=[2, 4, 8],
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                use_linear_projection=True, upcast_attention=True, sample_size=(6, 10)),
    # attn1 of the first block (down) / last block (up) attends to the context
    "only_cross": dict(BASE, attention_head_dim=2, only_cross_attention=[True, False]),
    # two transformer blocks per attention module where it matters; mid uses the last
    "depth2": dict(BASE, attention_head_dim=4, transformer_layers_per_block=[1, 2],
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), sample_size=8),
}


def _torch_unet(name, randomize_torch_module, seed=0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**CONFIGS[name])
    return randomize_torch_module(model, seed=seed)


def _inputs(cfg: UNetConfig, batch=2, tokens=7, seed=0):
    rng = np.random.default_rng(seed)
    ss = cfg.sample_size
    h, w = (ss, ss) if isinstance(ss, int) else ss
    x = rng.standard_normal((batch, cfg.in_channels, h, w)).astype(np.float32)  # NCHW
    t = np.array([10.0, 731.0][:batch], np.float32)
    ctx = rng.standard_normal((batch, tokens, CTX_DIM)).astype(np.float32)
    return x, t, ctx


def _apply_fn(cfg, policy=None):
    model = UNet2DConditionModel(cfg)
    return jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c, policy=policy))


def _nhwc(x):
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_diffusers(name, randomize_torch_module, torch_to_numpy_state_dict):
    """Same random weights, batch of 2 with different timesteps: jattn's NHWC UNet equals
    diffusers' to float32 rounding. Fails on any layer-order, norm, head-split, GEGLU,
    skip-connection, upsample-size, timestep-embedding or conversion mistake."""
    tm = _torch_unet(name, randomize_torch_module)
    cfg = UNetConfig.from_diffusers(dict(tm.config))
    x, t, ctx = _inputs(cfg)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    params = convert_unet_state_dict(torch_to_numpy_state_dict(tm), cfg)
    out, aux = _apply_fn(cfg)(params, _nhwc(x), jnp.asarray(t), jnp.asarray(ctx))
    out = np.transpose(np.asarray(out), (0, 3, 1, 2))
    assert out.shape == ref.shape and aux == {}
    err = np.abs(out - ref).max()
    scale = max(1.0, float(np.abs(ref).max()))
    # float32 rounding grows with the output's magnitude (|ref| up to ~10 here)
    assert err <= 1e-5 * scale, (name, err, scale)
    # the two samples really differ (different timesteps and inputs are both used)
    assert np.abs(out[0] - out[1]).max() > 0.1


def _torch_attention_calls(tm, x, t, ctx):
    """(path, query tokens, heads, head_dim) of each diffusers Attention call, in call order."""
    calls, hooks = [], []
    for path, mod in tm.named_modules():
        if path.endswith(("attn1", "attn2")):
            hook = (lambda p, m: lambda mod_, args, kwargs, out: calls.append(
                (p, args[0].shape[1], m.heads, m.inner_dim // m.heads)))(path, mod)
            hooks.append(mod.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        tm(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx))
    for h in hooks:
        h.remove()
    return calls


@pytest.mark.parametrize("name", ["sd2", "only_cross", "depth2"])
def test_list_sites_matches_diffusers(name, randomize_torch_module):
    """list_sites names every diffusers attn1/attn2 module, in the order diffusers calls
    them, with the right query grid, heads and head dim. Fails if a site path is misnamed
    (policies would silently miss layers), missing, or out of order."""
    tm = _torch_unet(name, randomize_torch_module)
    cfg = UNetConfig.from_diffusers(dict(tm.config))
    x, t, ctx = _inputs(cfg, batch=1)
    calls = _torch_attention_calls(tm, x, t, ctx)
    sites = list_sites(cfg, context_tokens=7)
    names = sorted(p for p, _ in tm.named_modules() if p.endswith(("attn1", "attn2")))
    assert sorted(s.path for s in sites) == names
    assert [(s.path, s.query_tokens, s.num_heads, s.head_dim) for s in sites] == calls
    for s in sites:
        only_cross = cfg.only_cross_attention[0] and s.path.startswith(
            ("down_blocks.0.", f"up_blocks.{len(cfg.block_out_channels) - 1}."))
        assert s.kind == ("cross" if s.path.endswith("attn2") or only_cross else "self")
        assert s.block == s.path.split("_")[0]
    if name == "sd2":  # non-square grid: (6, 10) -> (3, 5) -> (2, 3)
        assert {s.resolution for s in sites} == {(6, 10), (3, 5), (2, 3)}


class _IdentityPolicy:
    def attend(self, site, q, k, v, step, *, upcast):
        return None


class _RecordingPolicy:
    """Plain attention at every site; records the cross-attention maps."""

    def attend(self, site, q, k, v, step, *, upcast):
        out = default_attention(q, k, v, upcast=upcast)
        if site.kind != "cross":
            return out, {}
        probs = jnp.einsum("BTNH,BSNH->BNTS", q, k)
        return out, {"probs": probs}


# one level: down, mid and up attention, no resampling; compiles fast
ONE_LEVEL = dict(BASE, block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                 up_block_types=("CrossAttnUpBlock2D",), attention_head_dim=2, sample_size=8)


def test_identity_policy_is_bit_identical():
    """A policy that leaves every site alone gives exactly the no-policy output. Fails if
    the policy path changes the computation (e.g. a different attention kernel)."""
    cfg = UNetConfig.from_diffusers(ONE_LEVEL)
    params = init_params(cfg, jax.random.key(0))
    x, t, ctx = _inputs(cfg)
    args = (params, _nhwc(x), jnp.asarray(t), jnp.asarray(ctx))
    out0, aux0 = _apply_fn(cfg)(*args)
    out1, aux1 = _apply_fn(cfg, _IdentityPolicy())(*args)
    assert aux0 == {} and aux1 == {}
    assert np.abs(np.asarray(out0)).max() > 0.1
    assert np.array_equal(np.asarray(out0), np.asarray(out1))


def test_bfloat16_computation():
    """dtype=bfloat16 computes in bfloat16 from float32 params (upcast attention on) and
    stays close to float32. Fails on a dtype mismatch (e.g. skip concatenation, norms)
    or a bfloat16 overflow."""
    cfg = UNetConfig.from_diffusers(dict(ONE_LEVEL, upcast_attention=True))
    params = init_params(cfg, jax.random.key(0))
    x, t, ctx = _inputs(cfg)
    outs = []
    for dtype in (jnp.float32, jnp.bfloat16):
        model = UNet2DConditionModel(cfg, dtype=dtype)
        out, _ = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))(
            params, _nhwc(x), jnp.asarray(t), jnp.asarray(ctx))
        assert out.dtype == dtype
        outs.append(np.asarray(out.astype(jnp.float32)))
    assert np.abs(outs[0] - outs[1]).max() <= 0.05 * np.abs(outs[0]).max()


def test_aux_is_keyed_by_site_path():
    """aux holds exactly the sites whose policy aux is non-empty, keyed by site path, with
    (B, N, T, S) maps. Checked with eval_shape (no FLOPs). Fails if aux is dropped or
    merged under the wrong keys."""
    cfg = UNetConfig.from_diffusers(CONFIGS["sd1"])
    model = UNet2DConditionModel(cfg)
    x = jax.ShapeDtypeStruct((2, 16, 16, 4), jnp.float32)
    ctx = jax.ShapeDtypeStruct((2, 7, CTX_DIM), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    (out, aux), _ = jax.eval_shape(
        lambda x, t, c: model.init_with_output(jax.random.key(0), x, t, c,
                                               policy=_RecordingPolicy(), step=0), x, t, ctx)
    assert out.shape == (2, 16, 16, 4)
    cross = [s for s in list_sites(cfg) if s.kind == "cross"]
    assert list(aux) == [s.path for s in cross]
    for s in cross:
        assert aux[s.path]["probs"].shape == (2, s.num_heads, s.query_tokens, 7)


def test_scalar_timestep_broadcasts():
    """A scalar (or (1,)) timestep gives the same features as that timestep per sample.
    Fails if the scalar path embeds the wrong shape."""
    cfg = UNetConfig.from_diffusers(CONFIGS["sd1"])
    want = np.asarray(timestep_features(cfg, jnp.full((3,), 500.0), 3))
    assert want.shape == (3, 32)
    for t in (jnp.float32(500.0), jnp.array([500.0]), 500):
        np.testing.assert_array_equal(np.asarray(timestep_features(cfg, t, 3)), want)


def test_state_dict_round_trip(randomize_torch_module, torch_to_numpy_state_dict):
    """diffusers -> jattn -> diffusers gives back every tensor exactly, and jattn-initialised
    params export into diffusers with strict=True. Fails if export names or layouts
    (transposes) are wrong, so the bundled model could not be loaded by diffusers."""
    tm = _torch_unet("sd2", randomize_torch_module)
    cfg = UNetConfig.from_diffusers(dict(tm.config))
    sd = torch_to_numpy_state_dict(tm)
    back = unet_state_dict(convert_unet_state_dict(sd, cfg))
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)

    fresh = diffusers.UNet2DConditionModel(**CONFIGS["sd2"])
    exported = unet_state_dict(init_params(cfg, jax.random.key(0)))
    fresh.load_state_dict({k: torch.tensor(v) for k, v in exported.items()}, strict=True)
    got = torch_to_numpy_state_dict(fresh)
    for k, v in exported.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_converter_names_missing_and_misshapen_keys(randomize_torch_module,
                                                    torch_to_numpy_state_dict):
    """A truncated checkpoint names the missing key; a wrong shape names the key and both
    shapes. Fails if conversion silently accepts a broken checkpoint."""
    tm = _torch_unet("sd1", randomize_torch_module)
    cfg = UNetConfig.from_diffusers(dict(tm.config))
    sd = torch_to_numpy_state_dict(tm)
    missing = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    truncated = {k: v for k, v in sd.items() if k != missing}
    with pytest.raises(CheckpointMismatchError, match=missing.replace(".", r"\.")):
        convert_unet_state_dict(truncated, cfg)
    bad = "down_blocks.0.resnets.0.conv1.weight"
    wrong = dict(sd, **{bad: np.zeros((32, 32, 3, 1), np.float32)})
    with pytest.raises(CheckpointMismatchError, match=bad.replace(".", r"\.")) as e:
        convert_unet_state_dict(wrong, cfg)
    assert "(32, 32, 3, 1)" in str(e.value)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trip(name):
    """from_diffusers(to_diffusers(c)) == c, and to_diffusers builds a diffusers UNet with
    the same parameter names and shapes as jattn's. Fails if exported config.json would
    describe a different model (e.g. the heads misnomer written the wrong way round)."""
    cfg = UNetConfig.from_diffusers(CONFIGS[name])
    d = cfg.to_diffusers()
    assert UNetConfig.from_diffusers(d) == cfg
    tm = diffusers.UNet2DConditionModel(**{k: v for k, v in d.items() if k[0] != "_"})
    ours = unet_state_dict(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), param_shapes(cfg)))
    assert {k: tuple(v.shape) for k, v in tm.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ours.items()}


def test_heads_misnomer_and_errors():
    """attention_head_dim (with num_attention_heads null) is the number of heads; SDXL and
    unsupported options raise a clear ValueError. Fails if SD1.x checkpoints were built with
    the wrong head split, or unsupported checkpoints were half-loaded."""
    cfg = UNetConfig.from_diffusers(dict(CONFIGS["sd2"]))
    assert cfg.num_heads == (2, 4, 8) and cfg.head_dims == (16, 16, 8)
    cfg = UNetConfig.from_diffusers(dict(CONFIGS["sd1"], attention_head_dim=None,
                                         num_attention_heads=2))
    assert cfg.num_heads == (2, 2) and cfg.head_dims == (16, 32)
    with pytest.raises(ValueError, match="text_time' needs addition_time_embed_dim"):
        UNetConfig.from_diffusers(dict(CONFIGS["sd1"], addition_embed_type="text_time"))
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        UNetConfig.from_diffusers(dict(CONFIGS["sd1"], resnet_time_scale_shift="scale_shift"))
    with pytest.raises(ValueError, match="unknown diffusers config keys"):
        UNetConfig.from_diffusers(dict(CONFIGS["sd1"], not_a_key=1))
    with pytest.raises(ValueError, match="not divisible"):
        UNetConfig.from_diffusers(dict(CONFIGS["sd1"], attention_head_dim=3))


@pytest.mark.parametrize("t,s", [(300, 1000), (64, 7)])
def test_cpu_attention_path_matches_reference(t, s):
    """The seam's CPU path (per-head, query-blocked, normalised after the value product;
    used by every UNet site without a policy) equals plain softmax attention, including a
    query count that is not a multiple of the block. Fails if blocking, padding or the
    deferred normalisation is wrong."""
    from jattn.models import attention as attn_lib

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, t, 3, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, s, 3, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, s, 3, 8)), jnp.float32)
    want = attn_lib.apply_probs(attn_lib.attention_probs(q, k), v)
    got = jax.jit(attn_lib._blocked_attention)(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=0)
