"""CLIP vision encoder (Flax linen) with projection, and CLIP image preprocessing.

The image tower of subject encoders (IP-Adapter-Plus, Nested Attention): a ViT whose
penultimate hidden state ``(B, 1 + P, D)`` feeds a perceiver resampler
(:mod:`jattn.models.resampler`) and whose projected CLS token ``(B, E)`` is the global
image embedding.

Architecture and parameter names follow transformers' ``CLIPVisionModelWithProjection`` so
that checkpoints convert one to one: ``vision_model/embeddings/{class_embedding,
patch_embedding, position_embedding}``, ``vision_model/pre_layrnorm`` (transformers'
spelling), ``vision_model/encoder/layers_0/...`` (the encoder layer of
:mod:`jattn.models.clip_text`, without a mask), ``vision_model/post_layernorm`` (applied to
the CLS token only) and ``visual_projection`` (no bias). Input images are channels-last
``(B, H, W, C)`` (Flax convention; transformers takes ``(B, C, H, W)``).

Legend: B batch, H/W image height/width, C channels, p patch size, P = (H/p)·(W/p) patches,
D hidden size, E projection size, N heads.

Sizes: OpenAI CLIP ViT-L/14 (D 1024, 24 layers, quick_gelu, E 768); the OpenCLIP
ViT-H/14 used by IP-Adapter-Plus and by the Nested Attention release
(:meth:`CLIPVisionConfig.vit_h14`: D 1280, 32 layers, 16 heads, gelu, E 1024, 224²).

References: Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision" (ICML 2021); transformers ``models/clip/modeling_clip.py`` and
``image_processing_pil_clip.py``; Ye et al., "IP-Adapter" (2023); Patashnik et al., "Nested
Attention: Semantic-aware Attention Values for Concept Personalization" (SIGGRAPH 2025).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jattn.io.convert import params_to_state_dict, state_dict_to_params
from jattn.models.clip_text import _ACTIVATIONS, _Encoder

Array = jax.Array

__all__ = ["CLIPVisionConfig", "CLIPVisionModelWithProjection", "CLIPImageProcessing",
           "convert_clip_vision_state_dict", "clip_vision_state_dict",
           "init_clip_vision_params", "preprocess_clip_image", "preprocess_clip_images",
           "CLIP_MEAN", "CLIP_STD"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Hyper-parameters of the CLIP vision encoder (field names as in transformers' config.json).

    Defaults are transformers' ``CLIPVisionConfig`` defaults (ViT-B/32).

    Attributes:
      hidden_size: D.
      intermediate_size: MLP hidden width.
      projection_dim: E, width of ``image_embeds``.
      num_hidden_layers: transformer layers.
      num_attention_heads: N (head dim D / N).
      num_channels: C of the input image (3).
      image_size: H = W the model was built for (position embeddings are not interpolated).
      patch_size: p; ``image_size`` must be a multiple of it.
      hidden_act: ``"quick_gelu"`` (OpenAI CLIP) or ``"gelu"`` (OpenCLIP ViT-H/14).
      layer_norm_eps: LayerNorm epsilon.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"CLIPVisionConfig: hidden_act={self.hidden_act!r} is not supported "
                             f"(supported: {', '.join(_ACTIVATIONS)}).")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIPVisionConfig: hidden_size={self.hidden_size} is not divisible "
                             f"by num_attention_heads={self.num_attention_heads}.")
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIPVisionConfig: image_size={self.image_size} is not a multiple "
                             f"of patch_size={self.patch_size}.")

    @property
    def num_heads(self) -> int:
        return self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        """P = (image_size / patch_size)²."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """1 + P tokens: the CLS token, then the patches in row-major order."""
        return self.num_patches + 1

    @classmethod
    def vit_h14(cls) -> "CLIPVisionConfig":
        """OpenCLIP ViT-H/14 (laion2B), the image encoder of IP-Adapter-Plus and Nested Attention
        (``h94/IP-Adapter`` ``models/image_encoder/config.json``)."""
        return cls(hidden_size=1280, intermediate_size=5120, projection_dim=1024,
                   num_hidden_layers=32, num_attention_heads=16, image_size=224, patch_size=14,
                   hidden_act="gelu", layer_norm_eps=1e-5)

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPVisionConfig":
        """Build from a transformers ``CLIPVisionConfig`` dict (``image_encoder/config.json``).

        A full ``CLIPConfig`` dict is accepted too (its ``vision_config`` is used). Keys that do
        not change the forward pass are ignored. ``hidden_size``, ``intermediate_size``,
        ``num_hidden_layers``, ``num_attention_heads``, ``image_size`` and ``patch_size`` are
        required; other missing or null keys take the defaults. Every value is type-checked.

        Raises:
          jattn.io.checkpoint.CheckpointConfigError (a ValueError): a value of the wrong type or
            out of range, or a required key missing (names the key and what is expected).
          ValueError: unsupported ``hidden_act`` or inconsistent sizes.
        """
        from jattn.io import checkpoint as ck

        o = "CLIPVisionConfig"
        if not isinstance(config, Mapping):
            raise ck.CheckpointConfigError(
                f"{o}: expected a dict (the object of image_encoder/config.json), got "
                f"{type(config).__name__}.")
        if isinstance(config.get("vision_config"), Mapping):
            config = config["vision_config"]
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in dict(config).items() if k in names and v is not None}
        ck.require_keys(o, kwargs, ("hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "image_size", "patch_size"),
                        " (every transformers CLIPVisionConfig file has them)")
        for key in ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                    "num_attention_heads", "num_channels", "image_size", "patch_size"):
            if key in kwargs:
                kwargs[key] = ck.config_int(o, key, kwargs[key], minimum=1)
        if "hidden_act" in kwargs:
            kwargs["hidden_act"] = ck.config_str(o, "hidden_act", kwargs["hidden_act"])
        if "layer_norm_eps" in kwargs:
            kwargs["layer_norm_eps"] = ck.config_float(o, "layer_norm_eps",
                                                       kwargs["layer_norm_eps"], positive=True)
        return cls(**kwargs)

    def to_transformers(self) -> dict[str, Any]:
        """The transformers ``config.json`` dict (``CLIPVisionModelWithProjection``)."""
        d = dataclasses.asdict(self)
        d.update(architectures=["CLIPVisionModelWithProjection"],
                 model_type="clip_vision_model", attention_dropout=0.0)
        return d


class _VisionEmbeddings(nn.Module):
    """``(B, H, W, C)`` pixels -> ``(B, 1 + P, D)``: [CLS; patches] + position embeddings."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:
        cfg = self.config
        b = pixel_values.shape[0]
        cls_emb = self.param("class_embedding", nn.initializers.normal(1.0), (cfg.hidden_size,))
        p = cfg.patch_size
        patches = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID",
                          use_bias=False, dtype=self.dtype,
                          name="patch_embedding")(pixel_values.astype(self.dtype))  # (B, h, w, D)
        patches = patches.reshape(b, -1, cfg.hidden_size)  # (B, P, D), row-major as torch
        cls_tok = jnp.broadcast_to(cls_emb.astype(self.dtype), (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls_tok, patches], axis=1)
        pos = nn.Embed(cfg.num_positions, cfg.hidden_size, dtype=self.dtype,
                       name="position_embedding")(jnp.arange(cfg.num_positions)[None])
        return x + pos


class _VisionTransformer(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: Array, output_hidden_states: bool) -> dict[str, Any]:
        cfg = self.config
        eps = cfg.layer_norm_eps
        x = _VisionEmbeddings(cfg, self.dtype, name="embeddings")(pixel_values)
        x = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="pre_layrnorm")(x)
        # the text encoder's layers, duck-typed on the config (no mask: full attention)
        states = _Encoder(cfg, self.dtype, name="encoder")(x, None)
        last = states[-1]
        pooled = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="post_layernorm")(last[:, 0])
        out = {"last_hidden_state": last, "pooler_output": pooled}
        if output_hidden_states:
            out["hidden_states"] = tuple(states)
        return out


class CLIPVisionModelWithProjection(nn.Module):
    """CLIP vision encoder + projection; parameters as in transformers' checkpoints.

    Attributes:
      config: :class:`CLIPVisionConfig`.
      dtype: computation dtype (parameters keep their own dtype).
    """

    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: Array, output_hidden_states: bool = False
                 ) -> dict[str, Any]:
        """Encode preprocessed images (see :func:`preprocess_clip_images`).

        Args:
          pixel_values: ``(B, H, W, C)`` float, normalised with CLIP mean/std, H = W =
            ``config.image_size``, C = ``config.num_channels``.
          output_hidden_states: also return the per-layer states (IP-Adapter-Plus and Nested
            Attention use ``hidden_states[-2]``, the penultimate layer's output).
        Returns:
          dict with ``last_hidden_state`` ``(B, 1 + P, D)`` (the last layer's output; CLIP
          vision has no final LayerNorm on the sequence), ``pooler_output`` ``(B, D)``
          (``post_layernorm`` of the CLS token), ``image_embeds`` ``(B, E)``
          (``visual_projection`` of the pooled output), and with ``output_hidden_states`` a
          tuple ``hidden_states`` of ``num_hidden_layers + 1`` arrays ``(B, 1 + P, D)``: the
          embeddings after ``pre_layrnorm``, then each layer's output. Arrays in ``dtype``.
        Raises:
          ValueError: ``pixel_values`` not 4-D, or of the wrong size or channel count (the
            message gives the expected shape; preprocess with :func:`preprocess_clip_images`).
        """
        cfg = self.config
        want = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(
                f"CLIPVisionModelWithProjection: pixel_values must be (B, {want[0]}, {want[1]}, "
                f"{want[2]}) channels-last, got {tuple(pixel_values.shape)}; preprocess images "
                "with jattn.models.clip_vision.preprocess_clip_images.")
        out = _VisionTransformer(cfg, self.dtype, name="vision_model")(
            pixel_values, output_hidden_states)
        out["image_embeds"] = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype,
                                       name="visual_projection")(out["pooler_output"])
        return out


def _dummy_pixels(config: CLIPVisionConfig):
    return jnp.zeros((1, config.image_size, config.image_size, config.num_channels), jnp.float32)


def _abstract_params(config: CLIPVisionConfig):
    model = CLIPVisionModelWithProjection(config)
    return jax.eval_shape(model.init, jax.random.key(0), _dummy_pixels(config))["params"]


def init_clip_vision_params(config: CLIPVisionConfig, key: Array) -> dict:
    """Randomly initialised parameters (flax default initialisers), e.g. for training."""
    init = jax.jit(CLIPVisionModelWithProjection(config).init)
    return init(key, _dummy_pixels(config))["params"]


def _rename_clip_vision_key(key: str) -> str | None:
    if key.endswith("embeddings.position_ids"):
        return None  # a buffer (arange), not a parameter
    return key


def convert_clip_vision_state_dict(state_dict: Mapping[str, Any], config: CLIPVisionConfig,
                                   dtype=None) -> dict:
    """transformers ``CLIPVisionModelWithProjection`` state dict -> params.

    Keys: ``vision_model.embeddings.class_embedding``, ``vision_model.pre_layrnorm.weight``,
    ``vision_model.encoder.layers.{i}.…``, ``vision_model.post_layernorm.…``,
    ``visual_projection.weight`` (the layout of every transformers version, and of
    ``h94/IP-Adapter`` ``image_encoder/model.safetensors``); the ``position_ids`` buffer is
    dropped.

    Args:
      state_dict: ``{key: array}`` (numpy, or anything ``np.asarray`` reads).
      config: the encoder's config.
      dtype: cast every parameter to this dtype (default float32).
    Returns:
      the params tree (``model.apply({"params": params}, ...)``).
    Raises:
      CheckpointMismatchError: naming every missing, unexpected and misshapen key (a
        ``CLIPVisionModel`` checkpoint lacks ``visual_projection.weight``; a full ``CLIPModel``
        brings ``text_model.*`` keys).
    """
    return state_dict_to_params(state_dict, _abstract_params(config), model_name="image_encoder",
                                rename=_rename_clip_vision_key, dtype=dtype)


def clip_vision_state_dict(params: Mapping, *, dtype=None) -> dict[str, np.ndarray]:
    """Params -> transformers ``CLIPVisionModelWithProjection`` state dict (numpy), loadable
    with ``load_state_dict(strict=True)`` and ``from_pretrained``."""
    return params_to_state_dict(params, dtype=dtype)


# ------------------------------------------------------------------------- preprocessing
@dataclasses.dataclass(frozen=True)
class CLIPImageProcessing:
    """CLIP image preprocessing, as transformers' ``CLIPImageProcessor`` (PIL backend).

    Steps: convert to RGB (transparency composited on white), resize so that the shorter side
    is ``shortest_edge`` (longer side ``int(shortest_edge · long / short)``) with PIL
    ``resample`` (3 = bicubic), center crop ``crop_height × crop_width`` (zero padding if the
    image is smaller), scale by ``rescale_factor``, normalise ``(x - image_mean) / image_std``.

    Attributes:
      shortest_edge, crop_height, crop_width: sizes in pixels (224 for CLIP ViT-L/14, ViT-H/14).
      image_mean, image_std: per-channel statistics (OpenAI CLIP's by default).
      resample: PIL resampling filter id (3 = BICUBIC).
      rescale_factor: 1/255.
    """

    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    resample: int = 3
    rescale_factor: float = 1 / 255

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPImageProcessing":
        """From a ``preprocessor_config.json`` dict (``size``/``crop_size`` as dicts or ints).

        Raises:
          ValueError: a ``do_*`` step switched off (not supported), or sizes not understood
            (names the key).
        """
        for step in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if config.get(step, True) is False:
                raise ValueError(f"CLIPImageProcessing: {step}=false is not supported; the CLIP "
                                 "encoders expect resized, cropped, normalised images.")
        kw: dict[str, Any] = {}
        size = config.get("size")
        if isinstance(size, Mapping):
            if "shortest_edge" not in size:
                raise ValueError(f"CLIPImageProcessing: size={dict(size)} has no shortest_edge.")
            kw["shortest_edge"] = int(size["shortest_edge"])
        elif size is not None:
            kw["shortest_edge"] = int(size)
        crop = config.get("crop_size")
        if isinstance(crop, Mapping):
            kw["crop_height"], kw["crop_width"] = int(crop["height"]), int(crop["width"])
        elif crop is not None:
            kw["crop_height"] = kw["crop_width"] = int(crop)
        for key in ("image_mean", "image_std"):
            if config.get(key) is not None:
                kw[key] = tuple(float(v) for v in config[key])
        if config.get("resample") is not None:
            kw["resample"] = int(config["resample"])
        if config.get("rescale_factor") is not None:
            kw["rescale_factor"] = float(config["rescale_factor"])
        return cls(**kw)


def _to_rgb_pil(image):
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as f:
                f.load()
                image = f.copy()
        except (OSError, ValueError) as e:
            raise ValueError(f"preprocess_clip_image: image {os.fspath(image)!r} cannot be read "
                             f"as an image ({e}); pass a PNG/JPEG path, a PIL image or a uint8 "
                             "(H, W, 3) array.") from None
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3
                                                          and arr.shape[-1] in (1, 3, 4))):
            raise ValueError(f"preprocess_clip_image: an array image must be uint8 (H, W), "
                             f"(H, W, 1), (H, W, 3) or (H, W, 4); got {arr.dtype} {arr.shape}.")
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        image = Image.fromarray(arr)
    elif not isinstance(image, Image.Image):
        raise ValueError(f"preprocess_clip_image: image must be a path, a PIL image or a uint8 "
                         f"array, got {type(image).__name__}.")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_clip_image(image, processing: CLIPImageProcessing | None = None) -> np.ndarray:
    """One image -> ``(crop_height, crop_width, 3)`` float32, channels-last.

    Equal to transformers' ``CLIPImageProcessor`` (PIL backend) output transposed to HWC
    (bit-identical in the tests on RGB/RGBA/grey images of several sizes).

    Args:
      image: a path, a ``PIL.Image`` or a uint8 array ``(H, W)``, ``(H, W, 1|3|4)``.
      processing: :class:`CLIPImageProcessing` (default: CLIP 224).
    Raises:
      ValueError: unreadable file or unsupported array (names it and the accepted forms).
    """
    from PIL import Image

    pp = processing or CLIPImageProcessing()
    img = _to_rgb_pil(image)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = pp.shortest_edge, int(pp.shortest_edge * long / short)
    new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
    img = img.resize((new_w, new_h), resample=Image.Resampling(pp.resample))
    arr = np.asarray(img)  # (H, W, 3) uint8
    ch, cw = pp.crop_height, pp.crop_width
    top, left = (new_h - ch) // 2, (new_w - cw) // 2
    if top < 0 or left < 0:  # smaller than the crop: zero padding, as transformers
        ph, pw = max(ch, new_h), max(cw, new_w)
        tp, lp = -(-(ph - new_h) // 2), -(-(pw - new_w) // 2)
        padded = np.zeros((ph, pw, 3), arr.dtype)
        padded[tp:tp + new_h, lp:lp + new_w] = arr
        arr, top, left = padded, top + tp, left + lp
    arr = arr[max(top, 0):top + ch, max(left, 0):left + cw]
    x = (arr.astype(np.float64) * pp.rescale_factor).astype(np.float32)
    mean = np.asarray(pp.image_mean, np.float32)
    std = np.asarray(pp.image_std, np.float32)
    return (x - mean) / std


def preprocess_clip_images(images: Sequence, processing: CLIPImageProcessing | None = None
                           ) -> np.ndarray:
    """Several images -> ``(B, crop_height, crop_width, 3)`` float32 (see
    :func:`preprocess_clip_image`)."""
    if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence):
        images = [images]
    return np.stack([preprocess_clip_image(im, processing) for im in images])
