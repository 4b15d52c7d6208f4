"""CLIP text encoders (Flax linen), the prompt encoders of Stable Diffusion 1.x/2.x/XL.

Architecture and parameter names follow transformers' ``CLIPTextModel`` so that checkpoints
convert one to one: ``text_model/embeddings/token_embedding``,
``text_model/encoder/layers_0/self_attn/q_proj``, ``.../layer_norm1``, ``.../mlp/fc1``,
``text_model/final_layer_norm``. Pre-norm transformer with a causal mask; SD1.x uses
``quick_gelu`` (OpenAI CLIP ViT-L/14), SD2.x ``gelu`` (OpenCLIP ViT-H/14).

:class:`CLIPTextModelWithProjection` (SDXL's ``text_encoder_2``, OpenCLIP ViT-bigG/14) adds
transformers' ``text_projection`` (a bias-free linear map of the pooled end-of-text state to
``projection_dim``, the pooled ``text_embeds``); its parameters are ``text_model/...`` as
above plus ``text_projection/kernel``.

Legend: B batch, S tokens, D hidden size, P projection_dim, N heads, H head dim.

Reference: Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision" (2021); transformers ``models/clip/modeling_clip.py``.
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

Array = jax.Array

__all__ = ["CLIPTextConfig", "CLIPTextModel", "CLIPTextModelWithProjection",
           "convert_clip_text_state_dict", "clip_text_state_dict", "init_clip_text_params"]

_ACTIVATIONS = ("quick_gelu", "gelu")
_PREFIX = "text_model."
_PROJECTION = "text_projection."


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters of the CLIP text encoder (field names as in transformers' config.json).

    Attributes:
      vocab_size: number of token ids.
      hidden_size: D.
      intermediate_size: MLP hidden width.
      num_hidden_layers: transformer layers.
      num_attention_heads: N (head_dim H = D / N).
      max_position_embeddings: longest token sequence (77 for SD).
      hidden_act: ``"quick_gelu"`` (SD1.x) or ``"gelu"`` (exact erf GELU, SD2.x).
      layer_norm_eps: LayerNorm epsilon.
      bos_token_id, eos_token_id, pad_token_id: special token ids. ``eos_token_id == 2`` is the
        legacy (pre transformers#24773) value; then the pooled token is the largest id.
      projection_dim: P, the width of :class:`CLIPTextModelWithProjection`'s ``text_embeds``
        (1280 for SDXL's ``text_encoder_2``); unused by :class:`CLIPTextModel`.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    projection_dim: int = 512

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"CLIPTextConfig: hidden_act={self.hidden_act!r} is not supported "
                             f"(supported: {', '.join(_ACTIVATIONS)}).")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIPTextConfig: hidden_size={self.hidden_size} is not divisible "
                             f"by num_attention_heads={self.num_attention_heads}.")

    @property
    def num_heads(self) -> int:
        return self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
        """Build from a transformers ``CLIPTextConfig`` dict (``text_encoder/config.json``).

        Keys that do not change the text encoder's forward pass (``initializer_range``,
        ``transformers_version`` …) are ignored; ``projection_dim`` is read (used by
        :class:`CLIPTextModelWithProjection` only). ``hidden_size``,
        ``intermediate_size``, ``num_hidden_layers`` and ``num_attention_heads`` are
        required (transformers always writes them, and its defaults differ from SD's);
        other missing or null keys take the defaults. Every value is type-checked.

        Raises:
          jattn.io.checkpoint.CheckpointConfigError (a ValueError): a value of the wrong
            type or out of range, or a required key missing (names the key, the value and
            what is expected).
          ValueError: unsupported ``hidden_act`` or inconsistent sizes.
        """
        from jattn.io import checkpoint as ck

        o = "CLIPTextConfig"
        if not isinstance(config, Mapping):
            raise ck.CheckpointConfigError(
                f"{o}: expected a dict (the object of text_encoder/config.json), got "
                f"{type(config).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in dict(config).items() if k in names and v is not None}
        ck.require_keys(o, kwargs, ("hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads"),
                        " (every transformers CLIPTextConfig file has them)")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "max_position_embeddings", "projection_dim"):
            if key in kwargs:
                kwargs[key] = ck.config_int(o, key, kwargs[key], minimum=1)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key in kwargs:
                kwargs[key] = ck.config_int(o, key, kwargs[key], minimum=0)
        if "hidden_act" in kwargs:
            kwargs["hidden_act"] = ck.config_str(o, "hidden_act", kwargs["hidden_act"])
        if "layer_norm_eps" in kwargs:
            kwargs["layer_norm_eps"] = ck.config_float(o, "layer_norm_eps",
                                                       kwargs["layer_norm_eps"], positive=True)
        return cls(**kwargs)

    def to_transformers(self, with_projection: bool = False) -> dict[str, Any]:
        """The transformers ``config.json`` dict of this encoder (``CLIPTextModel``, or
        ``CLIPTextModelWithProjection`` when ``with_projection``)."""
        d = dataclasses.asdict(self)
        d.update(architectures=["CLIPTextModelWithProjection" if with_projection
                                else "CLIPTextModel"],
                 model_type="clip_text_model", attention_dropout=0.0)
        return d


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    return lambda x: jax.nn.gelu(x, approximate=False)


class _Attention(nn.Module):
    """Multi-head self-attention, ``(B, S, D) -> (B, S, D)``, mask ``(B, 1, S, S)`` bool."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        cfg = self.config
        b, s, _ = x.shape
        dense = lambda name: nn.Dense(cfg.hidden_size, dtype=self.dtype, name=name)  # noqa: E731
        q = dense("q_proj")(x).reshape(b, s, cfg.num_heads, cfg.head_dim)  # (B, S, N, H)
        k = dense("k_proj")(x).reshape(b, s, cfg.num_heads, cfg.head_dim)
        v = dense("v_proj")(x).reshape(b, s, cfg.num_heads, cfg.head_dim)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask)  # (B, S, N, H)
        return dense("out_proj")(out.reshape(b, s, cfg.hidden_size))


class _MLP(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        x = nn.Dense(cfg.intermediate_size, dtype=self.dtype, name="fc1")(x)
        x = _activation(cfg.hidden_act)(x)
        return nn.Dense(cfg.hidden_size, dtype=self.dtype, name="fc2")(x)


class _EncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        eps = self.config.layer_norm_eps
        h = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="layer_norm1")(x)
        x = x + _Attention(self.config, self.dtype, name="self_attn")(h, mask)
        h = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="layer_norm2")(x)
        return x + _MLP(self.config, self.dtype, name="mlp")(h)


class _Embeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array, inputs_embeds: Array | None = None) -> Array:
        cfg = self.config
        tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                       name="token_embedding")(input_ids)
        if inputs_embeds is not None:  # token embeddings given (e.g. a learned subject token)
            tok = inputs_embeds.astype(tok.dtype)
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                       name="position_embedding")(jnp.arange(input_ids.shape[1])[None])
        return tok + pos


class _Encoder(nn.Module):
    """The layer stack, ``(B, S, D) -> [input, layer 1 output, …]``.

    Shared with :mod:`jattn.models.clip_vision`: the config is duck-typed (``hidden_size``,
    ``intermediate_size``, ``num_hidden_layers``, ``num_heads``, ``head_dim``, ``hidden_act``,
    ``layer_norm_eps``) and ``mask=None`` is full (unmasked) attention.
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> list[Array]:
        states = [x]
        for i in range(self.config.num_hidden_layers):
            x = _EncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x, mask)
            states.append(x)
        return states


class _TextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, output_hidden_states, inputs_embeds=None):
        cfg = self.config
        b, s = input_ids.shape
        x = _Embeddings(cfg, self.dtype, name="embeddings")(input_ids, inputs_embeds)  # (B, S, D)
        mask = jnp.tril(jnp.ones((s, s), dtype=bool))[None, None]  # (1, 1, T, S)
        if attention_mask is not None:
            mask = mask & (attention_mask.astype(bool)[:, None, None, :])  # (B, 1, T, S)
        states = _Encoder(cfg, self.dtype, name="encoder")(x, mask)
        last = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                            name="final_layer_norm")(states[-1])
        ids = input_ids.astype(jnp.int32)
        if cfg.eos_token_id == 2:
            # legacy configs: the end-of-text token has the largest id of the vocabulary
            pool_idx = jnp.argmax(ids, axis=-1)
        else:
            # first end-of-text token (padding may use the same id)
            pool_idx = jnp.argmax((ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = last[jnp.arange(b), pool_idx]  # (B, D)
        out = {"last_hidden_state": last, "pooler_output": pooled}
        if output_hidden_states:
            out["hidden_states"] = tuple(states)
        return out


class CLIPTextModel(nn.Module):
    """CLIP text encoder; parameters live under ``text_model/`` as in transformers' checkpoints.

    Attributes:
      config: :class:`CLIPTextConfig`.
      dtype: computation dtype (parameters keep their own dtype).
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 output_hidden_states: bool = False, inputs_embeds: Array | None = None
                 ) -> dict[str, Any]:
        """Encode token ids.

        Args:
          input_ids: ``(B, S)`` integer token ids, S <= ``max_position_embeddings``.
          attention_mask: optional ``(B, S)`` (1 = token, 0 = padding); combined with the
            causal mask. A query row whose keys are all masked (left padding) attends
            uniformly, as transformers' eager attention does.
          output_hidden_states: also return the per-layer states.
          inputs_embeds: optional ``(B, S, D)`` token embeddings used instead of the
            lookup of ``input_ids`` (position embeddings are still added; ``input_ids``
            still choose the pooled token), as transformers' ``inputs_embeds``: e.g. a
            subject token predicted per row by an image encoder.
        Returns:
          dict with ``last_hidden_state`` ``(B, S, D)`` (after the final LayerNorm),
          ``pooler_output`` ``(B, D)`` (the end-of-text token's state; see
          :class:`CLIPTextConfig`), and with ``output_hidden_states`` a tuple
          ``hidden_states`` of ``num_hidden_layers + 1`` arrays ``(B, S, D)``: the embeddings,
          then each layer's output (before the final LayerNorm). Arrays in ``dtype``.
        Raises:
          ValueError: ``input_ids`` not 2-D or longer than ``max_position_embeddings``.
        """
        _check_ids("CLIPTextModel", input_ids, self.config)
        if inputs_embeds is not None and inputs_embeds.shape != (*input_ids.shape,
                                                                 self.config.hidden_size):
            raise ValueError(f"CLIPTextModel: inputs_embeds must be (B, S, "
                             f"{self.config.hidden_size}) like input_ids {input_ids.shape}, "
                             f"got {inputs_embeds.shape}")
        return _TextTransformer(self.config, self.dtype, name="text_model")(
            input_ids, attention_mask, output_hidden_states, inputs_embeds)


def _check_ids(owner: str, input_ids, config: CLIPTextConfig) -> None:
    if input_ids.ndim != 2:
        raise ValueError(f"{owner}: input_ids must be (B, S), got {input_ids.shape}")
    if input_ids.shape[1] > config.max_position_embeddings:
        raise ValueError(f"{owner}: {input_ids.shape[1]} tokens exceed "
                         f"max_position_embeddings={config.max_position_embeddings}")


class CLIPTextModelWithProjection(nn.Module):
    """CLIP text encoder with the projected pooled output (transformers'
    ``CLIPTextModelWithProjection``; SDXL's ``text_encoder_2``).

    Parameters: ``text_model/...`` (as :class:`CLIPTextModel`) and ``text_projection/kernel``
    ``(D, P)`` (no bias).

    Attributes:
      config: :class:`CLIPTextConfig` (``projection_dim`` = P).
      dtype: computation dtype (parameters keep their own dtype).
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 output_hidden_states: bool = False) -> dict[str, Any]:
        """Encode token ids.

        Args: as :meth:`CLIPTextModel.__call__`.
        Returns:
          dict with ``text_embeds`` ``(B, P)`` (``text_projection`` of the pooled
          end-of-text state: the first ``eos_token_id``, or the largest id for legacy
          ``eos_token_id == 2`` configs, as transformers), ``pooler_output`` ``(B, D)`` (that
          state before the projection), ``last_hidden_state`` ``(B, S, D)`` and with
          ``output_hidden_states`` the tuple ``hidden_states`` (``num_hidden_layers + 1``
          arrays ``(B, S, D)``; SDXL conditions on ``hidden_states[-2]``). Arrays in
          ``dtype``.
        Raises:
          ValueError: ``input_ids`` not 2-D or longer than ``max_position_embeddings``.
        """
        _check_ids("CLIPTextModelWithProjection", input_ids, self.config)
        out = dict(_TextTransformer(self.config, self.dtype, name="text_model")(
            input_ids, attention_mask, output_hidden_states))
        out["text_embeds"] = nn.Dense(self.config.projection_dim, use_bias=False,
                                      dtype=self.dtype, name="text_projection")(
                                          out["pooler_output"])
        return out


def _model_cls(with_projection: bool):
    return CLIPTextModelWithProjection if with_projection else CLIPTextModel


def _abstract_params(config: CLIPTextConfig, with_projection: bool = False):
    model = _model_cls(with_projection)(config)
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), ids)["params"]


def init_clip_text_params(config: CLIPTextConfig, key: Array, *,
                          with_projection: bool = False) -> dict:
    """Randomly initialised parameters (flax default initialisers), e.g. for training, of
    :class:`CLIPTextModel` (or :class:`CLIPTextModelWithProjection` when
    ``with_projection``)."""
    init = jax.jit(_model_cls(with_projection)(config).init)  # eager init is op by op (slow)
    return init(key, jnp.zeros((1, 1), jnp.int32))["params"]


def _rename_clip_key(key: str) -> str | None:
    if key.endswith("embeddings.position_ids"):
        return None  # a buffer (arange), not a parameter
    if not key.startswith((_PREFIX, _PROJECTION)):
        key = _PREFIX + key  # transformers >= 5 saves CLIPTextModel without the prefix
    return key


def convert_clip_text_state_dict(state_dict: Mapping[str, Any], config: CLIPTextConfig,
                                 dtype=None, *, with_projection: bool = False) -> dict:
    """transformers ``CLIPTextModel`` (or, with ``with_projection``,
    ``CLIPTextModelWithProjection``) state dict -> params of :class:`CLIPTextModel` (or
    :class:`CLIPTextModelWithProjection`).

    Accepts keys with the ``text_model.`` prefix (every SD checkpoint, transformers < 5, and
    ``CLIPTextModelWithProjection`` of every version) and without (transformers >= 5
    ``CLIPTextModel.save_pretrained``); the ``position_ids`` buffer is dropped. With
    ``with_projection`` the bias-free ``text_projection.weight`` ``(P, D)`` is required;
    without it, it is an unexpected key.

    Args:
      state_dict: ``{key: array}`` (numpy, or anything ``np.asarray`` reads).
      config: the encoder's config.
      dtype: cast every parameter to this dtype (default float32).
      with_projection: convert for :class:`CLIPTextModelWithProjection`.
    Returns:
      the params tree (``model.apply({"params": params}, ...)``).
    Raises:
      CheckpointMismatchError: naming every missing, unexpected and misshapen key.
    """
    return state_dict_to_params(
        state_dict, _abstract_params(config, with_projection),
        model_name="text_encoder_2" if with_projection else "text_encoder",
        rename=_rename_clip_key, dtype=dtype)


def clip_text_state_dict(params: Mapping, *, prefix: str = _PREFIX, dtype=None
                         ) -> dict[str, np.ndarray]:
    """Params of :class:`CLIPTextModel` or :class:`CLIPTextModelWithProjection` ->
    transformers state dict (numpy).

    Args:
      params: the params tree.
      prefix: ``"text_model."`` (default) gives the on-disk layout of SD checkpoints, which
        ``CLIPTextModel.from_pretrained`` of every transformers version reads; ``""`` gives
        the keys of a transformers >= 5 ``CLIPTextModel`` module
        (``model.load_state_dict(sd, strict=True)``). ``text_projection.weight`` keeps its
        name (``CLIPTextModelWithProjection`` always uses the ``text_model.`` prefix).
      dtype: optional numpy dtype of the exported arrays.
    """
    sd = params_to_state_dict(params, dtype=dtype)
    return {(prefix + k[len(_PREFIX):] if k.startswith(_PREFIX) else k): v
            for k, v in sd.items()}
