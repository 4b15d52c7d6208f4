"""The text-to-image pipeline: params + configs + tokenizer + scheduler config.

``jattn.load(path_or_hub_id)`` returns a :class:`Pipeline`; ``Pipeline.generate`` runs text
encoding, the compiled sampler loop and VAE decoding, each under ``jax.jit``. Compiled
programs are cached per static configuration (image size, steps, scheduler kind, CFG on/off,
batch size, policy structure), so new prompts, seeds, guidance scales or policy arrays
never recompile.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jattn.io import checkpoint as ckpt
from jattn.models import clip_text as clip_lib
from jattn.models import unet as unet_lib
from jattn.models import vae as vae_lib
from jattn.models.attention import AttentionSite
from jattn.policy.core import Policy
from jattn.sampling import sampler as sampler_lib
from jattn.sampling import schedulers as sch

__all__ = ["Pipeline", "GenerateOutput", "load", "bundled_model_path", "DTYPES"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
          "fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


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
    """A loaded Stable Diffusion model.

    Attributes:
      unet_config, vae_config, text_config, scheduler_config: typed configs.
      tokenizer: a transformers ``CLIPTokenizer``.
      params: ``{"unet": …, "vae": …, "text_encoder": …}`` Flax param trees.
      dtype: computation and parameter dtype (float32, bfloat16 or float16).
      source: where it was loaded from.
    """

    unet_config: unet_lib.UNetConfig
    vae_config: vae_lib.VAEConfig
    text_config: clip_lib.CLIPTextConfig
    scheduler_config: sch.SchedulerConfig
    tokenizer: Any
    params: dict
    dtype: Any = jnp.float32
    source: str = ""
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
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return self.unet_config.sample_size * self.vae_scale_factor

    def _count(self, name: str) -> None:
        self.trace_counts[name] = self.trace_counts.get(name, 0) + 1

    # ------------------------------------------------------------------ text
    def tokenize(self, prompts: list[str]) -> np.ndarray:
        """Token ids ``(B, 77)`` int32; raises ValueError for prompts over 77 tokens."""
        from jattn.io.tokenizer import tokenize

        return tokenize(self.tokenizer, prompts, max_length=self.text_config.max_position_embeddings)

    def _text_fn(self):
        if "text" not in self._cache:
            module = self.text_encoder

            def encode(params, ids):
                self._count("text")
                return module.apply({"params": params}, ids)["last_hidden_state"]

            self._cache["text"] = jax.jit(encode)
        return self._cache["text"]

    def encode_prompts(self, prompts: list[str]) -> jax.Array:
        """Prompt embeddings ``(B, 77, D)`` (last hidden state of the text encoder)."""
        ids = jnp.asarray(self.tokenize(list(prompts)))
        return self._text_fn()(self.params["text_encoder"], ids)

    # ------------------------------------------------------------------ vae
    def _decode_fn(self):
        if "decode" not in self._cache:
            cfg = self.vae_config

            def decode(params, latents_nhwc):
                self._count("decode")
                x = vae_lib.decode_latents(params, cfg, latents_nhwc.astype(self.dtype))
                x = jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
                return jnp.round(x * 255).astype(jnp.uint8)

            self._cache["decode"] = jax.jit(decode)
        return self._cache["decode"]

    def decode(self, latents_nhwc: jax.Array) -> np.ndarray:
        """Scaled latents ``(B, h, w, C)`` -> uint8 images ``(B, H, W, 3)``."""
        return np.asarray(self._decode_fn()(self.params["vae"], latents_nhwc))

    def _encode_fn(self):
        if "encode" not in self._cache:
            cfg = self.vae_config

            def encode(params, images):
                self._count("encode")
                return vae_lib.encode_latents(params, cfg, images.astype(self.dtype)).astype(
                    jnp.float32)

            self._cache["encode"] = jax.jit(encode)
        return self._cache["encode"]

    def encode_images(self, images: np.ndarray) -> jax.Array:
        """uint8 ``(B, H, W, 3)`` images -> scaled posterior-mean latents ``(B, h, w, C)``."""
        x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
        return self._encode_fn()(self.params["vae"], x)

    # ------------------------------------------------------------------ unet
    def unet_fn(self, params):
        """``(latents, timesteps, context, policy, step) -> (eps, aux)`` closing over params."""
        module = self.unet
        dtype = self.dtype

        def fn(x, t, ctx, policy, step):
            out, aux = module.apply({"params": params}, x.astype(dtype), t,
                                    ctx.astype(dtype), policy=policy, step=step)
            return out, aux

        return fn

    def sites(self, height: int | None = None, width: int | None = None) -> list[AttentionSite]:
        """Every attention site of the UNet in call order, for an image of ``height×width`` px."""
        h = (height or self.default_size) // self.vae_scale_factor
        w = (width or self.default_size) // self.vae_scale_factor
        key = ("sites", h, w)
        if key not in self._cache:  # tracing the UNet shape-only costs ~0.5 s: do it once
            self._cache[key] = unet_lib.list_sites(self.unet_config, sample_size=(h, w))
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
            cfg = cfg.replace(kind=scheduler)
        if eta is not None:
            cfg = cfg.replace(eta=float(eta))
        return sch.make_schedule(cfg, int(num_inference_steps))

    def _sample_fn(self, do_cfg: bool, aux_fns=None):
        key = ("sample", do_cfg, aux_fns)
        if key not in self._cache:
            def run(params, schedule, latents, cond, uncond, gs, keys, policy, uncond_steps,
                    guidance, gr):
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
                    guidance=guidance, guidance_rescale=gr)

            self._cache[key] = jax.jit(run)
        return self._cache[key]

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
          prompt_embeds / uncond_embeds: ``(B, 77, D)`` embeddings replacing the prompts.
          uncond_per_step: ``(steps, B, 77, D)`` per-step unconditional embeddings
            (null-text inversion).
          guidance: :class:`jattn.sampling.guidance.Guidance`: a loss on recorded attention,
            a gradient step on the latents inside the loop.
          guidance_rescale: phi in [0, 1] (diffusers' ``guidance_rescale``; Lin et al. 2024
            suggest 0.7 for zero-terminal-SNR models): CFG output rescaled towards the
            conditional output's standard deviation; 0 (default) is plain CFG.
          decode: decode latents to images (else ``images`` is None).
        Returns:
          :class:`GenerateOutput`.
        Raises:
          ValueError: prompts over 77 tokens, sizes not multiples of 8, latents of the wrong
            shape, negative prompts of the wrong count, guidance_rescale outside [0, 1].
        """
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale={guidance_rescale}: must be in [0, 1] "
                             "(0 = plain CFG; 0.7 is Lin et al.'s value).")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        b = len(prompts) if prompt_embeds is None else prompt_embeds.shape[0]
        height = height or self.default_size
        width = width or self.default_size
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height={height}, width={width}: must be multiples of {f}.")
        h, w, c = height // f, width // f, self.unet_config.in_channels
        if isinstance(seed, int):
            seeds = [seed + i for i in range(b)]
        else:
            seeds = list(seed)
            if len(seeds) != b:
                raise ValueError(f"seed: got {len(seeds)} seeds for {b} prompts; give one per "
                                 "prompt or a single int.")
        do_cfg = guidance_scale > 1.0 or uncond_per_step is not None
        cond = prompt_embeds if prompt_embeds is not None else self.encode_prompts(prompts)
        uncond = None
        if do_cfg and uncond_per_step is None:
            if uncond_embeds is not None:
                uncond = uncond_embeds
            else:
                negs = negative_prompt if negative_prompt is not None else ""
                negs = [negs] * b if isinstance(negs, str) else list(negs)
                if len(negs) != b:
                    raise ValueError(f"negative_prompt: got {len(negs)} for {b} prompts; give "
                                     "one string or one per prompt.")
                uncond = self.encode_prompts(negs)
        else:
            uncond = cond  # placeholder, unused without CFG (keeps one signature)
        schedule = self.schedule(num_inference_steps, scheduler, eta)
        keys = sampler_lib.per_sample_keys(np.asarray(seeds, np.uint32))
        if latents is None:
            x = sampler_lib.initial_noise(keys, (h, w, c))
        else:
            latents = np.asarray(latents, np.float32)
            if latents.shape != (b, c, h, w):
                raise ValueError(f"latents: shape {latents.shape}, expected {(b, c, h, w)} "
                                 "(B, C, h, w) = NCHW unscaled noise as diffusers' latents=.")
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
            unet_params = self._replicated(mesh)
        final, aux = fn(unet_params, schedule, x, cond, uncond, gs, keys, policy,
                        uncond_per_step, guidance, jnp.asarray(guidance_rescale, jnp.float32))
        images = self.decode(final) if decode else None
        return GenerateOutput(images=images,
                              latents=np.asarray(final, np.float32).transpose(0, 3, 1, 2),
                              aux=aux)


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
    """Load a diffusers-layout Stable Diffusion checkpoint.

    Args:
      model: a local folder, a Hugging Face hub id (fetched with huggingface_hub when
        online), or ``None`` for the bundled model.
      dtype: "float32", "bfloat16" or "float16": parameter and computation dtype.
      allow_pickle: accept ``.bin``/``.ckpt`` pickle weights (refused by default).
      revision, variant: hub revision; weight-file variant (e.g. "fp16").
    Returns:
      :class:`Pipeline`.
    Raises:
      CheckpointNotFoundError: missing folder/files (names them) or hub unreachable.
      PickleRefusedError: only pickle weights and ``allow_pickle`` is False.
      CheckpointMismatchError: weights do not fit the config (lists every key).
    """
    dt = _as_dtype(dtype)
    if model is None:
        folder = bundled_model_path()
        if not (folder / "unet").is_dir():
            raise ckpt.CheckpointNotFoundError(
                f"the bundled model is not present in {folder}; pass model=PATH_OR_HUB_ID "
                "(CLI: --model).")
    else:
        folder = ckpt.resolve_checkpoint(model, revision=revision)
    index = json.loads((folder / "model_index.json").read_text())
    for comp in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if comp not in index:
            warnings.warn(f"model_index.json has no {comp!r} entry; reading {comp}/ anyway")
    unet_cfg = unet_lib.UNetConfig.from_diffusers(ckpt.read_config(folder, "unet"))
    vae_cfg = vae_lib.VAEConfig.from_diffusers(ckpt.read_config(folder, "vae"))
    text_cfg = clip_lib.CLIPTextConfig.from_transformers(ckpt.read_config(folder, "text_encoder"))
    sched_cfg = sch.SchedulerConfig.from_diffusers(ckpt.read_config(folder, "scheduler"))
    params = {
        "unet": unet_lib.convert_unet_state_dict(
            ckpt.load_state_dict(folder, "unet", allow_pickle=allow_pickle, variant=variant),
            unet_cfg),
        "vae": vae_lib.convert_vae_state_dict(
            ckpt.load_state_dict(folder, "vae", allow_pickle=allow_pickle, variant=variant),
            vae_cfg),
        "text_encoder": clip_lib.convert_clip_text_state_dict(
            ckpt.load_state_dict(folder, "text_encoder", allow_pickle=allow_pickle,
                                 variant=variant), text_cfg),
    }
    params = _cast_tree(params, dt)
    from jattn.io.tokenizer import load_tokenizer

    tok_dir = folder / "tokenizer"
    if not tok_dir.is_dir():
        raise ckpt.CheckpointNotFoundError(f"{tok_dir}: missing (vocab.json, merges.txt).")
    tokenizer = load_tokenizer(tok_dir)
    return Pipeline(unet_cfg, vae_cfg, text_cfg, sched_cfg, tokenizer, params, dt, str(folder))
