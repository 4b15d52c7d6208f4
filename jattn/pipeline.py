"""The text-to-image pipeline: params + configs + tokenizer + scheduler config.

``jattn.load(path_or_hub_id)`` returns a :class:`Pipeline`; ``Pipeline.generate`` runs text
encoding, the compiled sampler loop and VAE decoding, each under ``jax.jit``. Compiled
programs are cached per static configuration (image size, steps, scheduler kind, CFG on/off,
batch size, policy structure), so new prompts, seeds, guidance scales or policy arrays
never recompile.

Two model families, one pipeline (Stable Diffusion 1.x/2.x and SDXL, Podell et al. 2023),
told apart by ``model_index.json`` and loaded from one component table each
(:data:`SD_COMPONENTS`, :data:`SDXL_COMPONENTS`). The UNet's conditioning, carried through
the one sampler loop as a pytree:

* SD1/SD2: the prompt embeddings, a bare array ``(B, 77, D)``;
* SDXL: ``{"context": (B, 77, D1 + D2), "text_embeds": (B, P), "time_ids": (B, 6)}`` —
  both encoders' penultimate states concatenated, ``text_encoder_2``'s pooled projection,
  and the micro-conditioning (original size, crop top-left, target size; sec. 2.2),
  diffusers' ``prompt_embeds``, ``added_cond_kwargs``. :meth:`Pipeline.encode_prompts`
  gives the text part (``{"context", "text_embeds"}``), :meth:`Pipeline.time_ids` the
  rest. Reference: diffusers ``pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jattn.io import checkpoint as ckpt
from jattn.io import checks, interrupt
from jattn.models import clip_text as clip_lib
from jattn.models import sdxl_text
from jattn.models import unet as unet_lib
from jattn.models import vae as vae_lib
from jattn.models.attention import AttentionSite
from jattn.policy.core import Policy
from jattn.sampling import sampler as sampler_lib
from jattn.sampling import schedulers as sch

__all__ = ["Pipeline", "GenerateOutput", "load", "bundled_model_path", "DTYPES",
           "SD_COMPONENTS", "SDXL_COMPONENTS", "SDXL_ONLY_ARGS"]

SCHEDULERS = tuple(sch.SCHEDULER_NAMES)  # kinds + presets ("euler-ancestral", "dpm++2m-karras")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
          "fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def _tokenizer(folder: Path):
    from jattn.io.tokenizer import load_tokenizer

    return load_tokenizer(folder)


# The components of a checkpoint, one row each (folder, config type, converter, required):
# jattn.load reads a folder through one of these tables; a new component (ControlNet,
# LoRA, an image encoder) is one more row.
SD_COMPONENTS: tuple[ckpt.Component, ...] = (
    ckpt.Component("unet", "model", unet_lib.UNetConfig.from_diffusers,
                   unet_lib.convert_unet_state_dict, what="the denoising UNet"),
    ckpt.Component("vae", "model", vae_lib.VAEConfig.from_diffusers,
                   vae_lib.convert_vae_state_dict, what="the autoencoder"),
    ckpt.Component("text_encoder", "model", clip_lib.CLIPTextConfig.from_transformers,
                   clip_lib.convert_clip_text_state_dict, what="the CLIP text encoder"),
    ckpt.Component("scheduler", "config", sch.SchedulerConfig.from_diffusers,
                   what="the noise schedule"),
    ckpt.Component("tokenizer", "tokenizer", tokenizer=_tokenizer,
                   what="the tokenizer of text_encoder"),
)
SDXL_COMPONENTS: tuple[ckpt.Component, ...] = SD_COMPONENTS + (
    ckpt.Component("text_encoder_2", "model", clip_lib.CLIPTextConfig.from_transformers,
                   functools.partial(clip_lib.convert_clip_text_state_dict,
                                     with_projection=True),
                   what="SDXL's second text encoder, a CLIPTextModelWithProjection"),
    ckpt.Component("tokenizer_2", "tokenizer", tokenizer=_tokenizer,
                   what="the tokenizer of text_encoder_2"),
)
# generate() arguments that only SDXL has (a clear error on SD1/SD2)
SDXL_ONLY_ARGS = ("prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left",
                  "target_size", "negative_original_size", "negative_crops_coords_top_left",
                  "negative_target_size")


def bundled_model_path() -> Path:
    """Folder of the bundled model (diffusers layout, shipped inside the package)."""
    return Path(__file__).parent / "assets" / "bundled"


@dataclasses.dataclass
class GenerateOutput:
    """Result of :meth:`Pipeline.generate`.

    Attributes:
      images: uint8 ``(B, height, width, 3)`` (NHWC), like diffusers' ``output_type="np"``
        after ``numpy_to_pil`` rounding.
      latents: float32 ``(B, C, h, w)`` final latents (NCHW, diffusers' convention).
      aux: what the policy aggregated in-graph (empty dict without a policy).
    """

    images: np.ndarray
    latents: np.ndarray
    aux: Any


def _as_dtype(dtype) -> Any:
    if isinstance(dtype, str):
        try:
            return DTYPES[dtype]
        except KeyError:
            raise ValueError(f"dtype={dtype!r}: choose one of float32, bfloat16, float16") from None
    return dtype


def _cast_tree(tree, dtype):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), tree)


@dataclasses.dataclass
class Pipeline:
    """A loaded Stable Diffusion (1.x/2.x) or SDXL model.

    Attributes:
      unet_config, vae_config, text_config, scheduler_config: typed configs.
      tokenizer: a transformers ``CLIPTokenizer``.
      params: ``{"unet": …, "vae": …, "text_encoder": …}`` Flax param trees (SDXL: and
        ``"text_encoder_2"``).
      dtype: computation and parameter dtype (float32, bfloat16 or float16).
      source: where it was loaded from.
      text_config_2, tokenizer_2: SDXL's second text encoder (with projection) and its
        tokenizer; None for SD1/SD2 (:attr:`is_sdxl`).
      force_zeros_for_empty_prompt: SDXL (``model_index.json``, diffusers' default True):
        without a negative prompt the negative conditioning is zeros, not the encoded "".
    """

    unet_config: unet_lib.UNetConfig
    vae_config: vae_lib.VAEConfig
    text_config: clip_lib.CLIPTextConfig
    scheduler_config: sch.SchedulerConfig
    tokenizer: Any
    params: dict
    dtype: Any = jnp.float32
    source: str = ""
    text_config_2: clip_lib.CLIPTextConfig | None = None
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)
    trace_counts: dict = dataclasses.field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ modules
    @property
    def unet(self) -> unet_lib.UNet2DConditionModel:
        return unet_lib.UNet2DConditionModel(self.unet_config, dtype=self.dtype)

    @property
    def text_encoder(self) -> clip_lib.CLIPTextModel:
        return clip_lib.CLIPTextModel(self.text_config, dtype=self.dtype)

    @property
    def is_sdxl(self) -> bool:
        """Two text encoders and the UNet's added text/time conditioning (SDXL)."""
        return self.text_config_2 is not None

    @property
    def text_encoder_2(self) -> clip_lib.CLIPTextModelWithProjection:
        return clip_lib.CLIPTextModelWithProjection(self.text_config_2, dtype=self.dtype)

    @property
    def vae_dtype(self) -> Any:
        """The VAE's computation dtype: float32 on SDXL when ``vae/config.json`` asks for
        ``force_upcast`` (diffusers' SDXL pipelines), else :attr:`dtype`."""
        if self.is_sdxl and self.vae_config.force_upcast:
            return jnp.float32
        return self.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return self.unet_config.sample_size * self.vae_scale_factor

    def _count(self, name: str) -> None:
        self.trace_counts[name] = self.trace_counts.get(name, 0) + 1

    # ------------------------------------------------------------------ text
    def tokenize(self, prompts: list[str], name: str = "prompt") -> np.ndarray:
        """Token ids ``(B, 77)`` int32; raises ValueError for prompts over 77 tokens."""
        from jattn.io.tokenizer import tokenize

        return tokenize(self.tokenizer, prompts, max_length=self.text_config.max_position_embeddings,
                        name=name)

    def _text_fn(self, clip_skip: int | None = None):
        key = "text" if clip_skip is None else f"text-skip{clip_skip}"
        if key not in self._cache:
            if self.is_sdxl:
                cfg, cfg_2, dtype = self.text_config, self.text_config_2, self.dtype

                def encode(params, ids, ids_2):
                    self._count("text")
                    ctx, pooled = sdxl_text.sdxl_text_embeddings(
                        params, ids, ids_2, config=cfg, config_2=cfg_2, clip_skip=clip_skip,
                        dtype=dtype)
                    return {"context": ctx, "text_embeds": pooled}
            else:
                module = self.text_encoder
                eps = self.text_config.layer_norm_eps

                def encode(params, ids):
                    self._count("text")
                    out = module.apply({"params": params}, ids,
                                       output_hidden_states=clip_skip is not None)
                    if clip_skip is None:
                        return out["last_hidden_state"]
                    # diffusers' encode_prompt: hidden_states[-(clip_skip + 1)] through the
                    # final layer norm
                    hidden = out["hidden_states"][-(clip_skip + 1)]
                    norm = params["text_model"]["final_layer_norm"]
                    return nn.LayerNorm(epsilon=eps, dtype=module.dtype).apply(
                        {"params": norm}, hidden)

            self._cache[key] = jax.jit(encode)
        return self._cache[key]

    def encode_prompts(self, prompts: list[str], name: str = "prompt", *,
                       prompts_2: list[str] | None = None, name_2: str | None = None,
                       clip_skip: int | None = None):
        """The text conditioning of B prompts.

        SD1/SD2: the prompt embeddings ``(B, 77, D)`` (last hidden state of the text
        encoder). SDXL: ``{"context": (B, 77, D1 + D2), "text_embeds": (B, P)}`` (both
        encoders' penultimate hidden states concatenated, ``text_encoder_2``'s pooled
        projection; :func:`jattn.models.sdxl_text.sdxl_text_embeddings`), with
        ``prompts_2`` (default: ``prompts``, also when empty, as diffusers' ``prompt_2 or
        prompt``) for ``text_encoder_2``. Either can be handed to :meth:`generate` as
        ``prompt_embeds`` / ``uncond_embeds``; SDXL's ``time_ids`` are added there.

        ``clip_skip`` (diffusers'): None = the default layer; k ≥ 0 skips k more layers —
        SD1/SD2: ``hidden_states[-(k + 1)]`` through the final layer norm; SDXL:
        ``hidden_states[-(k + 2)]`` of both encoders.

        Raises:
          ValueError: prompts over 77 tokens (naming ``name``); SDXL: ``prompts_2`` of
            another count (naming ``name_2``, default ``name + "_2"``); SD1/SD2:
            ``prompts_2`` given (one text encoder); ``clip_skip`` not a whole number in
            ``[0, layers - 1]``.
        """
        name_2 = name_2 or f"{name}_2"
        prompts = list(prompts)
        if clip_skip is not None:
            layers = min(c.num_hidden_layers for c in (self.text_config, self.text_config_2)
                         if c is not None)
            clip_skip = checks.whole_number(
                clip_skip, "clip_skip", minimum=0, maximum=layers - (2 if self.is_sdxl else 1))
        if not self.is_sdxl:
            if prompts_2 is not None:
                raise _sdxl_only(name_2)
            ids = jnp.asarray(self.tokenize(prompts, name=name))
            return self._text_fn(clip_skip)(self.params["text_encoder"], ids)
        from jattn.io.tokenizer import tokenize

        p2 = checks.prompt_list(prompts_2, name_2) if prompts_2 else prompts
        if len(p2) == 1 and len(prompts) > 1 and isinstance(prompts_2, str):
            p2 = p2 * len(prompts)
        if len(p2) != len(prompts):
            raise ValueError(f"{name_2}: got {len(p2)} for {len(prompts)} prompts in {name}; "
                             "give one string or one per prompt.")
        ids = jnp.asarray(self.tokenize(prompts, name=name))
        ids_2 = jnp.asarray(tokenize(self.tokenizer_2, p2,
                                     max_length=self.text_config_2.max_position_embeddings,
                                     name=name_2))
        params = {"text_encoder": self.params["text_encoder"],
                  "text_encoder_2": self.params["text_encoder_2"]}
        return self._text_fn(clip_skip)(params, ids, ids_2)

    def time_ids(self, batch: int, height: int, width: int, original_size=None,
                 crops_coords_top_left=None, target_size=None, *, prefix: str = ""
                 ) -> jax.Array:
        """SDXL's micro-conditioning ``(B, 6)`` float32 (Podell et al. 2023, sec. 2.2;
        diffusers' ``_get_add_time_ids``): ``original_size + crops_coords_top_left +
        target_size`` per row, each a pair ``(h, w)`` / ``(top, left)`` in pixels;
        ``original_size`` and ``target_size`` default to ``(height, width)``, the crop to
        ``(0, 0)``. ``prefix`` ("negative_") names the arguments in errors.

        Raises:
          ValueError: not a pair of whole numbers (sizes ≥ 1, crops ≥ 0), naming it.
        """
        o = _pair(original_size, prefix + "original_size", 1) or (height, width)
        c = _pair(crops_coords_top_left, prefix + "crops_coords_top_left", 0) or (0, 0)
        t = _pair(target_size, prefix + "target_size", 1) or (height, width)
        row = np.asarray(o + c + t, np.float32)
        return jnp.asarray(np.broadcast_to(row, (int(batch), row.shape[0])))

    # ------------------------------------------------------------------ vae
    def decoder_program(self):
        """The VAE decode as a pure, un-jitted function ``(vae_params, latents) -> images``
        (scaled latents float ``(B, h, w, C)`` -> uint8 ``(B, H, W, 3)``), to compose into a
        larger compiled program (e.g. :mod:`jattn.batch`'s micro-batched job program);
        :meth:`decode` runs it jitted."""
        cfg = self.vae_config
        vdt = self.vae_dtype
        upcast = np.dtype(vdt) != np.dtype(self.dtype)

        def decode(params, latents_nhwc):
            self._count("decode")
            if upcast:  # SDXL's force_upcast: decode in float32
                params = _cast_tree(params, vdt)
            x = vae_lib.decode_latents(params, cfg, latents_nhwc.astype(vdt))
            x = jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
            return jnp.round(x * 255).astype(jnp.uint8)

        return decode

    def _decode_fn(self):
        if "decode" not in self._cache:
            self._cache["decode"] = jax.jit(self.decoder_program())
        return self._cache["decode"]

    def decode(self, latents_nhwc: jax.Array) -> np.ndarray:
        """Scaled latents ``(B, h, w, C)`` -> uint8 images ``(B, H, W, 3)``."""
        return np.asarray(self._decode_fn()(self.params["vae"], latents_nhwc))

    def _encode_fn(self):
        if "encode" not in self._cache:
            cfg = self.vae_config
            vdt = self.vae_dtype
            upcast = np.dtype(vdt) != np.dtype(self.dtype)

            def encode(params, images):
                self._count("encode")
                if upcast:  # SDXL's force_upcast
                    params = _cast_tree(params, vdt)
                return vae_lib.encode_latents(params, cfg, images.astype(vdt)).astype(
                    jnp.float32)

            self._cache["encode"] = jax.jit(encode)
        return self._cache["encode"]

    def encode_images(self, images: np.ndarray) -> jax.Array:
        """uint8 ``(B, H, W, 3)`` images -> scaled posterior-mean latents ``(B, h, w, C)``.

        Raises:
          ValueError: not ``(B, H, W, 3)`` values 0..255 (e.g. floats in [0, 1]).
        """
        from jattn.io.images import as_uint8_images

        x = jnp.asarray(as_uint8_images(images, "images"), jnp.float32) / 127.5 - 1.0
        return self._encode_fn()(self.params["vae"], x)

    # ------------------------------------------------------------------ unet
    def unet_fn(self, params):
        """``(latents, timesteps, context, policy, step) -> (eps, aux)`` closing over params.

        ``context``: SD1/SD2 the prompt embeddings ``(B, S, D)``; SDXL the dict
        ``{"context": (B, S, D), "text_embeds": (B, P), "time_ids": (B, 6)}`` (the last two
        are the UNet's ``added_cond``)."""
        module = self.unet
        dtype = self.dtype

        def fn(x, t, ctx, policy, step):
            interrupt.check_in_graph()  # Ctrl-C stops here when enabled (jattn.io.interrupt)
            if isinstance(ctx, Mapping):  # SDXL: text context + added text/time conditioning
                added = {k: v for k, v in ctx.items() if k != "context"}
                return module.apply({"params": params}, x.astype(dtype), t,
                                    ctx["context"].astype(dtype), added_cond=added,
                                    policy=policy, step=step)
            out, aux = module.apply({"params": params}, x.astype(dtype), t,
                                    ctx.astype(dtype), policy=policy, step=step)
            return out, aux

        return fn

    def sites(self, height: int | None = None, width: int | None = None, *,
              features: bool = False) -> list:
        """Every attention site of the UNet in call order, for an image of ``height×width`` px;
        with ``features=True`` followed by every feature site (:meth:`feature_sites`), the
        list to :func:`jattn.policy.core.resolve` rules of both seams against."""
        h = (height or self.default_size) // self.vae_scale_factor
        w = (width or self.default_size) // self.vae_scale_factor
        key = ("sites", h, w)
        if key not in self._cache:  # tracing the UNet shape-only costs ~0.5 s: do it once
            self._cache[key] = unet_lib.list_sites(self.unet_config, sample_size=(h, w))
        out: list = list(self._cache[key])
        return out + self.feature_sites(height, width) if features else out

    def feature_sites(self, height: int | None = None, width: int | None = None) -> list:
        """Every feature site of the UNet (:class:`jattn.models.features.FeatureSite`: resnet
        outputs, GroupNorms, FreeU's backbone/skip inputs) in call order."""
        h = (height or self.default_size) // self.vae_scale_factor
        w = (width or self.default_size) // self.vae_scale_factor
        key = ("feature_sites", h, w)
        if key not in self._cache:
            self._cache[key] = unet_lib.list_feature_sites(self.unet_config, sample_size=(h, w))
        return list(self._cache[key])

    def _replicated(self, mesh):
        key = ("replicated_unet", id(mesh))
        if key not in self._cache:
            from jax.sharding import NamedSharding, PartitionSpec as P

            self._cache[key] = jax.device_put(self.params["unet"], NamedSharding(mesh, P()))
        return self._cache[key]

    # ------------------------------------------------------------------ sampling
    def schedule(self, num_inference_steps: int, scheduler: str | None = None,
                 eta: float | None = None) -> sch.Schedule:
        cfg = self.scheduler_config
        if scheduler is not None:
            if scheduler not in SCHEDULERS:
                raise ValueError(f"scheduler={scheduler!r}: choose one of "
                                 f"{', '.join(SCHEDULERS)} (None = the checkpoint's).")
            cfg = cfg.replace(kind=scheduler)
        if eta is not None:
            cfg = cfg.replace(eta=float(eta))
        try:
            return sch.make_schedule(cfg, int(num_inference_steps))
        except IndexError:  # e.g. "leading" spacing with steps_offset=1 at 1000 steps
            raise ValueError(
                f"num_inference_steps={num_inference_steps}: this checkpoint's "
                f"{cfg.kind} timesteps (spacing {cfg.timestep_spacing!r}, steps_offset "
                f"{cfg.steps_offset}) reach past its {cfg.num_train_timesteps} training "
                f"timesteps (diffusers fails the same way); use at most "
                f"{cfg.num_train_timesteps - cfg.steps_offset} steps.") from None

    def sampler_program(self, do_cfg: bool, aux_fns=None):
        """The sampler loop as a pure, un-jitted function, to compose into a larger compiled
        program (e.g. :mod:`jattn.batch`'s micro-batched job program); :meth:`generate`
        runs it jitted.

        Returns ``run(unet_params, schedule, latents, cond, uncond, gs, keys, policy,
        uncond_steps, guidance, gr, hooks=None) -> (final, aux)``: ``latents`` float32
        ``(B, h, w, C)`` already scaled by ``schedule.init_noise_sigma``; ``cond``/``uncond``
        ``(B, 77, D)`` (``uncond`` unused when ``do_cfg`` is False); ``gs``/``gr`` float32
        scalars (CFG scale, guidance rescale); ``keys`` ``(B,)`` PRNG keys; ``policy``,
        ``uncond_steps``, ``guidance``, ``hooks`` as in :meth:`generate` (None = off);
        ``final`` the denoised latents ``(B, h, w, C)``, ``aux`` the policy's aggregate.
        """
        def run(params, schedule, latents, cond, uncond, gs, keys, policy, uncond_steps,
                guidance, gr, hooks=None):
            self._count("sample")
            aux_init = aux_update = callback = None
            if aux_fns is not None:
                aux_init_fn, aux_update, callback = aux_fns
                aux_init = aux_init_fn(policy, latents)
            elif isinstance(policy, Policy):
                aux_init = policy.aux_init(latents)
                aux_update, callback = policy.aux_update, policy.on_step
            return sampler_lib.sample(
                self.unet_fn(params), schedule, latents, cond,
                uncond if do_cfg else None, gs, keys, policy=policy, aux_init=aux_init,
                aux_update=aux_update, callback=callback, uncond_per_step=uncond_steps,
                guidance=guidance, guidance_rescale=gr, hooks=hooks)

        return run

    def _sample_fn(self, do_cfg: bool, aux_fns=None):
        key = ("sample", do_cfg, aux_fns)
        if key not in self._cache:
            self._cache[key] = jax.jit(self.sampler_program(do_cfg, aux_fns))
        return self._cache[key]

    def min_size(self) -> int:
        """Smallest image side in pixels: one latent cell at the UNet's deepest level
        (VAE factor × 2^(levels − 1); 32 px for the bundled model, 64 px for SD)."""
        return self.vae_scale_factor * 2 ** (len(self.unet_config.block_out_channels) - 1)

    def check_size(self, height, width, batch: int = 1) -> tuple[int, int]:
        """``(height, width)`` in pixels (None = the default size), checked against the
        model (multiples of the VAE factor, at least :meth:`min_size`, at most 16384) and
        the device's memory for ``batch`` images.

        Raises:
          ValueError: naming ``height``/``width`` and the valid sizes.
        """
        f, lo = self.vae_scale_factor, self.min_size()
        out = []
        for name, v in (("height", height), ("width", width)):
            v = self.default_size if v is None else checks.whole_number(v, name)
            if v < lo or v % f:
                raise ValueError(f"{name}={v}: must be a multiple of {f} and ≥ {lo} px for "
                                 f"this model (default {self.default_size}).")
            if v > MAX_SIDE:
                raise ValueError(f"{name}={v}: at most {MAX_SIDE} px per side.")
            out.append(v)
        need = _min_working_bytes(self, batch, out[0], out[1])
        have = _device_memory_bytes()
        if have and need > have:
            raise ValueError(
                f"height={out[0]}, width={out[1]} with {batch} image(s) needs at least "
                f"{need / 2**30:.1f} GiB of working memory, more than this device has "
                f"({have / 2**30:.1f} GiB); use smaller images or fewer prompts per call.")
        return out[0], out[1]

    def _check_generate_args(self, prompt, prompt_embeds, seed, height, width,
                             num_inference_steps):
        if prompt_embeds is None:
            prompts = checks.prompt_list(prompt, "prompt")
            b = len(prompts)
        else:
            prompts = [] if prompt is None else checks.prompt_list(prompt, "prompt",
                                                                   allow_empty_list=True)
            lead = (prompt_embeds.get("context") if isinstance(prompt_embeds, Mapping)
                    else prompt_embeds)
            b = int(np.shape(lead)[0])
        if np.dtype(self.dtype) == np.float16 and jax.default_backend() == "cpu":
            raise ValueError("dtype=float16: XLA on CPU has no float16 matrix products; load "
                             "with dtype='bfloat16' (same memory) or 'float32' on CPU.")
        seeds = checks.seed_list(seed, b)
        steps = checks.whole_number(num_inference_steps, "num_inference_steps", minimum=1,
                                    maximum=self.scheduler_config.num_train_timesteps)
        return b, prompts, seeds, self.check_size(height, width, b), steps

    def _negatives(self, b: int, negative_prompt, name: str = "negative_prompt") -> list[str]:
        negs = checks.prompt_list(negative_prompt if negative_prompt is not None else "", name)
        negs = negs * b if isinstance(negative_prompt, (str, type(None))) else negs
        if len(negs) != b:
            raise ValueError(f"{name}: got {len(negs)} for {b} prompts; give one string or "
                             "one per prompt.")
        return negs

    def _sd_conditioning(self, b, prompts, negative_prompt, prompt_embeds, uncond_embeds,
                         uncond_per_step, do_cfg, clip_skip=None):
        """SD1/SD2: ``(cond (B, 77, D), uncond)``; ``uncond`` is ``cond`` (unused) without
        CFG or with ``uncond_per_step``. ``clip_skip`` applies to the prompts only (the
        negative prompts use the last layer, as diffusers' ``encode_prompt``)."""
        cond = (prompt_embeds if prompt_embeds is not None
                else self.encode_prompts(prompts, clip_skip=clip_skip))
        if do_cfg and uncond_per_step is None:
            if uncond_embeds is not None:
                return cond, uncond_embeds
            negs = self._negatives(b, negative_prompt)
            return cond, self.encode_prompts(negs, name="negative_prompt")
        return cond, cond  # placeholder, unused without CFG (keeps one signature)

    def _sdxl_conditioning(self, b, prompts, negative_prompt, prompt_embeds, uncond_embeds,
                           uncond_per_step, do_cfg, height, width, *, prompt_2,
                           negative_prompt_2, original_size, crops_coords_top_left,
                           target_size, negative_original_size,
                           negative_crops_coords_top_left, negative_target_size,
                           clip_skip=None):
        """SDXL: ``(cond, uncond, uncond_per_step)`` as ``{"context", "text_embeds",
        "time_ids"}`` pytrees (diffusers' ``StableDiffusionXLPipeline.__call__``: prompt
        embeddings, pooled ``add_text_embeds``, ``add_time_ids``)."""
        tid = self.time_ids(b, height, width, original_size, crops_coords_top_left,
                            target_size)
        neg_tid = self.time_ids(
            b, height, width,
            original_size if negative_original_size is None else negative_original_size,
            crops_coords_top_left if negative_crops_coords_top_left is None
            else negative_crops_coords_top_left,
            target_size if negative_target_size is None else negative_target_size,
            prefix="negative_")
        if prompt_embeds is not None:
            if prompt_2 is not None:
                raise ValueError("prompt_2: given with prompt_embeds, which already hold "
                                 "text_encoder_2's part; give prompt + prompt_2, or "
                                 "prompt_embeds alone.")
            text = _sdxl_embeds(prompt_embeds, "prompt_embeds", b)
        else:
            text = self.encode_prompts(prompts, "prompt", prompts_2=_maybe_list(prompt_2),
                                       name_2="prompt_2", clip_skip=clip_skip)
        cond = {"time_ids": tid, **text}
        if not do_cfg:
            return cond, cond, None  # placeholder, unused without CFG
        if uncond_per_step is not None:
            per = _sdxl_embeds(uncond_per_step, "uncond_per_step", b, per_step=True)
            n = per["context"].shape[0]
            per = {"time_ids": jnp.broadcast_to(neg_tid, (n,) + neg_tid.shape), **per}
            return cond, cond, per
        if uncond_embeds is not None:
            if negative_prompt_2 is not None:
                raise ValueError("negative_prompt_2: given with uncond_embeds, which already "
                                 "hold text_encoder_2's part; give one or the other.")
            return cond, {"time_ids": neg_tid, **_sdxl_embeds(uncond_embeds, "uncond_embeds",
                                                              b)}, None
        if (negative_prompt is None and negative_prompt_2 is None
                and self.force_zeros_for_empty_prompt):
            zeros = {k: jnp.zeros_like(v) for k, v in text.items() if k != "time_ids"}
            return cond, {**zeros, "time_ids": neg_tid}, None
        negs = self._negatives(b, negative_prompt)
        negs_2 = (self._negatives(b, negative_prompt_2, "negative_prompt_2")
                  if negative_prompt_2 else None)
        un = self.encode_prompts(negs, "negative_prompt", prompts_2=negs_2,
                                 name_2="negative_prompt_2")
        return cond, {**un, "time_ids": neg_tid}, None

    def generate(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        *,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        scheduler: str | None = None,
        eta: float | None = None,
        seed: int | list[int] = 0,
        height: int | None = None,
        width: int | None = None,
        latents: np.ndarray | None = None,
        policy: Any = None,
        aux_fns: tuple | None = None,
        prompt_embeds: jax.Array | None = None,
        uncond_embeds: jax.Array | None = None,
        uncond_per_step: jax.Array | None = None,
        guidance: Any = None,
        guidance_rescale: float = 0.0,
        decode: bool = True,
        hooks: Any = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
    ) -> GenerateOutput:
        """Generate images, one per prompt.

        Args:
          prompt: B prompts (a str is one prompt).
          negative_prompt: one for all or one per prompt; ``None`` means "" (diffusers).
          num_inference_steps: denoising steps.
          guidance_scale: CFG scale; CFG runs when it is > 1 (diffusers' rule).
          scheduler: "ddim", "ddpm", "euler", "dpm++2m" (default: the checkpoint's).
          eta: DDIM eta (≥ 0).
          seed: int (sample i uses seed + i) or one seed per prompt; image i is the same
            whether generated alone or in a batch.
          height, width: pixels, multiples of 8 (default: the UNet's sample size × 8).
          latents: optional float32 ``(B, C, h, w)`` unscaled initial noise (diffusers'
            ``latents=``); ``init_noise_sigma`` is applied here.
          policy: attention policy; ``aux_fns`` = ``(aux_init(policy, latents),
            aux_update(acc, aux, i), callback)`` for in-graph aggregation.
          prompt_embeds / uncond_embeds: ``(B, 77, D)`` embeddings replacing the prompts
            (SDXL: :meth:`encode_prompts`' ``{"context", "text_embeds"}``; a ``"time_ids"``
            entry ``(B, 6)``, if present, replaces the micro-conditioning arguments).
          uncond_per_step: ``(steps, B, 77, D)`` per-step unconditional embeddings
            (null-text inversion); SDXL: ``{"context", "text_embeds"}`` with the step axis
            first on each.
          guidance: :class:`jattn.sampling.guidance.Guidance`: a loss on recorded attention,
            a gradient step on the latents inside the loop.
          guidance_rescale: phi in [0, 1] (diffusers' ``guidance_rescale``; Lin et al. 2024
            suggest 0.7 for zero-terminal-SNR models): CFG output rescaled towards the
            conditional output's standard deviation; 0 (default) is plain CFG.
          decode: decode latents to images (else ``images`` is None).
          hooks: :class:`jattn.sampling.sampler.SamplerHooks` (per-step noise maps, start
            step), passed to the sampler loop as is.
          prompt_2, negative_prompt_2: SDXL only: the prompts of ``text_encoder_2``
            (default: ``prompt`` / ``negative_prompt``, also when empty, as diffusers); one
            string or one per prompt. Without any negative prompt and with
            ``force_zeros_for_empty_prompt`` (SDXL base) the negative conditioning is zeros.
          original_size, crops_coords_top_left, target_size: SDXL only: the
            micro-conditioning ``(h, w)``, ``(top, left)``, ``(h, w)`` in pixels (default
            ``(height, width)``, ``(0, 0)``, ``(height, width)``, diffusers').
          negative_original_size, negative_crops_coords_top_left, negative_target_size:
            SDXL only: the negative rows' micro-conditioning; each defaults to its positive
            counterpart. (diffusers uses the negative values only when both negative sizes
            are given, with ``(0, 0)`` for a missing negative crop; the two agree whenever
            all three or none are given. With B > 1 and negative values that differ from
            the positive ones, diffusers' ``add_time_ids.repeat(batch_size, 1)`` hands rows
            alternating negative/positive time ids; jattn gives each row its own.)
          clip_skip: diffusers' ``clip_skip`` for the prompts (not the negative prompts, as
            diffusers): None = the default layer, k ≥ 1 = k layers earlier (SD1/SD2:
            ``hidden_states[-(k + 1)]`` through the final layer norm; SDXL:
            ``hidden_states[-(k + 2)]`` of both encoders). Ignored with ``prompt_embeds``.
        Returns:
          :class:`GenerateOutput`.
        Raises:
          TypeError: a prompt that is not a string, a seed or step count that is not an int.
          ValueError: an empty prompt list, prompts over 77 tokens; sizes not multiples of
            the VAE factor, below :meth:`min_size` or too large for the device's memory;
            seeds outside ``[0, 2**32 - 1]`` (also ``seed + i``); a step count < 1, not
            whole or over the training timesteps; a negative or non-finite guidance scale
            or eta; guidance_rescale outside [0, 1]; latents of the wrong shape, not float
            or not finite; negative prompts of the wrong count; float16 on CPU; SDXL:
            ``prompt_2`` / ``negative_prompt_2`` of the wrong count, micro-conditioning
            that is not a pair of whole numbers; SD1/SD2: any SDXL-only argument.
        """
        xl = dict(prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
                  original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                  target_size=target_size, negative_original_size=negative_original_size,
                  negative_crops_coords_top_left=negative_crops_coords_top_left,
                  negative_target_size=negative_target_size)
        if not self.is_sdxl:
            given = [k for k in SDXL_ONLY_ARGS if xl[k] is not None]
            if given:
                raise _sdxl_only(given[0])
        b, prompts, seeds, (height, width), steps = self._check_generate_args(
            prompt, prompt_embeds, seed, height, width, num_inference_steps)
        guidance_scale = checks.finite_number(
            guidance_scale, "guidance_scale", minimum=0.0,
            hint="CFG runs when it is > 1 (7.5 is the usual value); 0 to 1 means no CFG.")
        guidance_rescale = checks.finite_number(
            guidance_rescale, "guidance_rescale", minimum=0.0, maximum=1.0,
            hint="0 = plain CFG; 0.7 is Lin et al.'s value.")
        if eta is not None:
            eta = checks.finite_number(eta, "eta", minimum=0.0, hint="0 = deterministic DDIM.")
        f = self.vae_scale_factor
        h, w, c = height // f, width // f, self.unet_config.in_channels
        do_cfg = guidance_scale > 1.0 or uncond_per_step is not None
        if self.is_sdxl:
            cond, uncond, uncond_per_step = self._sdxl_conditioning(
                b, prompts, negative_prompt, prompt_embeds, uncond_embeds, uncond_per_step,
                do_cfg, height, width, **xl, clip_skip=clip_skip)
        else:
            cond, uncond = self._sd_conditioning(b, prompts, negative_prompt, prompt_embeds,
                                                 uncond_embeds, uncond_per_step, do_cfg,
                                                 clip_skip)
        schedule = self.schedule(steps, scheduler, eta)
        keys = sampler_lib.per_sample_keys(np.asarray(seeds, np.uint32))
        if latents is None:
            x = sampler_lib.initial_noise(keys, (h, w, c))
        else:
            latents = checks.float_array(
                latents, "latents", (b, c, h, w),
                hint=" (B, C, h, w) = NCHW unscaled noise as diffusers' latents=.")
            x = jnp.asarray(latents.transpose(0, 2, 3, 1))
        x = x * schedule.init_noise_sigma
        fn = self._sample_fn(do_cfg, aux_fns)
        gs = jnp.asarray(guidance_scale, jnp.float32)
        groups = policy.layout.groups if isinstance(policy, Policy) else b
        unet_params = self.params["unet"]
        mesh = data_mesh(groups)
        if mesh is not None:  # whole groups per device: rows are group-major
            from jax.sharding import NamedSharding, PartitionSpec as P

            rows = NamedSharding(mesh, P("data"))
            x, cond, uncond, keys = (jax.device_put(a, rows) for a in (x, cond, uncond, keys))
            if uncond_per_step is not None:
                uncond_per_step = jax.device_put(uncond_per_step,
                                                 NamedSharding(mesh, P(None, "data")))
            if getattr(hooks, "noise", None) is not None:  # per-step rows with the batch
                hooks = hooks.replace(noise=jax.device_put(
                    hooks.noise, NamedSharding(mesh, P(None, "data"))))
            if getattr(hooks, "reimpose", None) is not None:  # per-step rows, row mask
                hooks = hooks.replace(
                    reimpose=jax.device_put(hooks.reimpose, NamedSharding(mesh, P(None, "data"))),
                    reimpose_rows=jax.device_put(jnp.asarray(hooks.reimpose_rows, bool), rows))
            unet_params = self._replicated(mesh)
        final, aux = fn(unet_params, schedule, x, cond, uncond, gs, keys, policy,
                        uncond_per_step, guidance, jnp.asarray(guidance_rescale, jnp.float32),
                        hooks)
        images = self.decode(final) if decode else None
        return GenerateOutput(images=images,
                              latents=np.asarray(final, np.float32).transpose(0, 3, 1, 2),
                              aux=aux)


MAX_SIDE = 16384  # px per side: beyond any Stable Diffusion model's working sizes


def _sdxl_only(name: str) -> ValueError:
    return ValueError(
        f"{name}: this model has one text encoder and no added conditioning (SD1/SD2); "
        f"{name} applies to SDXL models only. Fix: leave it out, or load an SDXL checkpoint "
        "(a folder with text_encoder_2/ and tokenizer_2/).")


def _maybe_list(prompts):
    """``prompt_2``-style argument as given to :meth:`Pipeline.encode_prompts`: None or a
    falsy value (diffusers' ``prompt_2 or prompt``) -> None, else the value."""
    return prompts if prompts else None


def _pair(value, name: str, minimum: int) -> tuple[int, int] | None:
    """A pair of whole numbers ``>= minimum`` as a tuple (None stays None)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__") \
            or len(value) != 2:
        raise ValueError(f"{name}={value!r}: expected a pair of whole numbers (h, w) / "
                         "(top, left) in pixels, e.g. (1024, 1024) or (0, 0).")
    return tuple(checks.whole_number(v, f"{name}[{i}]", minimum=minimum)
                 for i, v in enumerate(value))


def _sdxl_embeds(value, name: str, b: int, per_step: bool = False) -> dict:
    """SDXL text conditioning given by the caller: ``{"context", "text_embeds"}`` (and
    optionally ``"time_ids"``) with batch B (after a step axis when ``per_step``)."""
    keys = ("context", "text_embeds")
    if not isinstance(value, Mapping) or any(k not in value for k in keys):
        lead = "(n_steps, B, …)" if per_step else "(B, …)"
        raise ValueError(
            f"{name}: on SDXL give the dict of Pipeline.encode_prompts, {{'context': "
            f"(B, 77, D), 'text_embeds': (B, P)}} (leading axes {lead}); got "
            f"{type(value).__name__}" + (f" with keys {sorted(value)}"
                                         if isinstance(value, Mapping) else "") + ".")
    extra = sorted(set(value) - {"context", "text_embeds", "time_ids"})
    if extra:
        raise ValueError(f"{name}: unknown key(s) {extra}; expected 'context', 'text_embeds' "
                         "and optionally 'time_ids'.")
    out = {k: jnp.asarray(v) for k, v in value.items()}
    axis = 1 if per_step else 0
    for k, v in out.items():
        if v.ndim <= axis or v.shape[axis] != b:
            raise ValueError(f"{name}[{k!r}]: shape {tuple(v.shape)}, expected batch {b} on "
                             f"axis {axis}.")
    if "time_ids" in out:
        out["time_ids"] = out["time_ids"].astype(jnp.float32)
    return out


def _min_working_bytes(pipe: "Pipeline", batch: int, height: int, width: int) -> int:
    """A lower bound of the memory one ``generate`` call needs: two float32 activations
    of the VAE decoder's last block at full resolution (``B × H × W × C``), and two of the
    UNet's first block for the CFG batch. Real use is several times more."""
    vae = batch * height * width * pipe.vae_config.block_out_channels[0] * 4 * 2
    f = pipe.vae_scale_factor
    unet = 2 * batch * (height // f) * (width // f) * pipe.unet_config.block_out_channels[0] * 4 * 2
    return max(vae, unet)


def _device_memory_bytes() -> int | None:
    """Memory of the default device (GPU/TPU: its allocator limit; CPU: physical RAM)."""
    import os

    try:
        dev = jax.devices()[0]
        stats = dev.memory_stats() if dev.platform != "cpu" else None
        if stats and stats.get("bytes_limit"):
            return int(stats["bytes_limit"])
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


_MESHES: dict = {}


def data_mesh(groups: int):
    """A 1-D mesh ``("data",)`` over all devices when there are several and ``groups``
    divides evenly over them (whole groups per device); else None (single device)."""
    n = jax.device_count()
    if n < 2 or groups % n:
        return None
    if n not in _MESHES:
        _MESHES[n] = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    return _MESHES[n]


# ---------------------------------------------------------------------- loading
def load(model: str | Path | None = None, *, dtype="float32", allow_pickle: bool = False,
         revision: str | None = None, variant: str | None = None) -> Pipeline:
    """Load a diffusers-layout Stable Diffusion (1.x/2.x) or SDXL checkpoint.

    The family is read from ``model_index.json`` (SDXL: ``text_encoder_2`` /
    ``tokenizer_2`` entries or an SDXL pipeline class; ``force_zeros_for_empty_prompt``,
    default true), and its components from one table (:data:`SD_COMPONENTS`,
    :data:`SDXL_COMPONENTS`: folder, config type, converter, required) by
    :func:`jattn.io.checkpoint.load_components`.

    Args:
      model: a local folder, a Hugging Face hub id (fetched with huggingface_hub when
        online), or ``None`` for the bundled model.
      dtype: "float32", "bfloat16" or "float16": parameter and computation dtype.
      allow_pickle: accept ``.bin``/``.ckpt`` pickle weights (refused by default).
      revision, variant: hub revision; weight-file variant (e.g. "fp16").
    Returns:
      :class:`Pipeline`.
    Raises:
      TypeError / ValueError: a bad ``model=``, ``dtype=``, ``allow_pickle=``,
        ``revision=`` or ``variant=`` argument (names it and what is accepted).
      CheckpointNotFoundError: missing folder/files (names them: e.g. an SDXL folder
        without text_encoder_2/ or tokenizer_2/) or hub unreachable.
      CheckpointDamagedError: a truncated/corrupted file, invalid JSON, NaN/inf weights,
        a directory where a file belongs, an unreadable file (names the file).
      CheckpointConfigError: a config value of the wrong type or out of range, or a
        required key missing (names the file, the key and what is expected).
      CheckpointUnsupportedError: a valid config asking for a feature jattn lacks (also
        a model_index.json whose text_encoder is null: the SDXL refiner).
      PickleRefusedError: only pickle weights and ``allow_pickle`` is False.
      CheckpointMismatchError: weights do not fit the config (lists every key and shape),
        or components that do not belong together (text width vs UNet, latent channels).
      All of them derive from ``jattn.io.checkpoint.CheckpointError`` (a ValueError).
    """
    if isinstance(dtype, str):
        dt = _as_dtype(dtype)
    else:
        canonical = {np.dtype(v): v for v in DTYPES.values()}
        try:
            dt = None if isinstance(dtype, bool) else canonical.get(np.dtype(dtype))
        except (TypeError, ValueError):
            dt = None
        if dt is None:
            raise TypeError(f"dtype={dtype!r}: expected 'float32', 'bfloat16' or 'float16' "
                            "(or jnp.float32 / jnp.bfloat16 / jnp.float16).")
    if not isinstance(allow_pickle, (bool, np.bool_)):
        raise TypeError(f"allow_pickle={allow_pickle!r}: expected True or False.")
    for name, value in (("revision", revision), ("variant", variant)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name}={value!r}: expected a string or None.")
    if model is None:
        folder = bundled_model_path()
        if not (folder / "unet").is_dir():
            raise ckpt.CheckpointNotFoundError(
                f"the bundled model is not present in {folder}; pass model=PATH_OR_HUB_ID "
                "(CLI: --model).")
    else:
        folder = ckpt.resolve_checkpoint(model, revision=revision)
    index = ckpt.read_json(folder / "model_index.json")
    sdxl = _is_sdxl_index(folder, index)
    table = SDXL_COMPONENTS if sdxl else SD_COMPONENTS
    family = "SDXL" if sdxl else "diffusers-layout"
    for comp in table:
        entry = index.get(comp.name)
        if comp.name not in index:
            warnings.warn(f"model_index.json has no {comp.name!r} entry; reading "
                          f"{comp.name}/ anyway")
        elif isinstance(entry, (list, tuple)) and entry and entry[0] is None:
            raise ckpt.CheckpointUnsupportedError(
                f"{folder / 'model_index.json'}: {comp.name} is null — this checkpoint has no "
                f"{comp.what or comp.name} (e.g. the SDXL refiner, which has only "
                "text_encoder_2); jattn needs it. Fix: load a text-to-image checkpoint with "
                f"{comp.name}/ (SD1/SD2, or SDXL base).")
    configs, toks, _ = ckpt.load_components(folder, table, weights=False, family=family)
    unet_cfg, vae_cfg, text_cfg = configs["unet"], configs["vae"], configs["text_encoder"]
    sched_cfg, tokenizer = configs["scheduler"], toks["tokenizer"]
    text_cfg_2, tokenizer_2 = configs.get("text_encoder_2"), toks.get("tokenizer_2")
    added = getattr(unet_cfg, "addition_embed_type", None)
    if added == "text_time" and not sdxl:
        raise ckpt.CheckpointNotFoundError(
            f"{folder / 'text_encoder_2'}: missing folder. unet/config.json has "
            "addition_embed_type='text_time' (an SDXL UNet), which needs SDXL's second text "
            "encoder text_encoder_2/ (config.json and model.safetensors, a "
            "CLIPTextModelWithProjection) and tokenizer_2/ (vocab.json and merges.txt), listed "
            "in model_index.json. Fix: copy or download the complete SDXL checkpoint folder "
            "(text_encoder_2/ and tokenizer_2/ included).")
    _check_components_fit(folder, unet_cfg, vae_cfg, text_cfg, tokenizer, text_cfg_2,
                          tokenizer_2)
    params = ckpt.load_component_weights(folder, table, configs, allow_pickle=allow_pickle,
                                         variant=variant)
    params = _cast_tree(params, dt)
    force_zeros = False
    if sdxl:  # diffusers' StableDiffusionXLPipeline default: True
        force_zeros = ckpt.config_bool(
            str(folder / "model_index.json"), "force_zeros_for_empty_prompt",
            index.get("force_zeros_for_empty_prompt", True))
    return Pipeline(unet_cfg, vae_cfg, text_cfg, sched_cfg, tokenizer, params, dt, str(folder),
                    text_config_2=text_cfg_2, tokenizer_2=tokenizer_2,
                    force_zeros_for_empty_prompt=force_zeros)


def _is_sdxl_index(folder: Path, index: dict) -> bool:
    """An SDXL checkpoint: ``model_index.json`` lists ``text_encoder_2``/``tokenizer_2`` or
    names an SDXL pipeline class, or the folder has ``text_encoder_2/``."""
    cls = index.get("_class_name")
    return ("text_encoder_2" in index or "tokenizer_2" in index
            or (isinstance(cls, str) and cls.startswith("StableDiffusionXL"))
            or (Path(folder) / "text_encoder_2").is_dir())


def _check_components_fit(folder, unet_cfg, vae_cfg, text_cfg, tokenizer, text_cfg_2=None,
                          tokenizer_2=None) -> None:
    """Components that load one by one but cannot work together (silent clamping or a
    shape error deep inside jit otherwise): one CheckpointMismatchError listing them."""
    from jattn.io.tokenizer import MAX_LENGTH

    clash = []
    width = text_cfg.hidden_size + (text_cfg_2.hidden_size if text_cfg_2 is not None else 0)
    if unet_cfg.cross_attention_dim != width:
        texts = (f"text_encoder/config.json hidden_size={text_cfg.hidden_size}"
                 if text_cfg_2 is None else
                 f"text_encoder + text_encoder_2 hidden_size {text_cfg.hidden_size} + "
                 f"{text_cfg_2.hidden_size} = {width}")
        clash.append(f"unet/config.json cross_attention_dim={unet_cfg.cross_attention_dim} but "
                     + texts)
    if not unet_cfg.in_channels == unet_cfg.out_channels == vae_cfg.latent_channels:
        clash.append(f"unet/config.json in_channels={unet_cfg.in_channels}, out_channels="
                     f"{unet_cfg.out_channels} but vae/config.json latent_channels="
                     f"{vae_cfg.latent_channels} (inpainting/depth UNets with extra input "
                     "channels are not supported)")
    pairs = [("text_encoder", text_cfg, "tokenizer", tokenizer)]
    if text_cfg_2 is not None:
        pairs.append(("text_encoder_2", text_cfg_2, "tokenizer_2", tokenizer_2))
        added = getattr(unet_cfg, "addition_embed_type", None)
        if added != "text_time":
            clash.append(f"model_index.json describes SDXL (text_encoder_2) but unet/config.json "
                         f"has addition_embed_type={added!r}, not 'text_time'")
        else:
            t, p = unet_cfg.addition_time_embed_dim, unet_cfg.projection_class_embeddings_input_dim
            if p != text_cfg_2.projection_dim + 6 * t:
                clash.append(
                    f"unet/config.json projection_class_embeddings_input_dim={p} but "
                    f"text_encoder_2/config.json projection_dim={text_cfg_2.projection_dim} + 6 "
                    f"time ids × addition_time_embed_dim={t} = "
                    f"{text_cfg_2.projection_dim + 6 * t} (a refiner-style UNet with "
                    "aesthetic-score conditioning is not supported)")
    for te, cfg, tk, tok in pairs:
        if cfg.max_position_embeddings < MAX_LENGTH:
            clash.append(f"{te}/config.json max_position_embeddings="
                         f"{cfg.max_position_embeddings} < the {MAX_LENGTH} tokens per prompt")
        if len(tok) > cfg.vocab_size:
            clash.append(f"{tk}/ has {len(tok)} tokens but {te}/config.json "
                         f"vocab_size={cfg.vocab_size}")
    if clash:
        raise ckpt.CheckpointMismatchError(
            f"{folder}: the components do not belong together: " + "; ".join(clash)
            + ". Fix: take every component folder from the same checkpoint.")
