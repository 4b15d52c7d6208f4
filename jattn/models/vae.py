"""The KL autoencoder of latent diffusion (Flax linen, NHWC), diffusers' ``AutoencoderKL``.

Images ``(B, H, W, C_img)`` in [-1, 1] are encoded to a diagonal Gaussian posterior over
latents ``(B, H/f, W/f, C)`` with ``f = 2 ** (len(block_out_channels) - 1)`` (8 for SD);
the decoder maps latents back to images. Module names mirror diffusers
(``encoder/down_blocks_0/resnets_0/conv1``, ``encoder/mid_block/attentions_0/to_q``,
``quant_conv``, ``post_quant_conv``, ``decoder/up_blocks_0/upsamplers_0/conv``,
``decoder/conv_norm_out``) so that checkpoints convert key by key.

The mid-block attention is plain single-head self-attention over the C channels of every
latent cell; it is not an attention-policy site (methods edit the UNet only).

Legend: B batch, C channels, h/w height/width in cells, T = h*w tokens.

Reference: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models"
(CVPR 2022); diffusers ``models/autoencoders/autoencoder_kl.py`` and ``vae.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jattn.io.convert import params_to_state_dict, state_dict_to_params
from jattn.models.layers import Conv2d, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D

Array = jax.Array

__all__ = ["VAEConfig", "AutoencoderKL", "encode_latents", "decode_latents",
           "convert_vae_state_dict", "vae_state_dict", "init_vae_params"]

_EPS = 1e-6  # every norm of diffusers' Encoder/Decoder
_LEGACY_ATTN_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of :class:`AutoencoderKL` (names and defaults as diffusers').

    Attributes:
      in_channels, out_channels: image channels (3).
      latent_channels: C of the latents (4 for SD).
      block_out_channels: channels per resolution level; the downsampling factor is
        ``2 ** (len(block_out_channels) - 1)``.
      layers_per_block: resnets per encoder level (the decoder has one more).
      norm_num_groups: GroupNorm groups.
      act_fn: ``"silu"`` (``"swish"`` is read as silu), the only one supported.
      sample_size: nominal image size in pixels (metadata).
      scaling_factor: latents are ``(mean - shift_factor) * scaling_factor``.
      shift_factor: ``None`` (SD1/2) or a float.
      down_block_types / up_block_types: all ``DownEncoderBlock2D`` / ``UpDecoderBlock2D``.
      mid_block_add_attention: mid blocks have the self-attention layer.
      use_quant_conv / use_post_quant_conv: the 1x1 convs around the latent space.
      force_upcast: the checkpoint asks for decoding in float32 when the rest runs in
        float16/bfloat16 (SDXL's VAE overflows in float16); diffusers' SDXL pipelines and
        jattn's :class:`~jattn.pipeline.Pipeline` on SDXL honour it (SD1/SD2 pipelines
        decode in the pipeline's dtype, as diffusers'). Does not change the module.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    act_fn: str = "silu"
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    force_upcast: bool = True

    def __post_init__(self):
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        n = len(self.block_out_channels)
        problems = []
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            problems.append(f"{n} block_out_channels but {len(self.down_block_types)} "
                            f"down_block_types and {len(self.up_block_types)} up_block_types")
        if any(t != "DownEncoderBlock2D" for t in self.down_block_types):
            problems.append(f"down_block_types {self.down_block_types} (only DownEncoderBlock2D)")
        if any(t != "UpDecoderBlock2D" for t in self.up_block_types):
            problems.append(f"up_block_types {self.up_block_types} (only UpDecoderBlock2D)")
        if self.act_fn not in ("silu", "swish"):
            problems.append(f"act_fn {self.act_fn!r} (only silu)")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            problems.append(f"block_out_channels {bad} not divisible by norm_num_groups="
                            f"{self.norm_num_groups}")
        if problems:
            raise ValueError("VAEConfig: unsupported configuration: " + "; ".join(problems))

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each axis (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
        """Build from diffusers' ``vae/config.json`` dict.

        Keys that do not change the computation (``_class_name``,
        ``latents_mean``/``latents_std`` …) are ignored (``force_upcast`` is read: a dtype
        choice of the pipeline); missing keys take diffusers'
        defaults, except ``block_out_channels``, ``down_block_types`` and
        ``up_block_types``, which every diffusers config has. Every value is type-checked;
        null booleans read as false (as in diffusers), a null ``scaling_factor`` as the
        default.

        Raises:
          jattn.io.checkpoint.CheckpointConfigError (a ValueError): a value of the wrong
            type or out of range, or a required key missing (names the key, the value and
            what is expected).
          ValueError: unsupported block types, activation or inconsistent sizes.
        """
        from jattn.io import checkpoint as ck

        o = "VAEConfig"
        if not isinstance(config, Mapping):
            raise ck.CheckpointConfigError(
                f"{o}: expected a dict (the object of vae/config.json), got "
                f"{type(config).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in dict(config).items() if k in names}
        ck.require_keys(o, kwargs, ("block_out_channels", "down_block_types", "up_block_types"),
                        " (every diffusers vae/config.json has them)")
        if kwargs.get("scaling_factor") is None:
            kwargs.pop("scaling_factor", None)

        def pos_int(o_, k, v):
            return ck.config_int(o_, k, v, minimum=1)

        checks = {
            "in_channels": pos_int, "out_channels": pos_int, "latent_channels": pos_int,
            "layers_per_block": pos_int, "norm_num_groups": pos_int,
            "block_out_channels": lambda o_, k, v: ck.config_list(
                o_, k, v, pos_int, hint=", e.g. [128, 256, 512, 512]"),
            "down_block_types": lambda o_, k, v: ck.config_list(
                o_, k, v, ck.config_str, what="block type names",
                hint=", e.g. [\"DownEncoderBlock2D\", \"DownEncoderBlock2D\"]"),
            "up_block_types": lambda o_, k, v: ck.config_list(
                o_, k, v, ck.config_str, what="block type names",
                hint=", e.g. [\"UpDecoderBlock2D\", \"UpDecoderBlock2D\"]"),
            "act_fn": ck.config_str,
            "scaling_factor": lambda o_, k, v: ck.config_float(
                o_, k, v, positive=True, hint=" (0.18215 for SD1.x/SD2.x)"),
            "shift_factor": lambda o_, k, v: None if v is None else ck.config_float(o_, k, v),
            "mid_block_add_attention": ck.config_bool,
            "use_quant_conv": ck.config_bool,
            "use_post_quant_conv": ck.config_bool,
            "force_upcast": ck.config_bool,
        }
        for key, check in checks.items():
            if key in kwargs:
                kwargs[key] = check(o, key, kwargs[key])
        if "sample_size" in kwargs:  # metadata only: an int or [h, w]
            size = kwargs["sample_size"]
            ck.config_list(o, "sample_size", size, pos_int,
                           length=2 if isinstance(size, (list, tuple)) else None, scalar=True,
                           expected="an integer >= 1 (image side in pixels) or a list "
                           "[height, width] of two")
        return cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        """diffusers' ``config.json`` dict (``AutoencoderKL.from_config`` accepts it)."""
        d = dataclasses.asdict(self)
        for k in ("block_out_channels", "down_block_types", "up_block_types"):
            d[k] = list(d[k])
        d["_class_name"] = "AutoencoderKL"
        return d


class _VAEAttention(nn.Module):
    """Single-head self-attention over the cells of ``(B, h, w, C)``, with residual."""

    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        y = GroupNorm(self.groups, _EPS, dtype=self.dtype, name="group_norm")(x)
        y = y.reshape(b, h * w, c)  # (B, T, C)
        dense = lambda name: nn.Dense(c, dtype=self.dtype, name=name)  # noqa: E731
        q = dense("to_q")(y)[:, :, None, :]  # (B, T, 1, C): one head of dim C
        k = dense("to_k")(y)[:, :, None, :]
        v = dense("to_v")(y)[:, :, None, :]
        # diffusers runs this softmax in float32 (upcast_softmax=True); jax's kernel already
        # computes logits and softmax in float32 for bf16/f16 inputs.
        out = jax.nn.dot_product_attention(q, k, v)  # (B, T, 1, C), scale 1/sqrt(C)
        out = dense("to_out_0")(out.reshape(b, h * w, c))
        return out.reshape(b, h, w, c) + x.astype(self.dtype)


class _MidBlock(nn.Module):
    channels: int
    groups: int
    add_attention: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        res = lambda i: ResnetBlock2D(self.channels, self.channels, None, self.groups,  # noqa
                                      _EPS, dtype=self.dtype, name=f"resnets_{i}")
        x = res(0)(x)
        if self.add_attention:
            x = _VAEAttention(self.groups, self.dtype, name="attentions_0")(x)
        return res(1)(x)


class _DownEncoderBlock(nn.Module):
    """diffusers' ``DownEncoderBlock2D``: resnets, then (not last level) a stride-2 conv."""

    in_channels: int
    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.in_channels if j == 0 else self.out_channels,
                              self.out_channels, None, self.groups, _EPS, dtype=self.dtype,
                              name=f"resnets_{j}")(x)
        if self.add_downsample:
            # padding=0: pad one cell at the bottom/right, then a 3x3 stride-2 conv
            x = Downsample2D(self.out_channels, self.out_channels, padding=0,
                             dtype=self.dtype, name="downsamplers_0")(x)
        return x


class _UpDecoderBlock(nn.Module):
    """diffusers' ``UpDecoderBlock2D``: resnets, then (not last level) nearest x2 + conv."""

    in_channels: int
    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.in_channels if j == 0 else self.out_channels,
                              self.out_channels, None, self.groups, _EPS, dtype=self.dtype,
                              name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.out_channels, dtype=self.dtype,
                           name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Images ``(B, H, W, in_channels)`` -> moments ``(B, H/f, W/f, 2 * latent_channels)``."""

    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, dt = self.config, self.dtype
        chans = cfg.block_out_channels
        x = Conv2d(chans[0], 3, dtype=dt, name="conv_in")(x)
        c_in = chans[0]
        for i, c_out in enumerate(chans):
            x = _DownEncoderBlock(c_in, c_out, cfg.layers_per_block, cfg.norm_num_groups,
                                  i < len(chans) - 1, dt, name=f"down_blocks_{i}")(x)
            c_in = c_out
        x = _MidBlock(chans[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, dt,
                      name="mid_block")(x)
        x = GroupNorm(cfg.norm_num_groups, _EPS, dtype=dt, name="conv_norm_out")(x)
        return Conv2d(2 * cfg.latent_channels, 3, dtype=dt, name="conv_out")(nn.silu(x))


class Decoder(nn.Module):
    """Latents ``(B, h, w, latent_channels)`` -> images ``(B, h*f, w*f, out_channels)``."""

    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: Array) -> Array:
        cfg, dt = self.config, self.dtype
        chans = tuple(reversed(cfg.block_out_channels))
        x = Conv2d(chans[0], 3, dtype=dt, name="conv_in")(z)
        x = _MidBlock(chans[0], cfg.norm_num_groups, cfg.mid_block_add_attention, dt,
                      name="mid_block")(x)
        c_in = chans[0]
        for i, c_out in enumerate(chans):
            x = _UpDecoderBlock(c_in, c_out, cfg.layers_per_block + 1, cfg.norm_num_groups,
                                i < len(chans) - 1, dt, name=f"up_blocks_{i}")(x)
            c_in = c_out
        x = GroupNorm(cfg.norm_num_groups, _EPS, dtype=dt, name="conv_norm_out")(x)
        return Conv2d(cfg.out_channels, 3, dtype=dt, name="conv_out")(nn.silu(x))


class AutoencoderKL(nn.Module):
    """diffusers' ``AutoencoderKL`` (NHWC). Works on unscaled latents; see
    :func:`encode_latents` / :func:`decode_latents` for the scaled latents of diffusion.

    Attributes:
      config: :class:`VAEConfig`.
      dtype: computation dtype (parameters keep their own dtype; norms and the attention
        softmax run in float32).

    Calling the module (``init``/``apply`` default) runs ``decode(encode(x)[0])``.
    """

    config: VAEConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = Conv2d(2 * cfg.latent_channels, 1, padding=0, dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = Conv2d(cfg.latent_channels, 1, padding=0, dtype=self.dtype)

    def encode(self, x: Array) -> tuple[Array, Array]:
        """Posterior of images.

        Args:
          x: ``(B, H, W, in_channels)`` images in [-1, 1]; H, W multiples of
            ``config.downsample_factor`` (otherwise the stride-2 convs round up).
        Returns:
          ``(mean, std)``, each ``(B, H/f, W/f, latent_channels)`` in ``dtype``; the log
          variance is clipped to [-30, 20] before ``std = exp(logvar / 2)`` as diffusers does.
        Raises:
          ValueError: ``x`` is not 4-D with ``in_channels`` channels.
        """
        if x.ndim != 4 or x.shape[-1] != self.config.in_channels:
            raise ValueError(f"AutoencoderKL.encode: expected NHWC images with "
                             f"{self.config.in_channels} channels, got shape {x.shape}")
        moments = self.encoder(x)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        logvar = jnp.clip(logvar, -30.0, 20.0)
        return mean, jnp.exp(0.5 * logvar)

    def decode(self, z: Array) -> Array:
        """Images ``(B, h*f, w*f, out_channels)`` (roughly in [-1, 1], not clipped) from
        unscaled latents ``z`` ``(B, h, w, latent_channels)``.

        Raises:
          ValueError: ``z`` is not 4-D with ``latent_channels`` channels.
        """
        if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
            raise ValueError(f"AutoencoderKL.decode: expected NHWC latents with "
                             f"{self.config.latent_channels} channels, got shape {z.shape}")
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: Array) -> Array:
        return self.decode(self.encode(x)[0])


def _per_sample_keys(key: Array, batch: int) -> Array:
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    single = key.ndim == (0 if typed else 1)
    return jax.random.split(key, batch) if single else key


def encode_latents(params: Mapping, config: VAEConfig, images: Array, key: Array | None = None,
                   *, dtype=None) -> Array:
    """Scaled latents of images, as diffusion models see them (jit-friendly).

    ``latents = (z - shift_factor) * scaling_factor`` with z the posterior mean, or with
    ``key`` a posterior sample ``mean + std * eps``.

    Args:
      params: :class:`AutoencoderKL` params.
      config: its config (hashable; close over it or pass it as a static argument).
      images: ``(B, H, W, in_channels)`` in [-1, 1].
      key: ``None`` (mean), one PRNG key (split over the batch), or ``(B,)`` keys, one per
        sample (sample b then depends on ``key[b]`` only).
      dtype: computation dtype (default: the images' dtype).
    Returns:
      ``(B, H/f, W/f, latent_channels)`` in the computation dtype.
    """
    dtype = dtype or images.dtype
    mean, std = AutoencoderKL(config, dtype).apply({"params": params}, images.astype(dtype),
                                                   method=AutoencoderKL.encode)
    z = mean
    if key is not None:
        keys = _per_sample_keys(key, images.shape[0])
        eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], mean.dtype))(keys)
        z = mean + std * eps
    shift = config.shift_factor or 0.0
    return ((z - shift) * config.scaling_factor).astype(dtype)


def decode_latents(params: Mapping, config: VAEConfig, latents: Array, *, dtype=None) -> Array:
    """Images from scaled latents: ``decode(latents / scaling_factor + shift_factor)``.

    Args:
      latents: ``(B, h, w, latent_channels)`` scaled latents (as produced by the sampler).
      dtype: computation dtype (default: the latents' dtype).
    Returns:
      ``(B, h*f, w*f, out_channels)`` images, roughly in [-1, 1] (not clipped).
    """
    dtype = dtype or latents.dtype
    z = latents.astype(dtype) / config.scaling_factor + (config.shift_factor or 0.0)
    return AutoencoderKL(config, dtype).apply({"params": params}, z.astype(dtype),
                                              method=AutoencoderKL.decode)


def _abstract_params(config: VAEConfig):
    f = config.downsample_factor
    x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
    return jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), x)["params"]


def init_vae_params(config: VAEConfig, key: Array) -> dict:
    """Randomly initialised parameters (flax default initialisers), e.g. for training."""
    f = config.downsample_factor
    x = jnp.zeros((1, f, f, config.in_channels), jnp.float32)
    return jax.jit(AutoencoderKL(config).init)(key, x)["params"]  # eager init is slow


def _legacy_attention_fix(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Rename the pre-0.14 diffusers attention keys and squeeze 1x1-conv-shaped weights.

    ``mid_block.attentions.0.{query,key,value,proj_attn}`` -> ``{to_q,to_k,to_v,to_out.0}``;
    a ``(C, C, 1, 1)`` weight of those projections becomes ``(C, C)``.
    """
    out = {}
    for key, arr in state_dict.items():
        parts = key.split(".")
        in_attn = ".attentions." in key and len(parts) >= 3
        if in_attn and parts[-2] in _LEGACY_ATTN_NAMES:
            key = ".".join(parts[:-2] + [_LEGACY_ATTN_NAMES[parts[-2]], parts[-1]])
            parts = key.split(".")
        if in_attn and parts[-1] == "weight" and (
                parts[-2] in ("to_q", "to_k", "to_v") or parts[-3:-1] == ["to_out", "0"]):
            arr = np.asarray(arr)
            if arr.ndim == 4 and arr.shape[2:] == (1, 1):
                arr = arr[:, :, 0, 0]
        if key in out:
            raise ValueError(f"vae: checkpoint has both legacy and current names for {key}")
        out[key] = arr
    return out


def convert_vae_state_dict(state_dict: Mapping[str, Any], config: VAEConfig,
                           dtype=None) -> dict:
    """diffusers ``AutoencoderKL`` state dict -> params of :class:`AutoencoderKL`.

    Also reads the legacy attention names (``query``/``key``/``value``/``proj_attn``) and
    1x1-conv-shaped ``(C, C, 1, 1)`` projection weights of older checkpoints.

    Args:
      state_dict: ``{key: array}`` (numpy, or anything ``np.asarray`` reads).
      config: the VAE's config.
      dtype: cast every parameter to this dtype (default float32).
    Returns:
      the params tree (``AutoencoderKL(config).apply({"params": params}, ...)``).
    Raises:
      CheckpointMismatchError: naming every missing, unexpected and misshapen key.
      ValueError: a checkpoint holding both a legacy and a current name for one weight.
    """
    return state_dict_to_params(_legacy_attention_fix(state_dict), _abstract_params(config),
                                model_name="vae", dtype=dtype)


def vae_state_dict(params: Mapping, *, dtype=None) -> dict[str, np.ndarray]:
    """Params of :class:`AutoencoderKL` -> diffusers state dict (numpy, current names), which
    ``diffusers.AutoencoderKL.load_state_dict(..., strict=True)`` accepts."""
    return params_to_state_dict(params, dtype=dtype)
