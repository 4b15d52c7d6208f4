"""Nested Attention's subject encoder and nested projections (Flax), weights I/O, converters.

Architecture (Patashnik et al., "Nested Attention: Semantic-aware Attention Values for
Concept Personalization", SIGGRAPH 2025; the authors' SDXL release
``orpatashnik/NestedAttentionEncoder``: CLIP ViT-H/14 ``CLIPVisionModelWithProjection`` +
IP-Adapter-Plus resampler)::

    subject image (U, S_img, S_img, 3), CLIP-normalised
      -> CLIP vision tower (:mod:`jattn.models.clip_vision`), hidden_states[feature_layer]
         (U, 1 + P, D_vis)
      -> perceiver resampler (:mod:`jattn.models.resampler`) -> R subject tokens
         (U, R, D_ctx), D_ctx = the UNet's cross_attention_dim
      -> per cross-attention site: K̃ = tokens · W_k_nest, Ṽ = tokens · W_v_nest
         (U, R, N, H)                                   (:func:`nested_kv`)

The nested projections ``to_k_nest``/``to_v_nest`` (no bias, D_ctx -> N·H) are initialised
from the site's own ``to_k``/``to_v`` (the third-party reimplementation's
``get_ipa_generator(…, attn_processor="nest")``: ``to_k_nest.weight = unet_sd[layer +
".to_k.weight"]``), so at initialisation a subject token is read like a text token.

The placeholder s* (:mod:`jattn.methods.personalize`): a fixed rare token of the CLIP
vocabulary (``"sks"``, id 48136, one BPE token, never in the world's captions) whose input
embedding row is replaced by a learned vector ``placeholder/text_encoder`` (initialised from
an initializer word, as the authors add a token initialised from an "initializer token");
the vocabulary and the text encoder's shapes stay as they are (nothing recompiles).

Params (a pytree)::

    {"image_encoder": CLIPVisionModelWithProjection params,
     "resampler": Resampler params,
     "nested": {site_path: {"to_k": (D_ctx, N·H), "to_v": (D_ctx, N·H)}},   # flax (in, out)
     "placeholder": {"text_encoder": (D_text,)}}

Safetensors layout of a weights file (:func:`save_nested_weights`, :func:`load_nested_weights`;
torch conventions, ``(out, in)`` matrices)::

    image_encoder.<transformers CLIPVisionModelWithProjection key>   e.g.
        image_encoder.vision_model.encoder.layers.0.self_attn.q_proj.weight
    image_proj.<IP-Adapter resampler key ("ip_adapter" layout)>       e.g.
        image_proj.latents, image_proj.layers.0.0.to_kv.weight
    nested.<site path>.to_k_nest.weight    (N·H, D_ctx)                e.g.
        nested.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k_nest.weight
    nested.<site path>.to_v_nest.weight    (N·H, D_ctx)
    placeholder.text_encoder               (D_text,)
    metadata "jattn_nested": JSON of :meth:`NestedEncoderConfig.to_json` (format 1)

Legend: U subjects, S_img encoder image size, P patches, D_vis vision width, R subject
tokens, D_ctx cross-attention (context) width, N heads, H head dim, D_text text width.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jattn.models.clip_vision import (CLIPImageProcessing, CLIPVisionConfig,
                                      CLIPVisionModelWithProjection, clip_vision_state_dict,
                                      convert_clip_vision_state_dict, init_clip_vision_params)
from jattn.models.resampler import (Resampler, ResamplerConfig, convert_resampler_state_dict,
                                    init_resampler_params, resampler_state_dict)

Array = jax.Array

__all__ = ["NestedEncoderConfig", "SubjectEncoder", "NestedWeights", "encode_subjects",
           "nested_kv", "site_params_path", "init_nested_params", "init_from_unet",
           "save_nested_weights", "load_nested_weights", "nested_state_dict",
           "convert_nested_state_dict", "convert_authors_release", "diffusers_processor_order",
           "PLACEHOLDER_TOKEN", "FORMAT_VERSION", "NestedWeightsError", "cross_site_shapes",
           "achromatic", "LUMA_601"]

PLACEHOLDER_TOKEN = "sks"  # one BPE token of the CLIP vocabulary (id 48136)
FORMAT_VERSION = 1
LUMA_601 = (0.299, 0.587, 0.114)  # ITU-R BT.601 luminance weights of R, G, B
_META_KEY = "jattn_nested"


class NestedWeightsError(ValueError):
    """A Nested Attention weights file is missing, damaged or made for another model."""


@dataclasses.dataclass(frozen=True)
class NestedEncoderConfig:
    """Sizes of the subject encoder.

    Attributes:
      vision: the CLIP vision tower's config.
      resampler: the resampler's sizes (``embedding_dim`` = ``vision.hidden_size``,
        ``output_dim`` = the UNet's ``cross_attention_dim``, ``num_queries`` = R).
      feature_layer: index into the tower's ``hidden_states`` fed to the resampler (-2, the
        penultimate layer, as IP-Adapter-Plus and the Nested Attention release).
      placeholder_token: the vocabulary word that stands for s* (one BPE token).
      initializer_token: the word whose embedding initialised the placeholder's.
      resize_edge: the preprocessing's shorter side before the centre crop to
        ``vision.image_size`` (None = ``image_size``, CLIP's usual resize-then-crop of the
        whole image). Larger than ``image_size`` crops the centre: the bundled encoder uses
        128 for 64² crops, so a subject in the centre half of its image is seen at twice the
        resolution (:attr:`processing`).
      achromatic_view: also run the tower on the image's luminance (ITU-R 601, in-graph) and
        give the resampler both views' tokens (``2·(1 + P)`` of them). A tower trained with
        colour labels codes shape jointly with colour; its greyscale view reads shape alone,
        which carries over to (colour, shape) pairs it never saw. False for the authors'
        release (one view).
    """

    vision: CLIPVisionConfig
    resampler: ResamplerConfig
    feature_layer: int = -2
    placeholder_token: str = PLACEHOLDER_TOKEN
    initializer_token: str = "object"
    resize_edge: int | None = None
    achromatic_view: bool = False

    def __post_init__(self):
        if self.resampler.embedding_dim != self.vision.hidden_size:
            raise ValueError(f"NestedEncoderConfig: resampler.embedding_dim="
                             f"{self.resampler.embedding_dim} must equal vision.hidden_size="
                             f"{self.vision.hidden_size}.")
        if self.resize_edge is not None and self.resize_edge < self.vision.image_size:
            raise ValueError(f"NestedEncoderConfig: resize_edge={self.resize_edge} must be at "
                             f"least vision.image_size={self.vision.image_size} (or None).")
        n = self.vision.num_hidden_layers + 1
        if not -n <= self.feature_layer < n:
            raise ValueError(f"NestedEncoderConfig: feature_layer={self.feature_layer} is "
                             f"outside the {n} hidden states of the vision tower.")

    @property
    def num_tokens(self) -> int:
        """R, subject tokens per image."""
        return self.resampler.num_queries

    @property
    def context_dim(self) -> int:
        """D_ctx, the width of the subject tokens (= the UNet's cross_attention_dim)."""
        return self.resampler.output_dim

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def processing(self) -> CLIPImageProcessing:
        """CLIP preprocessing at the tower's size (resize the shorter side to
        :attr:`resize_edge`, centre crop ``image_size``²)."""
        s = self.vision.image_size
        return CLIPImageProcessing(shortest_edge=self.resize_edge or s, crop_height=s,
                                   crop_width=s)

    @classmethod
    def bundled(cls, context_dim: int = 96) -> "NestedEncoderConfig":
        """The size trained for the bundled model: 64² centre crops of the subject image
        resized to 128 (``resize_edge``), patch 8 (64 patches), width 128, 4 layers, run on
        the image and on its luminance (``achromatic_view``);
        resampler width 128, 2 blocks, 4 heads × 32, R = 8 tokens of width
        ``context_dim`` (96 = the bundled UNet's cross_attention_dim). ≈ 1.2 M parameters
        (≈ 5 MB float32 with the nested projections)."""
        vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, projection_dim=32,
                                  num_hidden_layers=4, num_attention_heads=4, image_size=64,
                                  patch_size=8, hidden_act="gelu")
        res = ResamplerConfig(dim=128, depth=2, dim_head=32, heads=4, num_queries=8,
                              embedding_dim=128, output_dim=context_dim, ff_mult=2)
        return cls(vision=vision, resampler=res, resize_edge=128, achromatic_view=True)

    @classmethod
    def sdxl_release(cls) -> "NestedEncoderConfig":
        """The authors' SDXL release as described (ViT-H/14, IP-Adapter-Plus SDXL resampler:
        dim 1280, depth 4, 20 heads × 64, 16 queries, output 2048). Unverified: the release
        could not be read here."""
        res = ResamplerConfig(dim=1280, depth=4, dim_head=64, heads=20, num_queries=16,
                              embedding_dim=1280, output_dim=2048, ff_mult=4)
        return cls(vision=CLIPVisionConfig.vit_h14(), resampler=res)

    def to_json(self) -> str:
        d = dict(format=FORMAT_VERSION, vision=self.vision.to_transformers(),
                 resampler=dataclasses.asdict(self.resampler), feature_layer=self.feature_layer,
                 placeholder_token=self.placeholder_token,
                 initializer_token=self.initializer_token)
        if self.resize_edge is not None:
            d["resize_edge"] = self.resize_edge
        if self.achromatic_view:
            d["achromatic_view"] = True
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "NestedEncoderConfig":
        """Inverse of :meth:`to_json`.

        Raises:
          NestedWeightsError: not JSON, another format version, or missing keys.
        """
        try:
            d = json.loads(text)
            if d.get("format") != FORMAT_VERSION:
                raise NestedWeightsError(f"format {d.get('format')!r}, this jattn reads "
                                         f"format {FORMAT_VERSION}")
            return cls(vision=CLIPVisionConfig.from_transformers(d["vision"]),
                       resampler=ResamplerConfig(**d["resampler"]),
                       feature_layer=int(d["feature_layer"]),
                       placeholder_token=str(d["placeholder_token"]),
                       initializer_token=str(d.get("initializer_token", "")),
                       resize_edge=(None if d.get("resize_edge") is None
                                    else int(d["resize_edge"])),
                       achromatic_view=bool(d.get("achromatic_view", False)))
        except NestedWeightsError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise NestedWeightsError(f"the {_META_KEY!r} metadata is not a Nested Attention "
                                     f"encoder configuration ({type(e).__name__}: {e})") from None


class SubjectEncoder(nn.Module):
    """Image -> R subject tokens: CLIP vision tower, hidden state ``feature_layer``,
    perceiver resampler. Params: ``{"image_encoder": …, "resampler": …}``.

    Call: ``pixel_values`` ``(U, S_img, S_img, 3)`` CLIP-normalised (channels-last) ->
    ``(U, R, D_ctx)``.
    """

    config: NestedEncoderConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:
        cfg = self.config
        tower = CLIPVisionModelWithProjection(cfg.vision, self.dtype, name="image_encoder")
        feats = tower(pixel_values, output_hidden_states=True)["hidden_states"][cfg.feature_layer]
        if cfg.achromatic_view:
            gray = achromatic(pixel_values, cfg.processing)
            feats = jnp.concatenate(
                [feats, tower(gray, output_hidden_states=True)["hidden_states"][
                    cfg.feature_layer]], axis=1)
        return Resampler(cfg.resampler, self.dtype, name="resampler")(feats)


def achromatic(pixel_values: Array, processing: CLIPImageProcessing) -> Array:
    """The luminance view of CLIP-normalised images ``(B, S, S, 3)``: un-normalise, ITU-R 601
    luminance in all three channels, normalise again (same shape and dtype)."""
    mean = jnp.asarray(processing.image_mean, pixel_values.dtype)
    std = jnp.asarray(processing.image_std, pixel_values.dtype)
    raw = pixel_values * std + mean
    lum = raw @ jnp.asarray(LUMA_601, pixel_values.dtype)
    return (lum[..., None] - mean) / std


@dataclasses.dataclass(frozen=True)
class NestedWeights:
    """A loaded encoder: its config, params (see the module docstring) and where from."""

    config: NestedEncoderConfig
    params: dict
    source: str = ""


def encode_subjects(params: Mapping, config: NestedEncoderConfig, pixel_values: Array, *,
                    dtype=jnp.float32) -> Array:
    """Subject tokens ``(U, R, D_ctx)`` of preprocessed images ``(U, S_img, S_img, 3)``
    (differentiable in ``params``; jit it)."""
    enc = {"image_encoder": params["image_encoder"], "resampler": params["resampler"]}
    return SubjectEncoder(config, dtype).apply({"params": enc}, pixel_values)


def nested_kv(params: Mapping, tokens: Array, sites: Sequence) -> tuple[dict, dict]:
    """Nested keys and values of subject tokens at every cross-attention site of ``params``.

    Args:
      params: the encoder params (``params["nested"][site_path]["to_k"|"to_v"]`` kernels
        ``(D_ctx, N·H)``).
      tokens: ``(U, R, D_ctx)`` subject tokens (:func:`encode_subjects`).
      sites: the model's attention sites (their N, H split the projections into heads).
    Returns:
      ``(keys, values)``: ``{site_path: (U, R, N, H)}`` each, in the tokens' dtype.
    Raises:
      NestedWeightsError: a site of the weights that the model lacks (or of another size).
    """
    by_path = {s.path: s for s in sites}
    keys, values = {}, {}
    for path, w in params["nested"].items():
        site = by_path.get(path)
        width = None if site is None else site.num_heads * site.head_dim
        if site is None or w["to_k"].shape != (tokens.shape[-1], width):
            raise NestedWeightsError(
                f"nested weights: site {path} with projection {tuple(w['to_k'].shape)} does not "
                f"exist in this model (tokens {tokens.shape[-1]} wide, site width {width}). "
                "Fix: use Nested Attention weights trained for this model.")
        u, r, _ = tokens.shape
        shape = (u, r, site.num_heads, site.head_dim)
        keys[path] = (tokens @ w["to_k"].astype(tokens.dtype)).reshape(shape)
        values[path] = (tokens @ w["to_v"].astype(tokens.dtype)).reshape(shape)
    return keys, values


# ------------------------------------------------------------------------------- init
def site_params_path(site_path: str) -> tuple[str, ...]:
    """``"down_blocks.0.attentions.0.transformer_blocks.0.attn2"`` -> the Flax params path
    ``("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2")``."""
    return tuple(re.sub(r"\.(\d+)", r"_\1", site_path).split("."))


def _cross_attention_params(unet_params: Mapping, sites: Sequence) -> dict[str, Mapping]:
    """``{site_path: the attention module's params}`` at every cross-attention site."""
    out = {}
    for s in sites:
        if s.kind != "cross":
            continue
        node = unet_params
        for k in site_params_path(s.path):
            node = node[k]
        out[s.path] = node
    return out


def cross_site_shapes(unet_params: Mapping, sites: Sequence) -> dict[str, tuple[int, int]]:
    """``{site_path: (D_ctx, N·H)}`` of the ``to_k`` kernel at every cross-attention site."""
    return {p: tuple(node["to_k"]["kernel"].shape)
            for p, node in _cross_attention_params(unet_params, sites).items()}


def init_from_unet(unet_params: Mapping, sites: Sequence) -> dict:
    """The ``nested`` params: ``{site_path: {"to_k", "to_v"}}`` copies of each
    cross-attention site's ``to_k``/``to_v`` kernels (float32)."""
    return {p: {"to_k": jnp.asarray(node["to_k"]["kernel"], jnp.float32),
                "to_v": jnp.asarray(node["to_v"]["kernel"], jnp.float32)}
            for p, node in _cross_attention_params(unet_params, sites).items()}


def init_nested_params(config: NestedEncoderConfig, unet_params: Mapping, sites: Sequence,
                       key: Array, *, text_params: Mapping | None = None,
                       tokenizer=None) -> dict:
    """Fresh params for training: random encoder (flax/IP-Adapter initialisers), nested
    projections from the UNet's ``to_k``/``to_v`` (:func:`init_from_unet`), the placeholder
    embedding from ``config.initializer_token``'s row of the text encoder (zeros when
    ``text_params``/``tokenizer`` are not given).

    Raises:
      ValueError: the resampler's output width differs from the UNet's context width;
        an initializer token that is not one BPE token.
    """
    shapes = cross_site_shapes(unet_params, sites)
    widths = {d for d, _ in shapes.values()}
    if widths != {config.context_dim}:
        raise ValueError(f"init_nested_params: resampler.output_dim={config.context_dim} but "
                         f"the UNet's cross-attention width is {sorted(widths)}; build the "
                         "config with NestedEncoderConfig.bundled(context_dim=…).")
    k1, k2 = jax.random.split(key)
    params = {"image_encoder": init_clip_vision_params(config.vision, k1),
              "resampler": init_resampler_params(config.resampler, k2),
              "nested": init_from_unet(unet_params, sites)}
    if text_params is not None and tokenizer is not None:
        table = text_params["text_model"]["embeddings"]["token_embedding"]["embedding"]
        ids = tokenizer(config.initializer_token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"init_nested_params: initializer_token "
                             f"{config.initializer_token!r} is {len(ids)} BPE tokens; pick a "
                             "word that is one token.")
        emb = jnp.asarray(table[ids[0]], jnp.float32)
    else:
        d = 0 if text_params is None else (
            text_params["text_model"]["embeddings"]["token_embedding"]["embedding"].shape[1])
        emb = jnp.zeros((d,), jnp.float32)
    params["placeholder"] = {"text_encoder": emb}
    return params


# ------------------------------------------------------------------------------- I/O
def nested_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """Params -> the flat safetensors layout of the module docstring (float32 numpy)."""
    sd = {f"image_encoder.{k}": v
          for k, v in clip_vision_state_dict(params["image_encoder"]).items()}
    sd.update(resampler_state_dict(params["resampler"], layout="ip_adapter",
                                   prefix="image_proj."))
    for path, w in params["nested"].items():
        sd[f"nested.{path}.to_k_nest.weight"] = np.asarray(w["to_k"], np.float32).T.copy()
        sd[f"nested.{path}.to_v_nest.weight"] = np.asarray(w["to_v"], np.float32).T.copy()
    for name, emb in params.get("placeholder", {}).items():
        sd[f"placeholder.{name}"] = np.asarray(emb, np.float32)
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in sd.items()}


def convert_nested_state_dict(state_dict: Mapping[str, Any], config: NestedEncoderConfig
                              ) -> dict:
    """The flat layout (:func:`nested_state_dict`) -> params.

    Raises:
      NestedWeightsError / CheckpointMismatchError: missing or misshapen keys (named).
    """
    enc = {k[len("image_encoder."):]: v for k, v in state_dict.items()
           if k.startswith("image_encoder.")}
    params = {"image_encoder": convert_clip_vision_state_dict(enc, config.vision),
              "resampler": convert_resampler_state_dict(
                  {k: v for k, v in state_dict.items() if k.startswith("image_proj.")},
                  config.resampler, layout="ip_adapter", prefix="image_proj.")}
    nested: dict[str, dict] = {}
    pat = re.compile(r"nested\.(.+)\.to_([kv])_nest\.weight")
    for k, v in state_dict.items():
        m = pat.fullmatch(k)
        if m:
            nested.setdefault(m.group(1), {})[f"to_{m.group(2)}"] = jnp.asarray(
                np.asarray(v, np.float32).T)
    bad = [p for p, w in nested.items() if set(w) != {"to_k", "to_v"}]
    if not nested or bad:
        what = ("no nested.*.to_k_nest.weight keys" if not nested else
                "sites without both to_k_nest and to_v_nest: " + ", ".join(bad))
        raise NestedWeightsError(f"nested weights: {what}.")
    params["nested"] = nested
    params["placeholder"] = {k[len("placeholder."):]: jnp.asarray(np.asarray(v, np.float32))
                             for k, v in state_dict.items() if k.startswith("placeholder.")}
    known = ("image_encoder.", "image_proj.", "nested.", "placeholder.")
    unexpected = [k for k in state_dict if not k.startswith(known)]
    if unexpected:
        raise NestedWeightsError(f"nested weights: unexpected keys {unexpected[:5]} (a file of "
                                 "another kind?)")
    return params


def save_nested_weights(path: str | os.PathLike, params: Mapping, config: NestedEncoderConfig,
                        ) -> Path:
    """Write ``params`` to a safetensors file (layout of the module docstring), the config
    as metadata ``jattn_nested``."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(nested_state_dict(params), str(path), metadata={_META_KEY: config.to_json()})
    return path


def load_nested_weights(path: str | os.PathLike) -> NestedWeights:
    """Read a Nested Attention weights file written by :func:`save_nested_weights`.

    Raises:
      FileNotFoundError: no such file (the message says how to train or pass ``--weights``).
      NestedWeightsError: not a safetensors file, no ``jattn_nested`` metadata, keys that do
        not match the config, non-finite values.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Nested Attention weights {str(path)!r}: no such file. Train them with "
            "`python scripts/train_personalize.py` (see configs/personalize_world.py) or give a "
            "trained file with --weights PATH (weights=PATH in the API).")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for damaged files
        raise NestedWeightsError(f"Nested Attention weights {str(path)!r}: not a readable "
                                 f"safetensors file ({type(e).__name__}: {e}).") from None
    if _META_KEY not in meta:
        raise NestedWeightsError(f"Nested Attention weights {str(path)!r}: no {_META_KEY!r} "
                                 "metadata; not a file written by jattn's "
                                 "save_nested_weights (convert other layouts with "
                                 "jattn.models.nested.convert_authors_release).")
    config = NestedEncoderConfig.from_json(meta[_META_KEY])
    bad = [k for k, v in sd.items() if not np.all(np.isfinite(v))]
    if bad:
        raise NestedWeightsError(f"Nested Attention weights {str(path)!r}: non-finite values "
                                 f"in {bad[:3]}.")
    try:
        params = convert_nested_state_dict(sd, config)
    except ValueError as e:
        raise NestedWeightsError(f"Nested Attention weights {str(path)!r}: {e}") from None
    return NestedWeights(config=config, params=params, source=str(path))


# ------------------------------------------------------------------- authors' release
def diffusers_processor_order(sites: Sequence) -> list[str]:
    """Site paths in diffusers' ``unet.attn_processors`` order (down blocks, up blocks, then
    the mid block; attn1 before attn2 in each transformer block), the numbering of
    IP-Adapter-style adapter files (``ip_adapter.{i}.to_k_ip.weight``, i over all
    attention layers)."""
    rank = {"down": 0, "up": 1, "mid": 2}
    indexed = sorted(enumerate(sites), key=lambda t: (rank.get(t[1].block, 3), t[0]))
    return [s.path for _, s in indexed]


def convert_authors_release(image_encoder_state_dict: Mapping[str, Any],
                            image_encoder_config: Mapping[str, Any],
                            adapter_state_dict: Mapping[str, Any], sites: Sequence, *,
                            placeholder_embeddings: Mapping[str, Any] | None = None,
                            resampler_layout: str = "ip_adapter", dim_head: int = 64,
                            feature_layer: int = -2, placeholder_token: str = PLACEHOLDER_TOKEN
                            ) -> NestedWeights:
    """Convert an IP-Adapter-style Nested Attention release into jattn's params.

    The authors' file layout (``orpatashnik/NestedAttentionEncoder``) could not be read here;
    this reads the layout of the IP-Adapter family that the release is built on:

    * ``image_encoder_state_dict`` + ``image_encoder_config``: transformers
      ``CLIPVisionModelWithProjection`` (``image_encoder/model.safetensors``, config.json);
    * ``adapter_state_dict``: ``image_proj.*`` (the resampler, ``resampler_layout``
      ``"ip_adapter"`` or ``"diffusers"``) and the nested projections, either keyed by site
      path (``nested.<path>.to_k_nest.weight``) or IP-Adapter-numbered
      (``ip_adapter.{i}.to_k_nest.weight`` / ``to_k_ip``, i = the index of the layer in
      :func:`diffusers_processor_order`; torch ``(out, in)``);
    * ``placeholder_embeddings``: ``{"text_encoder": (D,), "text_encoder_2": (D2,)}`` (the
      learned embedding of the added token, if the release has one).

    Raises:
      CheckpointMismatchError / NestedWeightsError: keys missing, unexpected or misshapen
        (named).
    """
    vis = CLIPVisionConfig.from_transformers(image_encoder_config)
    sd_proj = {k: v for k, v in adapter_state_dict.items() if k.startswith("image_proj.")}
    res_cfg = ResamplerConfig.from_state_dict(
        {k[len("image_proj."):]: v for k, v in sd_proj.items()}, dim_head=dim_head)
    config = NestedEncoderConfig(vision=vis, resampler=res_cfg, feature_layer=feature_layer,
                                 placeholder_token=placeholder_token, initializer_token="")
    params = {"image_encoder": convert_clip_vision_state_dict(image_encoder_state_dict, vis),
              "resampler": convert_resampler_state_dict(sd_proj, res_cfg,
                                                        layout=resampler_layout,
                                                        prefix="image_proj.")}
    order = diffusers_processor_order(sites)
    cross = {s.path for s in sites if s.kind == "cross"}
    nested: dict[str, dict] = {}
    pat = re.compile(r"(?:nested|ip_adapter)\.(.+)\.to_([kv])_(?:nest|ip)\.weight")
    for k, v in adapter_state_dict.items():
        m = pat.fullmatch(k)
        if not m:
            continue
        where = m.group(1)
        path = order[int(where)] if where.isdigit() and int(where) < len(order) else where
        if path not in cross:
            raise NestedWeightsError(f"authors' release: {k} names {path!r}, not a "
                                     "cross-attention site of this UNet (SDXL weights need the "
                                     "SDXL UNet).")
        nested.setdefault(path, {})[f"to_{m.group(2)}"] = jnp.asarray(
            np.asarray(v, np.float32).T)
    missing = sorted(cross - set(nested))
    if missing:
        raise NestedWeightsError(f"authors' release: no nested projections for {len(missing)} "
                                 f"cross-attention sites, e.g. {missing[:2]}.")
    params["nested"] = nested
    params["placeholder"] = {k: jnp.asarray(np.asarray(v, np.float32))
                             for k, v in (placeholder_embeddings or {}).items()}
    return NestedWeights(config=config, params=params, source="authors' release (converted)")
