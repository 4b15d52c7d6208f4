"""Convolutional building blocks shared by the UNet and the VAE (Flax linen, NHWC).

Legend: B batch, C channels, h/w height/width in cells.

Module and parameter names mirror diffusers' (``norm1``, ``conv1``, ``time_emb_proj``,
``conv_shortcut``, ``conv``, ``linear_1`` …) so that :mod:`jattn.io.convert` maps a diffusers
state dict onto these modules key by key. All tensors are NHWC; kernels are HWIO.
Parameters are created in float32 (``param_dtype``) and cast to the computation ``dtype``.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jattn.models.features import FeatureSite, feature_seam, group_norm_stats, group_normalize

Array = jax.Array

__all__ = [
    "GroupNorm",
    "Conv2d",
    "ResnetBlock2D",
    "Downsample2D",
    "Upsample2D",
    "timestep_embedding",
    "TimestepEmbedding",
    "upsample_nearest",
    "feature_point",
]


class GroupNorm(nn.Module):
    """Group normalisation over NHWC (or any ``(..., C)``) input, torch semantics.

    Statistics are computed in float32 over all non-batch axes of each group of
    ``C // num_groups`` channels, with the two-pass variance (no ``E[x^2]-E[x]^2``
    cancellation). Parameters ``scale``/``bias`` of shape ``(C,)``.

    Feature seam: when ``site_path`` is set the call takes ``(x, policy, step)`` and returns
    ``(y, aux)``; the policy may replace the normalised, pre-affine value (e.g. statistics
    shared with another member) at the ``group_norm`` :class:`~jattn.models.features.FeatureSite`
    ``site_path`` (see :mod:`jattn.models.features`). Without ``site_path``: ``y`` only.

    Input ``(B, ..., C)``; output same shape in ``dtype``.
    Raises:
      ValueError: if C is not divisible by ``num_groups``.
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    site_path: str | None = None
    block: str = ""

    @nn.compact
    def __call__(self, x: Array, policy=None, step=None):
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels not divisible by {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        res = None
        if self.site_path is not None:
            site = FeatureSite(self.site_path, "group_norm", tuple(x.shape[1:3]), c, self.block,
                               self.num_groups, float(self.epsilon))
            res = feature_seam(site, x, policy, step)
        if res is None:
            mean, var = group_norm_stats(x, self.num_groups)
            y, aux = group_normalize(x, mean, var, self.num_groups, self.epsilon), {}
        else:
            y, aux = res
            y = y.astype(jnp.float32)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        y = y.astype(self.dtype)
        if self.site_path is None:
            return y
        return y, _site_aux(self.site_path, aux)


def _site_aux(path: str, aux) -> dict:
    """``{path: aux}`` when aux holds arrays, else ``{}`` (as the attention seam does)."""
    return {path: aux} if jax.tree_util.tree_leaves(aux) else {}


def feature_point(path: str | None, kind: str, x: Array, policy, step, block: str
                  ) -> tuple[Array, dict]:
    """Run the feature seam at a ``resnet``/``backbone``/``skip`` point (``path`` None: no
    seam). Returns ``(x, {path: aux} or {})``; x keeps its dtype."""
    if path is None:
        return x, {}
    site = FeatureSite(path, kind, tuple(x.shape[1:3]), x.shape[-1], block)
    res = feature_seam(site, x, policy, step)
    if res is None:
        return x, {}
    out, aux = res
    return out.astype(x.dtype), _site_aux(path, aux)


class Conv2d(nn.Module):
    """2-D convolution, NHWC input, ``kernel`` HWIO ``(k, k, C_in, features)`` + ``bias``.

    ``padding`` is symmetric (torch ``padding=p``). A 1x1 stride-1 convolution runs as a
    plain matmul on the channel axis (same numbers, cheaper on CPU).
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: int = 1
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        c_in = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (k, k, c_in, self.features), self.param_dtype)
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        if k == 1 and self.strides == 1 and self.padding == 0:
            y = jnp.dot(x, kernel[0, 0])
        else:
            p = self.padding
            y = jax.lax.conv_general_dilated(
                x, kernel, window_strides=(self.strides, self.strides),
                padding=((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class ResnetBlock2D(nn.Module):
    """diffusers' ``ResnetBlock2D`` (``time_embedding_norm="default"``, SiLU), NHWC.

    ``out = (shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb))))))
    / output_scale_factor``; the shortcut is a 1x1 ``conv_shortcut`` when channels change.

    Feature seam: when ``site_path`` is set (the UNet), the call takes ``(x, temb, policy,
    step)`` and returns ``(out, aux)``: ``norm1``/``norm2`` are ``group_norm`` sites
    ``{site_path}.norm1``/``.norm2``, ``conv2``'s output (the residual branch before the
    shortcut is added) is the ``resnet_residual`` site ``{site_path}.conv2`` and the output
    is the ``resnet`` site ``site_path`` (:mod:`jattn.models.features`). Without
    ``site_path`` (the VAE) it returns ``out``.

    Args (call): x ``(B, h, w, in_channels)``; temb ``(B, temb_channels)`` or ``None``
      (must be ``None`` iff ``temb_channels`` is ``None``).
    Returns: ``(B, h, w, out_channels)`` in ``dtype`` (and aux, see above).
    """

    in_channels: int
    out_channels: int | None = None
    temb_channels: int | None = 512
    groups: int = 32
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    groups_out: int | None = None
    output_scale_factor: float = 1.0
    site_path: str | None = None
    block: str = ""

    @nn.compact
    def __call__(self, x: Array, temb: Array | None = None, policy=None, step=None):
        out_channels = self.out_channels or self.in_channels
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"ResnetBlock2D: expected {self.in_channels} input channels, got "
                             f"{x.shape[-1]}")
        sp = self.site_path
        aux: dict = {}

        def norm(name, groups, h):
            gn = GroupNorm(groups, self.eps, dtype=self.dtype, name=name,
                           site_path=None if sp is None else f"{sp}.{name}", block=self.block)
            if sp is None:
                return gn(h)
            h, a = gn(h, policy, step)
            aux.update(a)
            return h

        h = norm("norm1", self.groups, x)
        h = nn.silu(h)
        h = Conv2d(out_channels, 3, dtype=self.dtype, name="conv1")(h)
        if self.temb_channels is not None:
            if temb is None:
                raise ValueError("ResnetBlock2D: temb is required when temb_channels is set")
            t = nn.Dense(out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = norm("norm2", self.groups_out or self.groups, h)
        h = nn.silu(h)
        h = Conv2d(out_channels, 3, dtype=self.dtype, name="conv2")(h)
        if sp is not None:  # the residual branch before the shortcut add (PnP's feature)
            h, a = feature_point(f"{sp}.conv2", "resnet_residual", h, policy, step, self.block)
            aux.update(a)
        if self.in_channels != out_channels:
            x = Conv2d(out_channels, 1, padding=0, dtype=self.dtype, name="conv_shortcut")(x)
        out = x.astype(self.dtype) + h
        if self.output_scale_factor != 1.0:
            out = out / jnp.asarray(self.output_scale_factor, out.dtype)
        if sp is None:
            return out
        out, a = feature_point(sp, "resnet", out, policy, step, self.block)
        aux.update(a)
        return out, aux


class Downsample2D(nn.Module):
    """diffusers' ``Downsample2D`` with ``use_conv=True``: 3x3 stride-2 ``conv``, NHWC.

    ``padding=1`` pads symmetrically (UNet); ``padding=0`` pads only bottom/right by one
    cell first (VAE), as diffusers does.

    Input ``(B, h, w, C)``; output ``(B, ceil(h/2), ceil(w/2), out_channels)`` (for even
    h, w: ``(B, h/2, w/2, out_channels)``).
    """

    channels: int
    out_channels: int | None = None
    padding: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return Conv2d(self.out_channels or self.channels, 3, strides=2, padding=self.padding,
                      dtype=self.dtype, name="conv")(x)


def upsample_nearest(x: Array, output_size: tuple[int, int] | None = None) -> Array:
    """Nearest-neighbour upsampling of NHWC ``x`` by 2 (or to ``output_size``, torch's
    ``F.interpolate(mode="nearest", size=...)`` index rule ``floor(i * in / out)``)."""
    b, h, w, c = x.shape
    if output_size is None or tuple(output_size) == (2 * h, 2 * w):
        y = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return y.reshape(b, 2 * h, 2 * w, c)
    oh, ow = output_size
    # torch computes the source index in float32 as floor(dst * (in / out))
    ih = jnp.floor(jnp.arange(oh, dtype=jnp.float32) * jnp.float32(h / oh)).astype(jnp.int32)
    iw = jnp.floor(jnp.arange(ow, dtype=jnp.float32) * jnp.float32(w / ow)).astype(jnp.int32)
    return x[:, jnp.minimum(ih, h - 1)][:, :, jnp.minimum(iw, w - 1)]


class Upsample2D(nn.Module):
    """diffusers' ``Upsample2D`` with ``use_conv=True``: nearest x2 then 3x3 ``conv``, NHWC.

    Input ``(B, h, w, C)``; output ``(B, 2h, 2w, out_channels)`` or
    ``(B, *output_size, out_channels)``.
    """

    channels: int
    out_channels: int | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, output_size: tuple[int, int] | None = None) -> Array:
        x = upsample_nearest(x, output_size)
        return Conv2d(self.out_channels or self.channels, 3, dtype=self.dtype, name="conv")(x)


def timestep_embedding(timesteps: Array, dim: int, *, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> Array:
    """Sinusoidal timestep features (diffusers' ``get_timestep_embedding``).

    Args:
      timesteps: ``(B,)`` timesteps (any real dtype; the DDPM timestep, not the step index).
      dim: feature size; odd sizes get one zero column.
      flip_sin_to_cos: ``[cos, sin]`` instead of ``[sin, cos]``.
      freq_shift: diffusers' ``downscale_freq_shift``.
    Returns:
      ``(B, dim)`` float32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    freqs = jnp.exp(exponent)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """diffusers' ``TimestepEmbedding`` (SiLU): ``linear_2(silu(linear_1(x)))``.

    Input ``(B, C_in)``; output ``(B, time_embed_dim)`` in ``dtype``.
    """

    time_embed_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_1")(x)
        x = nn.silu(x)
        return nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_2")(x)
