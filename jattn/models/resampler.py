"""Perceiver resampler of IP-Adapter-Plus (Flax linen): image features -> Q subject tokens.

``(B, L, C_in)`` image features (the CLIP vision tower's penultimate hidden state, L = 1 + P
tokens, :mod:`jattn.models.clip_vision`) -> ``(B, Q, C_out)`` tokens. Q learned latents
``(1, Q, D)`` are refined by ``depth`` blocks; each block is

* perceiver attention: ``x̂ = norm1(proj_in(features))``, ``l̂ = norm2(latents)``;
  queries ``to_q(l̂)``, keys/values ``to_k/to_v([x̂; l̂])`` (the latents attend to the
  image tokens and to themselves), N heads of width H, softmax(q·kᵀ/√H), ``to_out``; residual;
* feed-forward: LayerNorm, ``fc1`` (D -> ff_mult·D), exact GELU, ``fc2``; residual;

then ``norm_out(proj_out(latents))``. The projections inside the blocks have no bias;
``proj_in`` and ``proj_out`` have one. LayerNorm epsilon 1e-5 (torch default).

Nested Attention (Patashnik et al., SIGGRAPH 2025) feeds these tokens to its per-layer
nested K̃/Ṽ projections; its released encoder is CLIP ViT-H/14 + this resampler
(IP-Adapter-Plus SD1.5 sizes: ``dim 768, depth 4, heads 12, dim_head 64, num_queries 16,
embedding_dim 1280, output_dim 768``).

Parameters: ``latents``, ``proj_in``, ``layers_{i}/attn/{norm1, norm2, to_q, to_k, to_v,
to_out}``, ``layers_{i}/ff/{norm, fc1, fc2}``, ``proj_out``, ``norm_out``. Checkpoints convert
from (and export to) two torch layouts, see :func:`convert_resampler_state_dict`:
``"ip_adapter"`` (tencent-ailab/IP-Adapter ``ip_adapter/resampler.py`` ``Resampler``: fused
``to_kv``, ``layers.{i}.0`` attention / ``layers.{i}.1.{0,1,3}`` feed-forward) and
``"diffusers"`` (``diffusers.models.embeddings.IPAdapterPlusImageProjection``).

Legend: B batch, L input tokens, Q queries (latents), D hidden ``dim``, N heads, H head dim.

References: Ye et al., "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image
Diffusion Models" (2023); Jaegle et al., "Perceiver" (2021) / Alayrac et al., "Flamingo"
(2022) for the resampler; Patashnik et al., "Nested Attention" (SIGGRAPH 2025).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jattn.io.checkpoint import CheckpointMismatchError
from jattn.io.convert import params_to_state_dict, state_dict_to_params

Array = jax.Array

__all__ = ["ResamplerConfig", "Resampler", "init_resampler_params",
           "convert_resampler_state_dict", "resampler_state_dict", "LAYOUTS"]

LAYOUTS = ("ip_adapter", "diffusers")
_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class ResamplerConfig:
    """Sizes of the resampler (names as IP-Adapter's ``Resampler`` arguments).

    Attributes:
      dim: D, width of the latents.
      depth: number of (attention, feed-forward) blocks.
      dim_head: H.
      heads: N (inner width N·H need not equal D).
      num_queries: Q, number of output tokens.
      embedding_dim: C_in, width of the input features (CLIP hidden size).
      output_dim: C_out, width of the output tokens (the UNet's cross-attention width).
      ff_mult: feed-forward expansion; inner width ``int(dim * ff_mult)``.
    """

    dim: int = 768
    depth: int = 4
    dim_head: int = 64
    heads: int = 12
    num_queries: int = 16
    embedding_dim: int = 1280
    output_dim: int = 768
    ff_mult: float = 4

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "ff_mult":
                ok = isinstance(v, (int, float)) and v > 0 and int(self.dim * v) >= 1
            else:
                ok = isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
            if not ok:
                raise ValueError(f"ResamplerConfig: {f.name}={v!r} must be a positive "
                                 f"{'number' if f.name == 'ff_mult' else 'integer'}.")

    @property
    def inner_dim(self) -> int:
        """N·H, width of the attention projections."""
        return self.heads * self.dim_head

    @property
    def ff_inner_dim(self) -> int:
        return int(self.dim * self.ff_mult)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], *, dim_head: int = 64
                        ) -> "ResamplerConfig":
        """Infer the sizes from a checkpoint of either layout (as diffusers does).

        Heads are ``to_q`` rows / ``dim_head`` (64 in every IP-Adapter release; pass another
        value if the checkpoint was trained with one).

        Raises:
          CheckpointMismatchError: a key needed to infer the sizes is missing (names it).
        """
        def get(key):
            if key not in state_dict:
                raise CheckpointMismatchError(
                    f"resampler: cannot infer the configuration, {key!r} is missing "
                    f"(found {len(state_dict)} keys; is this an IP-Adapter-Plus image_proj?).")
            return np.shape(state_dict[key])

        lat = get("latents")
        layers = {int(m.group(1)) for k in state_dict
                  if (m := re.match(r"layers\.(\d+)\.", k))}
        fused = "layers.0.0.to_q.weight" in state_dict
        q = get("layers.0.0.to_q.weight" if fused else "layers.0.attn.to_q.weight")
        fc1 = get("layers.0.1.1.weight" if fused else "layers.0.ff.1.net.0.proj.weight")
        if q[0] % dim_head:
            raise CheckpointMismatchError(
                f"resampler: to_q has {q[0]} rows, not a multiple of dim_head={dim_head}; "
                "pass the dim_head the checkpoint was trained with.")
        return cls(dim=int(lat[2]), depth=max(layers) + 1 if layers else 0,
                   dim_head=dim_head, heads=q[0] // dim_head, num_queries=int(lat[1]),
                   embedding_dim=int(get("proj_in.weight")[1]),
                   output_dim=int(get("proj_out.weight")[0]), ff_mult=fc1[0] / lat[2])


class _PerceiverAttention(nn.Module):
    config: ResamplerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, latents: Array) -> Array:
        cfg = self.config
        b, q_len, _ = latents.shape
        x = nn.LayerNorm(epsilon=_EPS, dtype=self.dtype, name="norm1")(x)  # (B, L, D)
        lat = nn.LayerNorm(epsilon=_EPS, dtype=self.dtype, name="norm2")(latents)  # (B, Q, D)
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype,  # noqa: E731
                                         name=name)
        kv_in = jnp.concatenate([x, lat], axis=1)  # (B, L + Q, D)
        heads = lambda t: t.reshape(t.shape[0], t.shape[1], cfg.heads,  # noqa: E731
                                    cfg.dim_head)
        q = heads(dense(cfg.inner_dim, "to_q")(lat))  # (B, Q, N, H)
        k = heads(dense(cfg.inner_dim, "to_k")(kv_in))  # (B, L + Q, N, H)
        v = heads(dense(cfg.inner_dim, "to_v")(kv_in))
        out = jax.nn.dot_product_attention(q, k, v)  # softmax(q kᵀ / √H) v, (B, Q, N, H)
        return dense(cfg.dim, "to_out")(out.reshape(b, q_len, cfg.inner_dim))


class _FeedForward(nn.Module):
    config: ResamplerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        h = nn.LayerNorm(epsilon=_EPS, dtype=self.dtype, name="norm")(x)
        h = nn.Dense(cfg.ff_inner_dim, use_bias=False, dtype=self.dtype, name="fc1")(h)
        h = jax.nn.gelu(h, approximate=False)
        return nn.Dense(cfg.dim, use_bias=False, dtype=self.dtype, name="fc2")(h)


class _Block(nn.Module):
    config: ResamplerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, latents: Array) -> Array:
        latents = _PerceiverAttention(self.config, self.dtype, name="attn")(x, latents) + latents
        return _FeedForward(self.config, self.dtype, name="ff")(latents) + latents


class Resampler(nn.Module):
    """IP-Adapter-Plus perceiver resampler.

    Attributes:
      config: :class:`ResamplerConfig`.
      dtype: computation dtype (parameters keep their own dtype).
    """

    config: ResamplerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Array) -> Array:
        """Resample image features into Q tokens.

        Args:
          features: ``(B, L, embedding_dim)`` float, e.g. CLIP ``hidden_states[-2]`` (any L).
        Returns:
          ``(B, num_queries, output_dim)`` in ``dtype``.
        Raises:
          ValueError: ``features`` not 3-D or of the wrong width (names both widths).
        """
        cfg = self.config
        if features.ndim != 3 or features.shape[-1] != cfg.embedding_dim:
            raise ValueError(f"Resampler: features must be (B, L, {cfg.embedding_dim}) (the "
                             f"image encoder's hidden states), got {tuple(features.shape)}; "
                             "check ResamplerConfig.embedding_dim against the image encoder's "
                             "hidden_size.")
        b = features.shape[0]
        init = lambda key, shape: (jax.random.normal(key, shape)  # noqa: E731
                                   / np.sqrt(cfg.dim))
        lat0 = self.param("latents", init, (1, cfg.num_queries, cfg.dim))
        latents = jnp.broadcast_to(lat0.astype(self.dtype), (b, cfg.num_queries, cfg.dim))
        x = nn.Dense(cfg.dim, dtype=self.dtype, name="proj_in")(features.astype(self.dtype))
        for i in range(cfg.depth):
            latents = _Block(cfg, self.dtype, name=f"layers_{i}")(x, latents)
        latents = nn.Dense(cfg.output_dim, dtype=self.dtype, name="proj_out")(latents)
        return nn.LayerNorm(epsilon=_EPS, dtype=self.dtype, name="norm_out")(latents)


def init_resampler_params(config: ResamplerConfig, key: Array) -> dict:
    """Randomly initialised parameters (latents ``N(0, 1/D)`` as IP-Adapter; flax defaults
    for the rest), e.g. for training."""
    init = jax.jit(Resampler(config).init)
    return init(key, jnp.zeros((1, 1, config.embedding_dim), jnp.float32))["params"]


def _abstract_params(config: ResamplerConfig):
    x = jnp.zeros((1, 1, config.embedding_dim), jnp.float32)
    return jax.eval_shape(Resampler(config).init, jax.random.key(0), x)["params"]


# ------------------------------------------------------------------------------ layouts
# internal torch-style names (what jattn.io.convert maps 1:1 to the flax tree) per block:
_ATTN = ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "to_q.weight",
         "to_k.weight", "to_v.weight", "to_out.weight")
_FF = ("norm.weight", "norm.bias", "fc1.weight", "fc2.weight")
# per-layout block names: internal suffix -> checkpoint suffix (to_k/to_v: see _FUSED)
_BLOCK_NAMES = {
    "ip_adapter": {
        **{f"attn.{k}": f"0.{k}" for k in _ATTN if k not in ("to_k.weight", "to_v.weight")},
        "ff.norm.weight": "1.0.weight", "ff.norm.bias": "1.0.bias",
        "ff.fc1.weight": "1.1.weight", "ff.fc2.weight": "1.3.weight",
    },
    "diffusers": {
        "attn.norm1.weight": "ln0.weight", "attn.norm1.bias": "ln0.bias",
        "attn.norm2.weight": "ln1.weight", "attn.norm2.bias": "ln1.bias",
        "attn.to_q.weight": "attn.to_q.weight", "attn.to_k.weight": "attn.to_k.weight",
        "attn.to_v.weight": "attn.to_v.weight", "attn.to_out.weight": "attn.to_out.0.weight",
        "ff.norm.weight": "ff.0.weight", "ff.norm.bias": "ff.0.bias",
        "ff.fc1.weight": "ff.1.net.0.proj.weight", "ff.fc2.weight": "ff.1.net.2.weight",
    },
}
_FUSED = "0.to_kv.weight"  # ip_adapter: rows [to_k; to_v]
_TOP = ("latents", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias",
        "norm_out.weight", "norm_out.bias")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"resampler: layout={layout!r} is not supported (choose one of "
                         f"{', '.join(LAYOUTS)}).")


def _expected_shapes(config: ResamplerConfig, layout: str) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> torch shape for ``layout``."""
    d, inner, ff = config.dim, config.inner_dim, config.ff_inner_dim
    internal = {"attn.norm1.weight": (d,), "attn.norm1.bias": (d,), "attn.norm2.weight": (d,),
                "attn.norm2.bias": (d,), "attn.to_q.weight": (inner, d),
                "attn.to_k.weight": (inner, d), "attn.to_v.weight": (inner, d),
                "attn.to_out.weight": (d, inner), "ff.norm.weight": (d,), "ff.norm.bias": (d,),
                "ff.fc1.weight": (ff, d), "ff.fc2.weight": (d, ff)}
    out = {"latents": (1, config.num_queries, d),
           "proj_in.weight": (d, config.embedding_dim), "proj_in.bias": (d,),
           "proj_out.weight": (config.output_dim, d), "proj_out.bias": (config.output_dim,),
           "norm_out.weight": (config.output_dim,), "norm_out.bias": (config.output_dim,)}
    names = _BLOCK_NAMES[layout]
    for i in range(config.depth):
        for key, shape in internal.items():
            if key in names:
                out[f"layers.{i}.{names[key]}"] = shape
        if layout == "ip_adapter":
            out[f"layers.{i}.{_FUSED}"] = (2 * inner, d)
    return out


def convert_resampler_state_dict(state_dict: Mapping[str, Any], config: ResamplerConfig, *,
                                 layout: str = "ip_adapter", prefix: str = "",
                                 dtype=None) -> dict:
    """Torch resampler state dict -> params of :class:`Resampler`.

    Args:
      state_dict: ``{key: array}`` (numpy, or anything ``np.asarray`` reads).
      config: the resampler's sizes (:meth:`ResamplerConfig.from_state_dict` infers them).
      layout: ``"ip_adapter"`` — keys ``latents``, ``proj_in.*``, ``layers.{i}.0.{norm1,
        norm2}.*``, ``layers.{i}.0.{to_q, to_kv, to_out}.weight`` (to_kv rows = [to_k;
        to_v]), ``layers.{i}.1.0.*`` (LayerNorm), ``layers.{i}.1.1.weight``,
        ``layers.{i}.1.3.weight``, ``proj_out.*``, ``norm_out.*``; or ``"diffusers"`` — keys of
        ``IPAdapterPlusImageProjection`` (``layers.{i}.ln0``, ``.ln1``, ``.attn.to_{q,k,v}``,
        ``.attn.to_out.0``, ``.ff.0``, ``.ff.1.net.0.proj``, ``.ff.1.net.2``).
      prefix: only keys starting with it are read, without it (e.g. ``"image_proj."`` for
        the flattened ``{"image_proj": …, "ip_adapter": …}`` IP-Adapter files); others ignored.
      dtype: cast every parameter to this dtype (default float32).
    Returns:
      the params tree (``Resampler(config).apply({"params": params}, features)``).
    Raises:
      CheckpointMismatchError: naming every missing, unexpected and misshapen key, in the
        checkpoint's own names.
      ValueError: unknown ``layout``.
    """
    _check_layout(layout)
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    want = _expected_shapes(config, layout)
    missing = [prefix + k for k in want if k not in sd]
    unexpected = [prefix + k for k in sd if k not in want]
    misshapen = [f"{prefix}{k}: checkpoint {tuple(np.shape(v))}, model expects {want[k]}"
                 for k, v in sd.items() if k in want and tuple(np.shape(v)) != want[k]]
    if missing or unexpected or misshapen:
        lines = [f"resampler ({layout} layout): checkpoint does not match the configuration "
                 f"{config}."]
        if missing:
            lines.append(f"  in model, not in checkpoint ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  in checkpoint, not in model ({len(unexpected)}): "
                         + ", ".join(unexpected))
        if misshapen:
            lines.append(f"  shape mismatches ({len(misshapen)}):\n    " + "\n    ".join(misshapen))
        lines.append("  Fix: check the layout (ip_adapter or diffusers) and the sizes "
                     "(ResamplerConfig.from_state_dict infers them from the checkpoint).")
        raise CheckpointMismatchError("\n".join(lines))
    internal: dict[str, np.ndarray] = {k: np.asarray(sd[k]) for k in _TOP}
    names = _BLOCK_NAMES[layout]
    for i in range(config.depth):
        for key, ck_key in names.items():
            internal[f"layers.{i}.{key}"] = np.asarray(sd[f"layers.{i}.{ck_key}"])
        if layout == "ip_adapter":
            kv = np.asarray(sd[f"layers.{i}.{_FUSED}"])
            internal[f"layers.{i}.attn.to_k.weight"] = kv[:config.inner_dim]
            internal[f"layers.{i}.attn.to_v.weight"] = kv[config.inner_dim:]
    return state_dict_to_params(internal, _abstract_params(config), model_name="resampler",
                                dtype=dtype)


def resampler_state_dict(params: Mapping, *, layout: str = "ip_adapter", prefix: str = "",
                         dtype=None) -> dict[str, np.ndarray]:
    """Params of :class:`Resampler` -> torch state dict (numpy) in ``layout`` (see
    :func:`convert_resampler_state_dict`), keys prefixed with ``prefix``.

    Raises:
      ValueError: unknown ``layout``.
    """
    _check_layout(layout)
    internal = params_to_state_dict(params, dtype=dtype)
    names = _BLOCK_NAMES[layout]
    out: dict[str, np.ndarray] = {}
    for key, value in internal.items():
        m = re.fullmatch(r"layers\.(\d+)\.(.*)", key)
        if m is None:
            out[key] = value
            continue
        i, rest = m.groups()
        if layout == "ip_adapter" and rest in ("attn.to_k.weight", "attn.to_v.weight"):
            if rest == "attn.to_k.weight":
                out[f"layers.{i}.{_FUSED}"] = np.concatenate(
                    [value, internal[f"layers.{i}.attn.to_v.weight"]], axis=0)
            continue
        out[f"layers.{i}.{names[rest]}"] = value
    return {prefix + k: v for k, v in out.items()}
