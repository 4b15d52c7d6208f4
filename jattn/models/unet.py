"""Stable Diffusion's conditional UNet (diffusers' ``UNet2DConditionModel``) in Flax linen.

Legend: B batch, T query tokens, S key (context) tokens, N heads, H head dim, C channels,
h/w latent height/width in cells, D context width.

* NHWC throughout; the transformer blocks see ``(B, T=h*w, C)`` by a free reshape.
* Every attention (``attn1`` self-attention, ``attn2`` cross-attention, and ``attn1`` of
  ``only_cross_attention`` blocks, which attends to the context) goes through
  :func:`jattn.models.attention.attend` with a static :class:`AttentionSite` named by its
  diffusers path, e.g. ``"down_blocks.1.attentions.0.transformer_blocks.0.attn2"``.
* Flax module names are diffusers' names with ``_`` before list indices
  (``down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_out_0``), so
  :func:`jattn.io.convert.state_dict_to_params` maps diffusers state dicts key by key.
* Covers SD1.x, SD2.x and SDXL (:class:`UNetConfig`). Blocks take per-block transformer
  depth (SDXL: 1, 2, 10), heads and ``only_cross_attention``; SDXL's added text/time
  conditioning (``addition_embed_type="text_time"``) is one entry of
  :data:`ADDED_EMBEDDINGS`, a registry of added-embedding kinds (a new kind is one class
  there, the blocks are untouched). The call takes it as ``added_cond``, diffusers'
  ``added_cond_kwargs`` (SDXL: ``{"text_embeds": (B, P), "time_ids": (B, K)}``).

Reference: diffusers ``models/unets/unet_2d_condition.py`` and ``unet_2d_blocks.py``
(Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models";
Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image
Synthesis", the added size/crop conditioning of section 2.2).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jattn.io.convert import params_to_state_dict, state_dict_to_params
from jattn.models.attention import AttentionSite, SiteRecorder, attend
from jattn.models.features import FeatureSite, FeatureSiteRecorder
from jattn.models.layers import (Conv2d, Downsample2D, GroupNorm, ResnetBlock2D,
                                 TimestepEmbedding, Upsample2D, feature_point,
                                 timestep_embedding)

Array = jax.Array

__all__ = [
    "UNetConfig",
    "UNet2DConditionModel",
    "ADDED_EMBEDDINGS",
    "TextTimeEmbedding",
    "list_sites",
    "list_feature_sites",
    "init_params",
    "param_shapes",
    "convert_unet_state_dict",
    "unet_state_dict",
    "timestep_features",
    "dummy_added_cond",
]

_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)

# diffusers config keys that must keep their default value (key -> allowed values).
_MUST_BE_DEFAULT: dict[str, tuple] = {
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}
# keys read by from_diffusers, or without effect on this architecture
_KNOWN = set(_MUST_BE_DEFAULT) | {
    "sample_size", "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos",
    "freq_shift", "down_block_types", "mid_block_type", "up_block_types",
    "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding",
    "mid_block_scale_factor", "dropout", "act_fn", "norm_num_groups", "norm_eps",
    "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
    "num_attention_heads", "use_linear_projection", "upcast_attention",
    "time_embedding_type", "addition_embed_type", "addition_embed_type_num_heads",
    "addition_time_embed_dim", "projection_class_embeddings_input_dim",
    # only read by UNetMidBlock2DSimpleCrossAttn, which is not supported
    "mid_block_only_cross_attention",
}


def _per_block(value, n: int, name: str, kind=int) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNetConfig: {name} has {len(value)} entries for {n} blocks")
        if any(isinstance(v, (list, tuple)) for v in value):
            raise ValueError(f"UNetConfig: nested per-layer {name} is not supported")
        return tuple(kind(v) for v in value)
    return (kind(value),) * n


def _checked(check, owner: str, key: str, value):
    """``value`` unchanged (int stays int) once ``check(owner, key, value)`` accepts it."""
    check(owner, key, value)
    return value


def _collapse(values: tuple):
    """A per-block tuple as diffusers writes it: a scalar when all entries agree."""
    return values[0] if len(set(values)) == 1 else list(values)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a Stable Diffusion UNet (SD1.x / SD2.x), hashable.

    Per-block fields (one entry per down block, in down order; the up path reads them
    reversed, as diffusers does) accept a scalar, which is broadcast.

    Attributes:
      num_heads: attention heads N per block (diffusers' ``attention_head_dim`` when
        ``num_attention_heads`` is null — see :meth:`from_diffusers`).
      head_dims: (derived) H = block channels // N.
      transformer_layers_per_block: transformer blocks inside each attention module.
      only_cross_attention: per block, ``attn1`` attends to the context too.
      sample_size: latent side in cells (int or ``(h, w)``), or None.
      addition_embed_type: the added conditioning, a key of :data:`ADDED_EMBEDDINGS`
        (``"text_time"``: SDXL's pooled text embedding + micro-conditioning time ids), or
        None (SD1.x/SD2.x).
      addition_time_embed_dim: ``"text_time"``: sinusoidal features per time id (SDXL 256).
      projection_class_embeddings_input_dim: ``"text_time"``: input width of
        ``add_embedding``, P + K * addition_time_embed_dim (SDXL base 1280 + 6 * 256 = 2816).
    Raises:
      ValueError: on inconsistent lengths, unknown block types, channels not divisible by
        the heads or the norm groups.
    """

    sample_size: int | tuple[int, int] | None = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D",
                                       "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    transformer_layers_per_block: int | tuple[int, ...] = 1
    num_heads: int | tuple[int, ...] = 8
    only_cross_attention: bool | tuple[bool, ...] = False
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    time_embedding_type: str = "positional"
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self):
        n = len(self.block_out_channels)
        fix = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        fix("block_out_channels", tuple(int(c) for c in self.block_out_channels))
        fix("down_block_types", tuple(self.down_block_types))
        fix("up_block_types", tuple(self.up_block_types))
        if isinstance(self.sample_size, (list, tuple)):
            fix("sample_size", tuple(int(s) for s in self.sample_size))
        fix("layers_per_block", _per_block(self.layers_per_block, n, "layers_per_block"))
        fix("transformer_layers_per_block",
            _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block"))
        fix("num_heads", _per_block(self.num_heads, n, "num_heads"))
        fix("only_cross_attention",
            _per_block(self.only_cross_attention, n, "only_cross_attention", bool))
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"UNetConfig: {len(self.down_block_types)} down and "
                             f"{len(self.up_block_types)} up block types for {n} "
                             "block_out_channels")
        for t in self.down_block_types:
            if t not in _DOWN_TYPES:
                raise ValueError(f"UNetConfig: down block type {t!r} is not supported "
                                 f"(supported: {sorted(_DOWN_TYPES)})")
        for t in self.up_block_types:
            if t not in _UP_TYPES:
                raise ValueError(f"UNetConfig: up block type {t!r} is not supported "
                                 f"(supported: {sorted(_UP_TYPES)})")
        if self.mid_block_type not in _MID_TYPES:
            raise ValueError(f"UNetConfig: mid block type {self.mid_block_type!r} is not "
                             "supported (supported: UNetMidBlock2DCrossAttn or None)")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"UNetConfig: act_fn {self.act_fn!r} is not supported (silu)")
        if self.time_embedding_type != "positional":
            raise ValueError(f"UNetConfig: time_embedding_type {self.time_embedding_type!r} is "
                             "not supported (positional)")
        if self.addition_embed_type is None:
            extra = [k for k in ("addition_time_embed_dim", "projection_class_embeddings_input_dim")
                     if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"UNetConfig: {', '.join(extra)} set without an added "
                                 "embedding; set addition_embed_type (e.g. 'text_time', SDXL) "
                                 "or leave them None")
        elif self.addition_embed_type not in ADDED_EMBEDDINGS:
            raise ValueError(f"UNetConfig: addition_embed_type {self.addition_embed_type!r} is "
                             f"not supported (supported: None, "
                             f"{', '.join(map(repr, sorted(ADDED_EMBEDDINGS)))})")
        else:
            ADDED_EMBEDDINGS[self.addition_embed_type].check_config(self)
        for c, heads in zip(self.block_out_channels, self.num_heads):
            if c % heads:
                raise ValueError(f"UNetConfig: {c} channels not divisible by {heads} heads")
            if c % self.norm_num_groups:
                raise ValueError(f"UNetConfig: {c} channels not divisible by "
                                 f"{self.norm_num_groups} norm groups")

    @property
    def head_dims(self) -> tuple[int, ...]:
        return tuple(c // n for c, n in zip(self.block_out_channels, self.num_heads))

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    def replace(self, **kw) -> UNetConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> UNetConfig:
        """Build from a diffusers ``unet/config.json`` dict.

        diffusers' misnomer is resolved here and only here: when ``num_attention_heads``
        is null, ``attention_head_dim`` holds the NUMBER of heads (int or per block); the
        head dim is block channels // heads.

        Every value is type-checked (ints given per block as lists are accepted; null
        booleans read as false, as in diffusers); ``block_out_channels``,
        ``down_block_types`` and ``up_block_types`` are required (every diffusers config
        has them); other missing keys take diffusers' defaults.

        Raises:
          jattn.io.checkpoint.CheckpointConfigError (a ValueError): a value of the wrong
            type or out of range, or a required key missing (names the key, the value
            and what is expected).
          ValueError: an ``addition_embed_type`` other than null / ``"text_time"`` (SDXL),
            any other option this UNet does not implement (non-default value), or an
            unknown key.
        """
        from jattn.io import checkpoint as ck

        o = "UNetConfig"
        if not isinstance(config, Mapping):
            raise ck.CheckpointConfigError(
                f"{o}: expected a dict (the object of unet/config.json), got "
                f"{type(config).__name__}.")
        cfg = dict(config)
        add = cfg.get("addition_embed_type")
        if add is not None:
            add = ck.config_str(o, "addition_embed_type", add)
            if add not in ADDED_EMBEDDINGS:
                raise ValueError(
                    f"UNetConfig: addition_embed_type={add!r} is not supported (supported: "
                    f"null, {', '.join(map(repr, sorted(ADDED_EMBEDDINGS)))})")
        unknown = sorted(k for k in cfg if not k.startswith("_") and k not in _KNOWN)
        if unknown:
            raise ValueError(f"UNetConfig: unknown diffusers config keys {unknown}")
        bad = [f"{k}={cfg[k]!r}" for k, ok in _MUST_BE_DEFAULT.items()
               if k in cfg and cfg[k] not in ok]
        if bad:
            raise ValueError("UNetConfig: unsupported option(s) " + ", ".join(bad))
        if cfg.get("norm_num_groups", 32) is None:
            raise ValueError("UNetConfig: norm_num_groups=None (no output norm) is not "
                             "supported")
        ck.require_keys(o, cfg, ("block_out_channels", "down_block_types", "up_block_types"),
                        " (every diffusers unet/config.json has them)")
        pos = dict(minimum=1)

        def ints(key, default, scalar=True, length=None, hint="", expected=None):
            value = cfg.get(key, default)
            if (key == "transformer_layers_per_block" and isinstance(value, (list, tuple))
                    and any(isinstance(v, (list, tuple)) for v in value)):
                raise ValueError(f"UNetConfig: nested per-layer {key} is not supported")
            return ck.config_list(o, key, value, lambda o_, k, v: ck.config_int(o_, k, v, **pos),
                                  length=length, scalar=scalar, hint=hint, expected=expected)

        def strs(key):
            return ck.config_list(o, key, cfg[key], ck.config_str, what="block type names",
                                  hint=", e.g. [\"CrossAttnDownBlock2D\", \"DownBlock2D\"]")

        def flag(key, default):
            return ck.config_bool(o, key, cfg.get(key, default))

        boc = ints("block_out_channels", None, scalar=False, hint=", e.g. [320, 640, 1280, 1280]")
        n = len(boc)
        heads_key = "num_attention_heads"
        if cfg.get(heads_key) is None:
            heads_key = "attention_head_dim"  # diffusers' misnomer: the head count
        heads = ints(heads_key, 8, length=n)
        cad = ints("cross_attention_dim", 1280,
                   expected="an integer >= 1, the text encoder's hidden size (768 for SD1.x, "
                   "1024 for SD2.x)")
        if isinstance(cad, tuple):
            if len(set(cad)) != 1:
                raise ValueError(f"UNetConfig: per-block cross_attention_dim {list(cad)} is not "
                                 "supported")
            cad = cad[0]
        sample_size = cfg.get("sample_size", None)
        if sample_size is not None:
            sample_size = ck.config_list(
                o, "sample_size", sample_size, lambda o_, k, v: ck.config_int(o_, k, v, **pos),
                length=2 if isinstance(sample_size, (list, tuple)) else None, scalar=True,
                expected="an integer >= 1 (the latent side in cells, e.g. 64), a list "
                "[height, width] of two, or null")
        only_cross = cfg.get("only_cross_attention", False)
        only_cross = ck.config_list(o, "only_cross_attention", only_cross, ck.config_bool,
                                    length=n, scalar=True, what="true/false")
        def opt_int(key):
            value = cfg.get(key)
            return None if value is None else ck.config_int(o, key, value, **pos)

        mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid is not None:
            mid = ck.config_str(o, "mid_block_type", mid)
        return cls(
            sample_size=sample_size,
            in_channels=ck.config_int(o, "in_channels", cfg.get("in_channels", 4), **pos),
            out_channels=ck.config_int(o, "out_channels", cfg.get("out_channels", 4), **pos),
            center_input_sample=flag("center_input_sample", False),
            flip_sin_to_cos=flag("flip_sin_to_cos", True),
            freq_shift=_checked(ck.config_float, o, "freq_shift", cfg.get("freq_shift", 0)),
            down_block_types=strs("down_block_types"),
            mid_block_type=mid,
            up_block_types=strs("up_block_types"),
            block_out_channels=boc,
            layers_per_block=ints("layers_per_block", 2, length=n),
            transformer_layers_per_block=ints("transformer_layers_per_block", 1, length=n),
            num_heads=heads,
            only_cross_attention=only_cross,
            cross_attention_dim=cad,
            use_linear_projection=flag("use_linear_projection", False),
            upcast_attention=flag("upcast_attention", False),
            norm_num_groups=ck.config_int(o, "norm_num_groups", cfg.get("norm_num_groups", 32),
                                          **pos),
            norm_eps=ck.config_float(o, "norm_eps", cfg.get("norm_eps", 1e-5), positive=True),
            downsample_padding=ck.config_int(o, "downsample_padding",
                                             cfg.get("downsample_padding", 1), minimum=0),
            mid_block_scale_factor=ck.config_float(o, "mid_block_scale_factor",
                                                   cfg.get("mid_block_scale_factor", 1.0)),
            act_fn=ck.config_str(o, "act_fn", cfg.get("act_fn", "silu")),
            time_embedding_type=ck.config_str(o, "time_embedding_type",
                                              cfg.get("time_embedding_type", "positional")),
            addition_embed_type=add,
            addition_time_embed_dim=opt_int("addition_time_embed_dim"),
            projection_class_embeddings_input_dim=opt_int("projection_class_embeddings_input_dim"),
        )

    def to_diffusers(self) -> dict[str, Any]:
        """A diffusers ``unet/config.json`` dict (JSON types) describing this UNet.

        Heads are written as ``attention_head_dim`` (the diffusers misnomer) with
        ``num_attention_heads`` null, which is what diffusers' constructor accepts.
        """
        ss = self.sample_size
        return {
            "_class_name": "UNet2DConditionModel",
            "sample_size": list(ss) if isinstance(ss, tuple) else ss,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "center_input_sample": self.center_input_sample,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "down_block_types": list(self.down_block_types),
            "mid_block_type": self.mid_block_type,
            "up_block_types": list(self.up_block_types),
            "only_cross_attention": _collapse(self.only_cross_attention),
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": _collapse(self.layers_per_block),
            "downsample_padding": self.downsample_padding,
            "mid_block_scale_factor": self.mid_block_scale_factor,
            "act_fn": self.act_fn,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "cross_attention_dim": self.cross_attention_dim,
            "transformer_layers_per_block": _collapse(self.transformer_layers_per_block),
            "attention_head_dim": _collapse(self.num_heads),
            "num_attention_heads": None,
            "use_linear_projection": self.use_linear_projection,
            "upcast_attention": self.upcast_attention,
            "time_embedding_type": self.time_embedding_type,
            "addition_embed_type": self.addition_embed_type,
            "addition_time_embed_dim": self.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim,
        }


# --------------------------------------------------------------------------- attention


def _merge(aux: dict, new: Mapping) -> dict:
    for k, v in new.items():
        aux[k] = v
    return aux


class Attention(nn.Module):
    """diffusers' ``Attention`` (no bias on q/k/v, ``to_out.0`` with bias) through the seam.

    Call: x ``(B, T, C)``; context ``(B, S, D)`` for cross-attention or ``None`` for
    self-attention. Returns ``((B, T, C), aux)`` with aux ``{path: site_aux}`` or ``{}``.
    """

    num_heads: int
    head_dim: int
    site_path: str
    block: str
    upcast: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, resolution, policy, step):
        b, t, c = x.shape
        n, h = self.num_heads, self.head_dim
        src = x if context is None else context
        dense = lambda name: nn.Dense(n * h, use_bias=False, dtype=self.dtype,  # noqa: E731
                                      name=name)
        q = dense("to_q")(x).reshape(b, t, n, h)  # (B, T, N, H)
        k = dense("to_k")(src).reshape(b, src.shape[1], n, h)  # (B, S, N, H)
        v = dense("to_v")(src).reshape(b, src.shape[1], n, h)  # (B, S, N, H)
        site = AttentionSite(path=self.site_path, kind="self" if context is None else "cross",
                             resolution=tuple(resolution), num_heads=n, head_dim=h,
                             block=self.block)
        out, site_aux = attend(site, q, k, v, policy, step, upcast=self.upcast)
        out = nn.Dense(c, dtype=self.dtype, name="to_out_0")(out.reshape(b, t, n * h))
        aux = {self.site_path: site_aux} if jax.tree_util.tree_leaves(site_aux) else {}
        return out, aux


class GEGLU(nn.Module):
    """``proj`` to 2x width in one matmul, split, ``value * gelu(gate)`` (exact erf GELU)."""

    dim_out: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(2 * self.dim_out, dtype=self.dtype, name="proj")(x)
        value, gate = jnp.split(x, 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers' ``FeedForward`` with GEGLU: ``net_2(net_0(x))``, inner width 4C."""

    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = GEGLU(4 * self.dim, dtype=self.dtype, name="net_0")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN transformer block: self- (or context-) attention, cross-attention, GEGLU FF.

    Call: x ``(B, T, C)``, context ``(B, S, D)``. Returns ``((B, T, C), aux)``.
    """

    dim: int
    num_heads: int
    head_dim: int
    site_path: str
    block: str
    only_cross_attention: bool = False
    upcast: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, resolution, policy, step):
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False,  # noqa: E731
                                       dtype=self.dtype, name=name)
        attn = lambda name: Attention(self.num_heads, self.head_dim,  # noqa: E731
                                      f"{self.site_path}.{name}", self.block, self.upcast,
                                      self.dtype, name=name)
        a, aux = attn("attn1")(ln("norm1")(x),
                               context if self.only_cross_attention else None,
                               resolution, policy, step)
        x = a + x
        a, aux2 = attn("attn2")(ln("norm2")(x), context, resolution, policy, step)
        x = a + x
        x = FeedForward(self.dim, dtype=self.dtype, name="ff")(ln("norm3")(x)) + x
        return x, _merge(aux, aux2)


class Transformer2DModel(nn.Module):
    """diffusers' continuous-input ``Transformer2DModel``: GroupNorm, ``proj_in`` (1x1 conv
    or linear), ``num_layers`` transformer blocks, ``proj_out``, residual.

    Call: x ``(B, h, w, C)``, context ``(B, S, D)``. Returns ``((B, h, w, C), aux)``.
    """

    num_heads: int
    head_dim: int
    num_layers: int
    site_path: str
    block: str
    groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, policy, step):
        b, h, w, c = x.shape
        inner = self.num_heads * self.head_dim
        residual = x
        x, aux = GroupNorm(self.groups, 1e-6, dtype=self.dtype, name="norm",
                           site_path=f"{self.site_path}.norm", block=self.block)(x, policy, step)
        if self.use_linear_projection:
            x = nn.Dense(inner, dtype=self.dtype, name="proj_in")(x.reshape(b, h * w, c))
        else:
            x = Conv2d(inner, 1, padding=0, dtype=self.dtype, name="proj_in")(x)
            x = x.reshape(b, h * w, inner)  # (B, T, C)
        for i in range(self.num_layers):
            x, a = BasicTransformerBlock(
                inner, self.num_heads, self.head_dim, f"{self.site_path}.transformer_blocks.{i}",
                self.block, self.only_cross_attention, self.upcast, self.dtype,
                name=f"transformer_blocks_{i}")(x, context, (h, w), policy, step)
            _merge(aux, a)
        if self.use_linear_projection:
            x = nn.Dense(c, dtype=self.dtype, name="proj_out")(x).reshape(b, h, w, c)
        else:
            x = Conv2d(c, 1, padding=0, dtype=self.dtype, name="proj_out")(
                x.reshape(b, h, w, inner))
        return x + residual, aux


# --------------------------------------------------------------------------- blocks


@dataclasses.dataclass(frozen=True)
class _AttnArgs:
    """Per-block attention settings (hashable, a module attribute)."""

    num_heads: int
    head_dim: int
    num_layers: int
    use_linear_projection: bool
    only_cross_attention: bool
    upcast: bool


def _transformer(a: _AttnArgs, path: str, block: str, groups: int, dtype,
                 name: str) -> Transformer2DModel:
    return Transformer2DModel(a.num_heads, a.head_dim, a.num_layers, path, block, groups,
                              a.use_linear_projection, a.only_cross_attention, a.upcast, dtype,
                              name=name)


class DownBlock(nn.Module):
    """``CrossAttnDownBlock2D`` (``attn`` set) or ``DownBlock2D`` (``attn=None``).

    Call: x ``(B, h, w, C_in)``. Returns ``(x, skips, aux)``: x ``(B, h', w', C_out)``
    (h' = ceil(h/2) unless it is the last block), skips one tensor per resnet (+ one after
    the downsampler), in order.
    """

    in_channels: int
    out_channels: int
    temb_channels: int
    num_layers: int
    add_downsample: bool
    attn: _AttnArgs | None
    groups: int
    eps: float
    downsample_padding: int
    site_path: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context, policy, step):
        skips, aux = [], {}
        for i in range(self.num_layers):
            cin = self.in_channels if i == 0 else self.out_channels
            x, au = ResnetBlock2D(cin, self.out_channels, self.temb_channels, self.groups,
                                  self.eps, self.dtype, name=f"resnets_{i}",
                                  site_path=f"{self.site_path}.resnets.{i}", block="down")(
                                      x, temb, policy, step)
            _merge(aux, au)
            if self.attn is not None:
                a = self.attn
                x, au = _transformer(a, f"{self.site_path}.attentions.{i}", "down", self.groups,
                                     self.dtype, f"attentions_{i}")(x, context, policy, step)
                _merge(aux, au)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.out_channels, self.downsample_padding,
                             self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips), aux


class MidBlock(nn.Module):
    """``UNetMidBlock2DCrossAttn``: resnet, then (attention, resnet) x num_layers.

    Call: x ``(B, h, w, C)``. Returns ``(x, aux)``.
    """

    channels: int
    temb_channels: int
    attn: _AttnArgs
    groups: int
    eps: float
    output_scale_factor: float
    site_path: str
    num_layers: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context, policy, step):
        res = lambda i: ResnetBlock2D(  # noqa: E731
            self.channels, self.channels, self.temb_channels, self.groups, self.eps,
            self.dtype, output_scale_factor=self.output_scale_factor, name=f"resnets_{i}",
            site_path=f"{self.site_path}.resnets.{i}", block="mid")
        aux: dict = {}
        x, au = res(0)(x, temb, policy, step)
        _merge(aux, au)
        a = self.attn
        for i in range(self.num_layers):
            x, au = _transformer(a, f"{self.site_path}.attentions.{i}", "mid", self.groups,
                                 self.dtype, f"attentions_{i}")(x, context, policy, step)
            _merge(aux, au)
            x, au = res(i + 1)(x, temb, policy, step)
            _merge(aux, au)
        return x, aux


class UpBlock(nn.Module):
    """``CrossAttnUpBlock2D`` (``attn`` set) or ``UpBlock2D`` (``attn=None``).

    Call: x ``(B, h, w, C_prev)``, skips the last ``num_layers`` skip tensors of the down
    path (consumed from the end), ``upsample_size`` the ``(h, w)`` to upsample to (or
    None for the last block). Returns ``(x, aux)``.
    """

    in_channels: int
    out_channels: int
    prev_output_channels: int
    temb_channels: int
    num_layers: int
    add_upsample: bool
    attn: _AttnArgs | None
    groups: int
    eps: float
    site_path: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skips, temb, context, upsample_size, policy, step):
        aux: dict = {}
        skips = list(skips)
        for i in range(self.num_layers):
            skip = skips.pop()
            cin = (self.prev_output_channels if i == 0 else self.out_channels) + skip.shape[-1]
            rp = f"{self.site_path}.resnets.{i}"
            # FreeU's points: the two inputs of the concat (diffusers' apply_freeu)
            x, au = feature_point(f"{rp}.backbone", "backbone", x, policy, step, "up")
            _merge(aux, au)
            skip, au = feature_point(f"{rp}.skip", "skip", skip, policy, step, "up")
            _merge(aux, au)
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
            x, au = ResnetBlock2D(cin, self.out_channels, self.temb_channels, self.groups,
                                  self.eps, self.dtype, name=f"resnets_{i}", site_path=rp,
                                  block="up")(x, temb, policy, step)
            _merge(aux, au)
            if self.attn is not None:
                a = self.attn
                x, au = _transformer(a, f"{self.site_path}.attentions.{i}", "up", self.groups,
                                     self.dtype, f"attentions_{i}")(x, context, policy, step)
                _merge(aux, au)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.out_channels, self.dtype,
                           name="upsamplers_0")(x, upsample_size)
        return x, aux


# --------------------------------------------------------------------------- model


def timestep_features(config: UNetConfig, timesteps: Array, batch: int) -> Array:
    """Sinusoidal features of the timesteps (diffusers' ``time_proj``), float32.

    Args:
      timesteps: scalar, ``(1,)`` or ``(B,)`` DDPM timesteps (broadcast to ``(B,)``).
      batch: B.
    Returns:
      ``(B, block_out_channels[0])`` float32.
    """
    t = jnp.asarray(timesteps)
    t = jnp.broadcast_to(t.reshape(-1) if t.ndim else t, (batch,))
    return timestep_embedding(t, config.block_out_channels[0],
                              flip_sin_to_cos=config.flip_sin_to_cos,
                              freq_shift=config.freq_shift)


# --------------------------------------------------------------------------- added conditioning


class AddedEmbedding:
    """One kind of added conditioning (diffusers' ``addition_embed_type``), added to the
    time embedding before the blocks. A registry entry of :data:`ADDED_EMBEDDINGS`.

    Subclasses set ``kind`` and ``keys`` and implement the four methods; ``embed`` is called
    inside :class:`UNet2DConditionModel`'s compact ``__call__``, so the modules it creates
    are the UNet's children, named as diffusers names them (the converter maps them key by
    key). The blocks never see the added conditioning: only ``temb`` changes.
    """

    kind: str = ""
    keys: tuple[str, ...] = ()

    def check_config(self, config: UNetConfig) -> None:
        """Raise ValueError naming the config fields this kind needs and lacks."""
        raise NotImplementedError

    def expected(self, config: UNetConfig) -> str:
        """The ``added_cond`` this kind takes, in words (for error messages)."""
        raise NotImplementedError

    def dummy(self, config: UNetConfig, batch: int) -> dict:
        """``added_cond`` of ``jax.ShapeDtypeStruct`` leaves (for ``eval_shape``)."""
        raise NotImplementedError

    def embed(self, config: UNetConfig, added_cond: Mapping[str, Array], batch: int,
              dtype) -> Array:
        """``(B, time_embed_dim)`` in ``dtype``, after :meth:`validate`."""
        raise NotImplementedError

    def validate(self, config: UNetConfig, added_cond, batch: int) -> dict[str, Array]:
        """``added_cond`` checked against ``keys`` (ValueError naming ``added_cond``, the
        expected keys and shapes), arrays ``(1 or B, …)`` broadcast to batch B."""
        want = self.expected(config)
        if added_cond is None:
            raise ValueError(f"UNet: addition_embed_type={self.kind!r} needs added_cond="
                             f"{want} (diffusers' added_cond_kwargs); got None")
        if not isinstance(added_cond, Mapping):
            raise ValueError(f"UNet: added_cond must be a dict {want}; got "
                             f"{type(added_cond).__name__}")
        missing = [k for k in self.keys if k not in added_cond]
        extra = sorted(str(k) for k in added_cond if k not in self.keys)
        if missing or extra:
            parts = ([f"missing {missing}"] if missing else []) + (
                [f"unexpected {extra}"] if extra else [])
            raise ValueError(f"UNet: added_cond keys {'; '.join(parts)}: expected {want}")
        out = {}
        for k in self.keys:
            a = jnp.asarray(added_cond[k])
            if a.ndim != 2 or a.shape[0] not in (1, batch):
                raise ValueError(f"UNet: added_cond[{k!r}] has shape {a.shape}, expected "
                                 f"(B={batch}, …) 2-D (or batch 1): {want}")
            out[k] = jnp.broadcast_to(a, (batch, a.shape[1]))
        return out


class TextTimeEmbedding(AddedEmbedding):
    """SDXL's ``addition_embed_type="text_time"`` (diffusers ``get_aug_embed``).

    ``added_cond = {"text_embeds": (B, P), "time_ids": (B, K)}``: the K time ids (SDXL:
    original h, w, crop top, left, target h, w) each get ``addition_time_embed_dim``
    sinusoidal features (``add_time_proj``: :func:`timestep_embedding` with the UNet's
    ``flip_sin_to_cos`` / ``freq_shift``), flattened to ``(B, K * T)``; concatenated AFTER
    ``text_embeds`` (the pooled projected text embedding) and mapped by
    ``add_embedding = TimestepEmbedding(P + K*T -> time_embed_dim)``; the result is added
    to the time embedding. Features in float32, cast to the computation dtype before
    ``add_embedding`` (as diffusers casts to ``emb.dtype``).
    """

    kind = "text_time"
    keys = ("text_embeds", "time_ids")

    def check_config(self, config):
        need = [k for k in ("addition_time_embed_dim", "projection_class_embeddings_input_dim")
                if not isinstance(getattr(config, k), int) or getattr(config, k) < 1]
        if need:
            raise ValueError(f"UNetConfig: addition_embed_type='text_time' needs "
                             f"{' and '.join(need)} (integers >= 1; SDXL base: "
                             "addition_time_embed_dim 256, projection_class_embeddings_input_dim"
                             " 2816)")

    def expected(self, config):
        t, p = config.addition_time_embed_dim, config.projection_class_embeddings_input_dim
        return ("{'text_embeds': (B, P) float, 'time_ids': (B, K) float} with P + K * "
                f"{t} (addition_time_embed_dim) = {p} (projection_class_embeddings_input_dim)"
                "; SDXL base: text_embeds (B, 1280) pooled text embedding of text_encoder_2, "
                "time_ids (B, 6) = original size, crop top-left, target size")

    def dummy(self, config, batch):
        t, p = config.addition_time_embed_dim, config.projection_class_embeddings_input_dim
        k = max(0, min(6, (p - 1) // t))  # SDXL's split when it fits; params need only P+K*T
        return {"text_embeds": jax.ShapeDtypeStruct((batch, p - k * t), jnp.float32),
                "time_ids": jax.ShapeDtypeStruct((batch, k), jnp.float32)}

    def embed(self, config, added_cond, batch, dtype):
        cond = self.validate(config, added_cond, batch)
        text, ids = cond["text_embeds"], cond["time_ids"]
        t = config.addition_time_embed_dim
        if text.shape[1] + ids.shape[1] * t != config.projection_class_embeddings_input_dim:
            raise ValueError(
                f"UNet: added_cond widths text_embeds {text.shape[1]} + time_ids "
                f"{ids.shape[1]} * {t} = {text.shape[1] + ids.shape[1] * t} != "
                f"projection_class_embeddings_input_dim "
                f"{config.projection_class_embeddings_input_dim}: expected "
                f"{self.expected(config)}")
        feats = timestep_embedding(ids.reshape(-1), t, flip_sin_to_cos=config.flip_sin_to_cos,
                                   freq_shift=config.freq_shift)  # (B*K, T) float32
        feats = feats.reshape(batch, ids.shape[1] * t)
        x = jnp.concatenate([text.astype(jnp.float32), feats], axis=-1).astype(dtype)
        return TimestepEmbedding(config.time_embed_dim, dtype=dtype, name="add_embedding")(x)


# addition_embed_type -> its added embedding; a new variant is one entry here
ADDED_EMBEDDINGS: dict[str, AddedEmbedding] = {"text_time": TextTimeEmbedding()}


def _added_embedding(config: UNetConfig, added_cond, batch: int, dtype) -> Array | None:
    """The added embedding ``(B, time_embed_dim)`` or None (no added conditioning)."""
    if config.addition_embed_type is None:
        if added_cond is not None and not (isinstance(added_cond, Mapping) and not added_cond):
            keys = list(added_cond) if isinstance(added_cond, Mapping) else type(added_cond)
            raise ValueError(f"UNet: added_cond was given ({keys}) but this UNet has no added "
                             "conditioning (addition_embed_type None, e.g. SD1.x/SD2.x); pass "
                             "added_cond=None")
        return None
    return ADDED_EMBEDDINGS[config.addition_embed_type].embed(config, added_cond, batch, dtype)


class UNet2DConditionModel(nn.Module):
    """Stable Diffusion's conditional UNet, NHWC, attention through the policy seam.

    Attributes:
      config: :class:`UNetConfig`.
      dtype: computation dtype (params stay as given, float32 by default, and are cast).

    Call:
      sample: ``(B, h, w, C_in)`` noisy latents (NHWC).
      timesteps: scalar or ``(B,)`` DDPM timesteps (not step indices).
      encoder_hidden_states: ``(B, S, D)`` context (text encoder output), D =
        ``config.cross_attention_dim``.
      added_cond: the added conditioning of ``config.addition_embed_type`` (diffusers'
        ``added_cond_kwargs``), None without one. SDXL (``"text_time"``):
        ``{"text_embeds": (B, P), "time_ids": (B, K)}`` float, P + K *
        ``addition_time_embed_dim`` = ``projection_class_embeddings_input_dim``; a leading
        dim of 1 broadcasts.
      policy: ``None`` or an attention policy (see :mod:`jattn.models.attention`); if it
        also has a ``feature`` method it is called at every feature site
        (:mod:`jattn.models.features`: resnet outputs, GroupNorms, FreeU's backbone/skip).
      step: int32 scalar step index handed to the policy.
    Returns:
      ``(out, aux)``: out ``(B, h, w, C_out)`` in ``dtype``; aux ``{site_path: site_aux}``
      over every attention or feature site whose aux is non-empty (``{}`` without a
      policy).
    Raises:
      ValueError: on a wrong channel count or context width; ``added_cond`` missing,
        malformed (keys, shapes) or given to a UNet without added conditioning.
    """

    config: UNetConfig
    dtype: jnp.dtype = jnp.float32

    def _attn_args(self, i: int, only_cross: bool | None = None) -> _AttnArgs:
        cfg = self.config
        return _AttnArgs(cfg.num_heads[i], cfg.head_dims[i], cfg.transformer_layers_per_block[i],
                         cfg.use_linear_projection,
                         cfg.only_cross_attention[i] if only_cross is None else only_cross,
                         cfg.upcast_attention)

    @nn.compact
    def __call__(self, sample: Array, timesteps: Array, encoder_hidden_states: Array, *,
                 added_cond: Mapping[str, Array] | None = None, policy=None,
                 step=None) -> tuple[Array, dict]:
        cfg = self.config
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"UNet: sample must be NHWC (B, h, w, {cfg.in_channels}), got "
                             f"{sample.shape}")
        if encoder_hidden_states.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"UNet: encoder_hidden_states width {encoder_hidden_states.shape}"
                             f" != cross_attention_dim {cfg.cross_attention_dim}")
        b = sample.shape[0]
        context = encoder_hidden_states.astype(self.dtype)
        feats = timestep_features(cfg, timesteps, b).astype(self.dtype)
        temb = TimestepEmbedding(cfg.time_embed_dim, dtype=self.dtype,
                                 name="time_embedding")(feats)
        added = _added_embedding(cfg, added_cond, b, self.dtype)
        if added is not None:
            temb = temb + added
        groups, eps, chans = cfg.norm_num_groups, cfg.norm_eps, cfg.block_out_channels
        n = len(chans)

        x = sample.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        x = Conv2d(chans[0], 3, dtype=self.dtype, name="conv_in")(x)

        aux: dict = {}
        skips = [x]
        for i, kind in enumerate(cfg.down_block_types):
            x, res, au = DownBlock(
                chans[max(i - 1, 0)], chans[i], cfg.time_embed_dim, cfg.layers_per_block[i],
                i < n - 1, self._attn_args(i) if _DOWN_TYPES[kind] else None, groups, eps,
                cfg.downsample_padding, f"down_blocks.{i}", self.dtype,
                name=f"down_blocks_{i}")(x, temb, context, policy, step)
            skips.extend(res)
            _merge(aux, au)

        if cfg.mid_block_type is not None:
            # UNetMidBlock2DCrossAttn never uses only_cross_attention
            x, au = MidBlock(chans[-1], cfg.time_embed_dim, self._attn_args(n - 1, False),
                             groups, eps, cfg.mid_block_scale_factor, "mid_block",
                             dtype=self.dtype, name="mid_block")(x, temb, context, policy, step)
            _merge(aux, au)

        rchans = chans[::-1]
        for i, kind in enumerate(cfg.up_block_types):
            j = n - 1 - i  # the matching down block
            num_layers = cfg.layers_per_block[j] + 1
            res, skips = skips[-num_layers:], skips[:-num_layers]
            last = i == n - 1
            x, au = UpBlock(
                rchans[min(i + 1, n - 1)], rchans[i], rchans[max(i - 1, 0)], cfg.time_embed_dim,
                num_layers, not last, self._attn_args(j) if _UP_TYPES[kind] else None,
                groups, eps, f"up_blocks.{i}", self.dtype, name=f"up_blocks_{i}")(
                    x, res, temb, context, None if last else tuple(skips[-1].shape[1:3]),
                    policy, step)
            _merge(aux, au)

        x, au = GroupNorm(groups, eps, dtype=self.dtype, name="conv_norm_out",
                          site_path="conv_norm_out")(x, policy, step)
        _merge(aux, au)
        x = nn.silu(x)
        x = Conv2d(cfg.out_channels, 3, dtype=self.dtype, name="conv_out")(x)
        return x, aux


# --------------------------------------------------------------------------- helpers


def _dummy_inputs(config: UNetConfig, sample_size, context_tokens: int, batch: int = 1):
    if sample_size is None:
        sample_size = config.sample_size
    if sample_size is None:
        raise ValueError("list_sites: config.sample_size is None; pass sample_size")
    h, w = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    return (jax.ShapeDtypeStruct((batch, h, w, config.in_channels), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.float32),
            jax.ShapeDtypeStruct((batch, context_tokens, config.cross_attention_dim),
                                 jnp.float32))


def dummy_added_cond(config: UNetConfig, batch: int = 1) -> dict | None:
    """``added_cond`` of ``jax.ShapeDtypeStruct`` leaves for ``config`` (None without added
    conditioning), e.g. for ``jax.eval_shape`` or ``lower`` without real inputs."""
    kind = config.addition_embed_type
    return None if kind is None else ADDED_EMBEDDINGS[kind].dummy(config, batch)


def list_sites(config: UNetConfig, sample_size: int | tuple[int, int] | None = None,
               context_tokens: int = 77) -> list[AttentionSite]:
    """Every attention site of the UNet, in call order (no FLOPs: ``jax.eval_shape``).

    Args:
      config: the UNet configuration.
      sample_size: latent side in cells (int or ``(h, w)``); default ``config.sample_size``.
      context_tokens: S, the context length (does not change the sites).
    Returns:
      list of :class:`AttentionSite` (down blocks, mid block, up blocks; ``attn1`` before
      ``attn2`` in each transformer block).
    Raises:
      ValueError: if no sample size is known.
    """
    model = UNet2DConditionModel(config)
    x, t, ctx = _dummy_inputs(config, sample_size, context_tokens)
    recorder = SiteRecorder()

    def run(x, t, ctx, added):
        return model.init_with_output(jax.random.key(0), x, t, ctx, added_cond=added,
                                      policy=recorder)

    jax.eval_shape(run, x, t, ctx, dummy_added_cond(config))
    return list(recorder.sites)


def list_feature_sites(config: UNetConfig,
                       sample_size: int | tuple[int, int] | None = None) -> list[FeatureSite]:
    """Every feature site of the UNet (:mod:`jattn.models.features`), in call order, no
    FLOPs (``jax.eval_shape``): per resnet ``norm1``, ``norm2``, the output; per transformer
    its ``norm``; before each up-block resnet its ``backbone`` and ``skip`` inputs; last
    ``conv_norm_out``.

    Args:
      config: the UNet configuration.
      sample_size: latent side in cells (int or ``(h, w)``); default ``config.sample_size``.
    Raises:
      ValueError: if no sample size is known.
    """
    model = UNet2DConditionModel(config)
    x, t, ctx = _dummy_inputs(config, sample_size, 1)
    recorder = FeatureSiteRecorder()

    def run(x, t, ctx, added):
        return model.init_with_output(jax.random.key(0), x, t, ctx, added_cond=added,
                                      policy=recorder)

    jax.eval_shape(run, x, t, ctx, dummy_added_cond(config))
    return list(recorder.sites)


def param_shapes(config: UNetConfig) -> dict:
    """The params tree as ``jax.ShapeDtypeStruct`` leaves (float32), no FLOPs (traced once
    per config: converting, initialising and exporting reuse it; SDXL's trace takes
    seconds)."""
    return jax.tree.map(lambda s: s, _param_shapes(config))  # a fresh tree per caller


@functools.lru_cache(maxsize=16)
def _param_shapes(config: UNetConfig) -> dict:
    model = UNet2DConditionModel(config)
    size = 2 ** (len(config.block_out_channels) - 1)
    x, t, ctx = _dummy_inputs(config, size, 1)
    return jax.eval_shape(
        lambda x, t, ctx, added: model.init(jax.random.key(0), x, t, ctx, added_cond=added),
        x, t, ctx, dummy_added_cond(config))["params"]


def init_params(config: UNetConfig, key: Array) -> dict:
    """Randomly initialised float32 params.

    Kernels (dense ``(C_in, C_out)`` and conv HWIO) are ``N(0, 1/fan_in)`` (the variance of
    Flax's lecun-normal), biases zero, norm scales one. All normals come from ONE
    ``jax.random.normal`` draw sliced per parameter on the host: compiling one PRNG call
    instead of one per parameter keeps this fast on CPU (a tiny UNet: ~1 s, not a minute).
    """
    flat = traverse_util.flatten_dict(param_shapes(config))
    kernels = [(p, s) for p, s in flat.items() if p[-1] == "kernel"]
    total = sum(int(np.prod(s.shape)) for _, s in kernels)

    # slicing on the host: one jitted program with hundreds of outputs compiles slowly
    z = np.asarray(jax.random.normal(key, (total,), jnp.float32))
    out, offset = {}, 0
    for p, s in flat.items():
        if p[-1] == "kernel":
            n = int(np.prod(s.shape))
            fan_in = int(np.prod(s.shape[:-1]))
            out[p] = z[offset:offset + n].reshape(s.shape) * np.float32(1.0 / np.sqrt(fan_in))
            offset += n
        elif p[-1] == "scale":
            out[p] = np.ones(s.shape, s.dtype)
        else:
            out[p] = np.zeros(s.shape, s.dtype)
    return jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(out))


def convert_unet_state_dict(state_dict: Mapping[str, np.ndarray], config: UNetConfig,
                            dtype=None) -> dict:
    """diffusers ``UNet2DConditionModel`` state dict (numpy, torch layout) -> Flax params.

    Args:
      state_dict: ``{diffusers_key: array}``, e.g. read from
        ``unet/diffusion_pytorch_model.safetensors``.
      config: the matching :class:`UNetConfig`.
      dtype: cast every array to this dtype (default float32).
    Returns:
      nested dict of numpy arrays with exactly the model's params structure.
    Raises:
      jattn.io.convert.CheckpointMismatchError: naming every missing, unexpected and
        misshapen key.
    """
    return state_dict_to_params(state_dict, param_shapes(config), model_name="unet",
                                dtype=dtype)


def unet_state_dict(params: Mapping, dtype=None) -> dict[str, np.ndarray]:
    """Flax params -> diffusers ``UNet2DConditionModel`` state dict (numpy, torch layout),
    loadable with ``load_state_dict(..., strict=True)``."""
    return params_to_state_dict(params, dtype=dtype)
