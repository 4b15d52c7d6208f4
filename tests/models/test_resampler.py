"""Parity of jattn's IP-Adapter-Plus resampler with diffusers' ``IPAdapterPlusImageProjection``
and its two checkpoint layouts (tiny random configs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
embeddings = pytest.importorskip("diffusers.models.embeddings")

from conftest import _randomize_torch_module, _torch_to_numpy_state_dict  # noqa: E402
from jattn.io.convert import CheckpointMismatchError  # noqa: E402
from jattn.models.resampler import (  # noqa: E402
    Resampler,
    ResamplerConfig,
    convert_resampler_state_dict,
    init_resampler_params,
    resampler_state_dict,
)

ATOL = 1e-5


def _diffusers_model(cfg: ResamplerConfig, seed: int = 0):
    torch.manual_seed(seed)
    m = embeddings.IPAdapterPlusImageProjection(
        embed_dims=cfg.embedding_dim, output_dims=cfg.output_dim, hidden_dims=cfg.dim,
        depth=cfg.depth, dim_head=cfg.dim_head, heads=cfg.heads, num_queries=cfg.num_queries,
        ffn_ratio=cfg.ff_mult)
    return _randomize_torch_module(m, seed=seed, std=0.2)


def _compare(cfg, torch_model, params, tokens=7, batch=3):
    x = np.random.default_rng(0).normal(size=(batch, tokens, cfg.embedding_dim))
    x = x.astype(np.float32)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x)).numpy()
    out = jax.jit(Resampler(cfg).apply)({"params": params}, jnp.asarray(x))
    assert out.shape == (batch, cfg.num_queries, cfg.output_dim) == ref.shape
    return float(np.abs(np.asarray(out) - ref).max())


# heads·dim_head != dim, non-integer ff_mult, output width != dim: every size is distinct
TINY = ResamplerConfig(dim=32, depth=2, dim_head=8, heads=3, num_queries=5, embedding_dim=24,
                       output_dim=40, ff_mult=1.5)


def test_parity_with_diffusers():
    """Same random weights, same features -> same (B, Q, output_dim) tokens as diffusers'
    IPAdapterPlusImageProjection (fp32, max-abs <= 1e-5). Fails if the latents do not attend
    to [features; latents], a LayerNorm is misplaced, the softmax scale, the GELU flavour or
    a residual is wrong."""
    hf = _diffusers_model(TINY)
    sd = _torch_to_numpy_state_dict(hf)
    assert ResamplerConfig.from_state_dict(sd, dim_head=8) == TINY
    params = convert_resampler_state_dict(sd, TINY, layout="diffusers")
    err = _compare(TINY, hf, params)
    print(f"resampler vs diffusers max-abs {err:.2e}")
    assert err <= ATOL
    # a different number of input tokens (e.g. ViT-H/14's 257) needs no other parameters
    assert _compare(TINY, hf, params, tokens=13, batch=1) <= ATOL


def test_ip_adapter_layout_matches_diffusers_converter():
    """The ip_adapter layout jattn exports (fused to_kv, layers.i.0 / layers.i.1.{0,1,3}) is
    what diffusers' own IP-Adapter-Plus converter (_convert_ip_adapter_image_proj_to_diffusers)
    reads: it rebuilds the original diffusers weights bit-exactly (strict load), the sizes are
    inferred from it, and it converts back to the same params. Fails if a key name or the
    to_kv row order ([to_k; to_v]) is wrong, i.e. IP-Adapter/Nested Attention files would load
    scrambled. (diffusers' converter assumes depth 4, dim_head 64, ff_mult 4.)"""
    from diffusers.loaders.unet import UNet2DConditionLoadersMixin

    cfg = ResamplerConfig(dim=16, depth=4, dim_head=64, heads=1, num_queries=4,
                          embedding_dim=24, output_dim=20, ff_mult=4)
    hf = _diffusers_model(cfg, seed=1)
    params = convert_resampler_state_dict(_torch_to_numpy_state_dict(hf), cfg,
                                          layout="diffusers")
    ip = resampler_state_dict(params, layout="ip_adapter")
    assert "layers.3.0.to_kv.weight" in ip and "layers.3.1.3.weight" in ip
    assert ResamplerConfig.from_state_dict(ip) == cfg
    rebuilt = UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
        None, {k: torch.tensor(v) for k, v in ip.items()}, low_cpu_mem_usage=False)
    for k, v in hf.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[k], v, rtol=0, atol=0)
    back = convert_resampler_state_dict(ip, cfg, layout="ip_adapter")
    jax.tree.map(np.testing.assert_array_equal, back, params)
    assert _compare(cfg, rebuilt.eval(), back, batch=2) <= ATOL


def test_round_trips_prefix_and_init():
    """Both layouts round-trip bit-exactly, a prefixed file (IP-Adapter's image_proj.*) is read
    with prefix=, and freshly initialised params give finite (B, Q, output_dim) tokens."""
    params = init_resampler_params(TINY, jax.random.key(0))
    assert params["latents"].shape == (1, 5, 32)
    for layout in ("ip_adapter", "diffusers"):
        sd = resampler_state_dict(params, layout=layout, prefix="image_proj.")
        sd["ip_adapter.1.to_k_ip.weight"] = np.zeros((4, 4), np.float32)  # other component
        back = convert_resampler_state_dict(sd, TINY, layout=layout, prefix="image_proj.")
        jax.tree.map(np.testing.assert_array_equal, back, params)
    out = jax.jit(Resampler(TINY).apply)({"params": params}, jnp.ones((2, 9, 24)))
    assert out.shape == (2, 5, 40) and bool(jnp.isfinite(out).all())


def test_converter_and_input_errors():
    """Missing, unexpected and misshapen keys are all named in the checkpoint's own names;
    unknown layouts and wrong feature widths raise errors naming the argument. Fails if a
    partial or foreign checkpoint loads silently."""
    params = init_resampler_params(TINY, jax.random.key(1))
    sd = resampler_state_dict(params, layout="ip_adapter")
    sd.pop("layers.1.1.3.weight")
    sd["layers.0.0.to_kv.weight"] = sd["layers.0.0.to_kv.weight"][:-1]
    sd["layers.2.0.to_q.weight"] = np.zeros((24, 32), np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        convert_resampler_state_dict(sd, TINY, layout="ip_adapter")
    msg = str(e.value)
    for key in ("layers.1.1.3.weight", "layers.0.0.to_kv.weight: checkpoint (47, 32)",
                "layers.2.0.to_q.weight", "ip_adapter layout"):
        assert key in msg, key
    # a diffusers-layout file read as ip_adapter: every key of the other layout is named
    dsd = resampler_state_dict(params, layout="diffusers")
    with pytest.raises(CheckpointMismatchError, match="layers.0.ln0.weight"):
        convert_resampler_state_dict(dsd, TINY, layout="ip_adapter")
    with pytest.raises(ValueError, match="layout='torch'"):
        convert_resampler_state_dict(dsd, TINY, layout="torch")
    with pytest.raises(CheckpointMismatchError, match="'latents' is missing"):
        ResamplerConfig.from_state_dict({})
    with pytest.raises(ValueError, match=r"features must be \(B, L, 24\)"):
        Resampler(TINY).apply({"params": params}, jnp.ones((2, 9, 16)))
    with pytest.raises(ValueError, match="heads=0"):
        ResamplerConfig(heads=0)


def test_vit_h14_ip_adapter_plus_shapes():
    """At the released sizes (abstract evaluation, no compute): CLIP ViT-H/14 has 632,076,800
    parameters (OpenCLIP's visual tower with projection), its penultimate hidden state is
    (B, 257, 1280), and the IP-Adapter-Plus SD1.5 resampler (the ResamplerConfig defaults)
    maps it to (B, 16, 768). Fails if a size of the released architecture is wrong, so the
    authors' weights would not load."""
    from jattn.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection

    clip = CLIPVisionModelWithProjection(CLIPVisionConfig.vit_h14())
    pixels = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    out, variables = jax.eval_shape(
        lambda k, x: clip.init_with_output(k, x, output_hidden_states=True),
        jax.random.key(0), pixels)
    assert sum(a.size for a in jax.tree.leaves(variables)) == 632_076_800
    assert out["hidden_states"][-2].shape == (2, 257, 1280)
    assert out["image_embeds"].shape == (2, 1024)
    tokens, _ = jax.eval_shape(lambda k, f: Resampler(ResamplerConfig()).init_with_output(k, f),
                               jax.random.key(0), out["hidden_states"][-2])
    assert tokens.shape == (2, 16, 768)
