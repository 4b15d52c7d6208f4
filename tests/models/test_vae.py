"""Parity of jattn's AutoencoderKL with diffusers' ``AutoencoderKL`` (tiny, random weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import _randomize_torch_module, _torch_to_numpy_state_dict  # noqa: E402
from jattn.io.convert import CheckpointMismatchError  # noqa: E402
from jattn.models.vae import (  # noqa: E402
    AutoencoderKL,
    VAEConfig,
    convert_vae_state_dict,
    decode_latents,
    encode_latents,
    vae_state_dict,
)

ATOL = 1e-5
TINY = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16],
            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
            layers_per_block=1, norm_num_groups=4, sample_size=8)
VARIANTS = {
    "sd": dict(),
    "no_quant_no_attn": dict(use_quant_conv=False, use_post_quant_conv=False,
                             mid_block_add_attention=False, shift_factor=0.1,
                             scaling_factor=0.5),
}


def _torch_vae(variant: str = "sd", seed: int = 0):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(**TINY, **VARIANTS[variant])
    return _randomize_torch_module(vae, seed=seed, std=0.15)


_state_dict = _torch_to_numpy_state_dict


def _setup(variant: str = "sd"):
    vae = _torch_vae(variant)
    cfg = VAEConfig.from_diffusers(dict(vae.config))
    params = convert_vae_state_dict(_state_dict(vae), cfg)
    return vae, cfg, params


def _images(b: int = 2, size: int = 8, seed: int = 0) -> np.ndarray:
    """NCHW float32 images in [-1, 1]."""
    return np.random.default_rng(seed).uniform(-1, 1, (b, 3, size, size)).astype(np.float32)


def _nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def _maxabs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encode_decode_parity(variant):
    """Posterior mean/std and decoded images equal diffusers' on the same random weights
    (fp32, max-abs <= 1e-5). Fails if a resnet/shortcut, the asymmetric downsample padding,
    the nearest upsampling, the mid-block attention (single head over C, residual, group
    norm), the logvar clipping, quant_conv/post_quant_conv or a weight transpose is wrong."""
    vae, cfg, params = _setup(variant)
    x = _images()
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(x)).latent_dist
        ref_mean, ref_std = dist.mean.numpy(), dist.std.numpy()
        z = np.random.default_rng(1).normal(size=ref_mean.shape).astype(np.float32)
        ref_img = vae.decode(torch.from_numpy(z)).sample.numpy()
    model = AutoencoderKL(cfg)
    mean, std = jax.jit(lambda p, i: model.apply({"params": p}, i, method=model.encode))(
        params, jnp.asarray(_nhwc(x)))
    img = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))(
        params, jnp.asarray(_nhwc(z)))
    assert mean.shape == (2, 4, 4, 4) and img.shape == (2, 8, 8, 3)
    errs = {"mean": _maxabs(mean, _nhwc(ref_mean)), "std": _maxabs(std, _nhwc(ref_std)),
            "decode": _maxabs(img, _nhwc(ref_img))}
    scale = {"mean": np.abs(ref_mean).max(), "decode": np.abs(ref_img).max()}
    print(variant, {k: f"{v:.2e}" for k, v in errs.items()},
          {k: f"{v:.2f}" for k, v in scale.items()})
    assert max(errs.values()) <= ATOL, errs


def test_scaled_latent_helpers():
    """encode_latents = (mean - shift) * scaling_factor (or a posterior sample with keys) and
    decode_latents = decode(latents / scaling_factor + shift), matching diffusers' pipeline
    convention. Fails if the scaling/shift is applied twice, inverted or forgotten (latents
    off by 5x for SD), or if per-sample noise depends on the batch size."""
    vae, cfg, params = _setup("no_quant_no_attn")
    x = _images()
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(x)).latent_dist
        ref_latents = (dist.mean.numpy() - 0.1) * 0.5
        ref_img = vae.decode(torch.from_numpy(ref_latents / 0.5 + 0.1)).sample.numpy()
    xj = jnp.asarray(_nhwc(x))
    latents = jax.jit(lambda p, i: encode_latents(p, cfg, i))(params, xj)
    assert _maxabs(latents, _nhwc(ref_latents)) <= ATOL
    img = jax.jit(lambda p, z: decode_latents(p, cfg, z))(params, latents)
    assert _maxabs(img, _nhwc(ref_img)) <= ATOL

    enc = jax.jit(lambda p, i, k: encode_latents(p, cfg, i, k))
    keys = jax.random.split(jax.random.key(3), 2)
    sampled = enc(params, xj, keys)
    std = _nhwc(dist.std.numpy())
    eps = (np.asarray(sampled) / 0.5 + 0.1 - _nhwc(dist.mean.numpy())) / std
    assert 0.3 < eps.std() < 3.0  # a real unit-Gaussian draw, not the mean
    # sample b depends on keys[b] only: the same keys in another order permute the result
    swapped = enc(params, xj[::-1], keys[::-1])
    np.testing.assert_allclose(swapped[::-1], sampled, atol=ATOL)
    single = enc(params, xj, jax.random.key(3))  # one key: split over the batch
    np.testing.assert_allclose(single, sampled, atol=ATOL)


def test_legacy_attention_names():
    """Old checkpoints name the mid-block attention query/key/value/proj_attn and may store
    the projections as 1x1 convs (C, C, 1, 1); they convert to the same params. Fails if
    such a VAE (most SD1 single-file conversions) cannot be loaded or loads transposed."""
    vae, cfg, params = _setup("sd")
    legacy = {}
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for k, v in _state_dict(vae).items():
        for new, old in new_to_old.items():
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                if k.endswith("weight") and "encoder." in k:
                    v = v[:, :, None, None]  # conv-shaped in the encoder only
        legacy[k] = v
    assert any(".query." in k for k in legacy) and any(v.ndim == 4 and v.shape[2:] == (1, 1)
                                                       and ".key." in k for k, v in legacy.items())
    back = convert_vae_state_dict(legacy, cfg)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_config_round_trip():
    """VAEConfig <-> diffusers config dict is lossless and diffusers builds the same model
    from to_diffusers(). Fails if a field (scaling_factor, quant convs, attention flag) is
    dropped, so an exported bundled model would decode differently in diffusers."""
    for variant in VARIANTS:
        cfg = VAEConfig.from_diffusers(dict(_torch_vae(variant).config))
        d = cfg.to_diffusers()
        assert VAEConfig.from_diffusers(d) == cfg
        assert VAEConfig.from_diffusers(dict(diffusers.AutoencoderKL.from_config(d).config)) == cfg
    assert VAEConfig.from_diffusers(dict(_torch_vae("sd").config)).downsample_factor == 2
    with pytest.raises(ValueError, match="act_fn"):
        VAEConfig(act_fn="gelu")
    with pytest.raises(ValueError, match="down_block_types"):
        VAEConfig(block_out_channels=(32, 64))


def test_export_round_trip():
    """vae_state_dict(params) loads strictly into diffusers' AutoencoderKL and reproduces
    every tensor exactly. Fails if an exported key name or layout is wrong (the bundled
    model could not be used by diffusers or the reference implementations)."""
    vae, cfg, params = _setup("sd")
    fresh = diffusers.AutoencoderKL.from_config(cfg.to_diffusers())
    sd = vae_state_dict(params)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    for k, v in vae.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0)


def test_converter_names_missing_key():
    """A checkpoint without a weight raises CheckpointMismatchError naming that key. Fails
    if conversion silently keeps initial weights for a missing layer."""
    vae, cfg, _ = _setup("sd")
    sd = _state_dict(vae)
    sd.pop("decoder.up_blocks.1.resnets.0.conv_shortcut.weight")
    sd["encoder.mid_block.attentions.0.extra.weight"] = np.zeros((16, 16), np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        convert_vae_state_dict(sd, cfg)
    assert "decoder.up_blocks.1.resnets.0.conv_shortcut.weight" in str(e.value)
    assert "encoder.mid_block.attentions.0.extra.weight" in str(e.value)
