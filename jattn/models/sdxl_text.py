"""SDXL's prompt conditioning from its two CLIP text encoders.

Stable Diffusion XL conditions its UNet on (Podell et al., "SDXL: Improving Latent
Diffusion Models for High-Resolution Image Synthesis", 2023, sec. 2.1):

* ``prompt_embeds`` ``(B, S, D1 + D2)``: the penultimate hidden states (no final LayerNorm)
  of ``text_encoder`` (CLIP ViT-L, D1 = 768, :class:`~jattn.models.clip_text.CLIPTextModel`)
  and ``text_encoder_2`` (OpenCLIP ViT-bigG, D2 = 1280,
  :class:`~jattn.models.clip_text.CLIPTextModelWithProjection`), concatenated on the
  channel axis; the cross-attention context (S = 77 tokens, 2048 channels for SDXL).
* ``pooled_prompt_embeds`` ``(B, P)``: ``text_encoder_2``'s projected pooled ``text_embeds``
  (P = 1280), fed to the UNet's added ("text_time") embedding.

This module reproduces diffusers' ``StableDiffusionXLPipeline.encode_prompt``
(diffusers/src/diffusers/pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py):
``prompt_2`` / ``negative_prompt_2`` default to ``prompt`` / ``negative_prompt`` (also when
empty, as diffusers' ``or``); ``clip_skip`` = k takes ``hidden_states[-(k + 2)]`` of both
encoders; without a negative prompt and with ``force_zeros_for_empty_prompt`` (SDXL base's
``model_index.json``: true) the negative embeddings are zeros; otherwise the negative prompt
(default ``""``) is encoded. A refiner-style model without ``text_encoder`` uses
``text_encoder_2`` alone (``prompt_embeds`` ``(B, S, D2)``).

Differences from diffusers, both behind ``reference_quirks=True`` (which restores
diffusers' behaviour):

* diffusers ignores ``clip_skip`` for the negative prompt (always ``hidden_states[-2]``);
  jattn applies the same layer to prompt and negative prompt.
* diffusers returns zeros when ``negative_prompt`` is None even if ``negative_prompt_2``
  is given (which is then ignored); jattn zeros only when both are None, and otherwise
  encodes ``negative_prompt or ""`` / ``negative_prompt_2``.

Prompts longer than the encoders' 77 tokens raise (jattn never truncates silently, see
:func:`jattn.io.tokenizer.tokenize`); diffusers truncates with a warning.

Legend: B batch, S tokens (77), D1 / D2 hidden sizes, P projection_dim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jattn.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

Array = jax.Array

__all__ = ["SDXLPromptEmbeds", "sdxl_text_embeddings", "encode_prompt_sdxl"]


@dataclasses.dataclass(frozen=True)
class SDXLPromptEmbeds:
    """The four outputs of diffusers' ``StableDiffusionXLPipeline.encode_prompt``.

    Attributes:
      prompt_embeds: ``(B, S, D1 + D2)`` (``(B, S, D2)`` without ``text_encoder``).
      pooled_prompt_embeds: ``(B, P)``.
      negative_prompt_embeds: like ``prompt_embeds``; None without classifier-free guidance.
      negative_pooled_prompt_embeds: like ``pooled_prompt_embeds``; None without CFG.
    """

    prompt_embeds: Array
    pooled_prompt_embeds: Array
    negative_prompt_embeds: Array | None = None
    negative_pooled_prompt_embeds: Array | None = None


def _hidden_index(clip_skip: int | None) -> int:
    # "2" because SDXL always indexes from the penultimate layer (diffusers).
    return -2 if clip_skip is None else -(clip_skip + 2)


def sdxl_text_embeddings(params: Mapping[str, Any], ids: Array | None, ids_2: Array, *,
                         config: CLIPTextConfig | None, config_2: CLIPTextConfig,
                         clip_skip: int | None = None, dtype: Any = jnp.float32
                         ) -> tuple[Array, Array]:
    """SDXL's ``(prompt_embeds, pooled_prompt_embeds)`` of token ids (pure; jit it with
    ``config``, ``config_2``, ``clip_skip`` and ``dtype`` static).

    Args:
      params: ``{"text_encoder": params of CLIPTextModel or None, "text_encoder_2": params
        of CLIPTextModelWithProjection}``.
      ids: ``(B, S)`` int32 ids of ``tokenizer`` (None when ``config`` is None).
      ids_2: ``(B, S)`` int32 ids of ``tokenizer_2``.
      config: ``text_encoder``'s config, or None for a model without it (SDXL refiner).
      config_2: ``text_encoder_2``'s config (``projection_dim`` = P).
      clip_skip: None (penultimate layer) or k >= 0: ``hidden_states[-(k + 2)]``.
      dtype: computation dtype.
    Returns:
      ``prompt_embeds`` ``(B, S, D1 + D2)`` (encoder 1's channels first) and
      ``pooled_prompt_embeds`` ``(B, P)``, in ``dtype``.
    """
    k = _hidden_index(clip_skip)
    states = []
    if config is not None:
        out = CLIPTextModel(config, dtype).apply({"params": params["text_encoder"]}, ids,
                                                 output_hidden_states=True)
        states.append(out["hidden_states"][k])
    out2 = CLIPTextModelWithProjection(config_2, dtype).apply(
        {"params": params["text_encoder_2"]}, ids_2, output_hidden_states=True)
    states.append(out2["hidden_states"][k])
    return jnp.concatenate(states, axis=-1), out2["text_embeds"]


# How many times encode_prompt_sdxl's compiled program was traced (tests check that new
# prompts of the same batch size never recompile).
trace_count = 0


def _traced(*args, **kwargs):
    global trace_count
    trace_count += 1
    return sdxl_text_embeddings(*args, **kwargs)


_jitted = jax.jit(_traced, static_argnames=("config", "config_2", "clip_skip", "dtype"))


def _prompt_list(value, name: str, batch: int | None) -> list[str]:
    if isinstance(value, str):
        return [value] * (batch or 1)
    if not isinstance(value, Sequence) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{name}: expected a string or a list of strings, got "
                         f"{type(value).__name__}")
    value = list(value)
    if batch is not None and len(value) != batch:
        raise ValueError(f"{name}: {len(value)} prompts for {batch} prompts in `prompt`; "
                         f"give one string or one per prompt")
    if not value:
        raise ValueError(f"{name}: empty list; give at least one prompt")
    return value


def encode_prompt_sdxl(params: Mapping[str, Any], config: CLIPTextConfig | None,
                       config_2: CLIPTextConfig, tokenizer, tokenizer_2,
                       prompt: str | Sequence[str], prompt_2: str | Sequence[str] | None = None,
                       negative_prompt: str | Sequence[str] | None = None,
                       negative_prompt_2: str | Sequence[str] | None = None, *,
                       do_classifier_free_guidance: bool = True,
                       force_zeros_for_empty_prompt: bool = True,
                       clip_skip: int | None = None, dtype: Any = jnp.float32,
                       reference_quirks: bool = False) -> SDXLPromptEmbeds:
    """SDXL prompt (and negative prompt) embeddings, as diffusers'
    ``StableDiffusionXLPipeline.encode_prompt`` (see the module docstring for the rules and
    the two ``reference_quirks``).

    Args:
      params: ``{"text_encoder": ... or None, "text_encoder_2": ...}`` (see
        :func:`sdxl_text_embeddings`).
      config, config_2: the encoders' configs (``config`` None: no ``text_encoder``).
      tokenizer, tokenizer_2: CLIP tokenizers (``tokenizer`` None exactly when ``config``
        is None). SDXL's ``tokenizer_2`` pads with ``"!"`` (id 0).
      prompt: one prompt or B prompts.
      prompt_2: for ``text_encoder_2`` (default: ``prompt``); a string or B strings.
      negative_prompt, negative_prompt_2: a string or B strings (default ``""`` /
        ``negative_prompt``, or zeros, see ``force_zeros_for_empty_prompt``).
      do_classifier_free_guidance: also return the negative embeddings.
      force_zeros_for_empty_prompt: without negative prompt, negative embeddings are zeros
        (SDXL base: True, from ``model_index.json``).
      clip_skip: None or k >= 0 (``hidden_states[-(k + 2)]``), k < ``num_hidden_layers``.
      dtype: computation dtype.
      reference_quirks: diffusers' behaviour for clip_skip on the negative prompt and
        ``negative_prompt_2`` without ``negative_prompt``.
    Returns:
      :class:`SDXLPromptEmbeds`.
    Raises:
      ValueError: a prompt list whose length differs from ``prompt``'s (naming
        ``prompt_2`` / ``negative_prompt`` / ``negative_prompt_2``); a prompt over the
        encoders' token limit; ``clip_skip`` out of range; ``tokenizer``/``config``
        given without the other.
    """
    from jattn.io.tokenizer import tokenize

    if (config is None) != (tokenizer is None):
        raise ValueError("encode_prompt_sdxl: give `config` and `tokenizer` together (both None "
                         "for a model without text_encoder, e.g. the SDXL refiner)")
    if clip_skip is not None:
        layers = min(c.num_hidden_layers for c in (config, config_2) if c is not None)
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, (int, np.integer)) \
                or not 0 <= clip_skip < layers:
            raise ValueError(f"clip_skip={clip_skip!r}: must be None or an int in "
                             f"[0, {layers - 1}] (the text encoders have {layers} layers)")
        clip_skip = int(clip_skip)

    prompts = _prompt_list(prompt, "prompt", None)
    b = len(prompts)
    prompts_2 = _prompt_list(prompt_2, "prompt_2", b) if prompt_2 else prompts

    def run(p1: list[str], p2: list[str], names: tuple[str, str], skip):
        ids = (jnp.asarray(tokenize(tokenizer, p1, config.max_position_embeddings,
                                    name=names[0])) if config is not None else None)
        ids_2 = jnp.asarray(tokenize(tokenizer_2, p2, config_2.max_position_embeddings,
                                     name=names[1]))
        return _jitted(params, ids, ids_2, config=config, config_2=config_2, clip_skip=skip,
                       dtype=dtype)

    embeds, pooled = run(prompts, prompts_2, ("prompt", "prompt_2"), clip_skip)
    if not do_classifier_free_guidance:
        return SDXLPromptEmbeds(embeds, pooled)

    no_negative = (negative_prompt is None if reference_quirks
                   else negative_prompt is None and negative_prompt_2 is None)
    if no_negative and force_zeros_for_empty_prompt:
        return SDXLPromptEmbeds(embeds, pooled, jnp.zeros_like(embeds), jnp.zeros_like(pooled))
    neg = _prompt_list(negative_prompt or "", "negative_prompt", b)
    neg_2 = (_prompt_list(negative_prompt_2, "negative_prompt_2", b) if negative_prompt_2
             else neg)
    neg_embeds, neg_pooled = run(neg, neg_2, ("negative_prompt", "negative_prompt_2"),
                                 None if reference_quirks else clip_skip)
    return SDXLPromptEmbeds(embeds, pooled, neg_embeds, neg_pooled)
