"""The text-to-image pipeline: params + configs + tokenizer + scheduler config.

``jattn.load(path_or_hub_id)`` returns a :class:`Pipeline`; ``Pipeline.generate`` runs text
encoding, the compiled sampler loop and VAE decoding, each under ``jax.jit``. Compiled
programs are cached per static configuration (image size, steps, scheduler kind, CFG on/off,
batch size, policy structure), so new prompts, seeds, guidance scales or policy arrays
never recompile.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jattn.io import checkpoint as ckpt
from jattn.io import checks, interrupt
from jattn.models import clip_text as clip_lib
from jattn.models import unet as unet_lib
from jattn.models import vae as vae_lib
from jattn.models.attention import AttentionSite
from jattn.policy.core import Policy
from jattn.sampling import sampler as sampler_lib
from jattn.sampling import schedulers as sch

__all__ = ["Pipeline", "GenerateOutput", "load", "bundled_model_path", "DTYPES"]

SCHEDULERS = tuple(sch.SCHEDULER_NAMES)  # kinds + presets ("euler-ancestral", "dpm++2m-karras")
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
    def tokenize(self, prompts: list[str], name: str = "prompt") -> np.ndarray:
        """Token ids ``(B, 77)`` int32; raises ValueError for prompts over 77 tokens."""
        from jattn.io.tokenizer import tokenize

        return tokenize(self.tokenizer, prompts, max_length=self.text_config.max_position_embeddings,
                        name=name)

    def _text_fn(self):
        if "text" not in self._cache:
            module = self.text_encoder

            def encode(params, ids):
                self._count("text")
                return module.apply({"params": params}, ids)["last_hidden_state"]

            self._cache["text"] = jax.jit(encode)
        return self._cache["text"]

    def encode_prompts(self, prompts: list[str], name: str = "prompt") -> jax.Array:
        """Prompt embeddings ``(B, 77, D)`` (last hidden state of the text encoder)."""
        ids = jnp.asarray(self.tokenize(list(prompts), name=name))
        return self._text_fn()(self.params["text_encoder"], ids)

    # ------------------------------------------------------------------ vae
    def decoder_program(self):
        """The VAE decode as a pure, un-jitted function ``(vae_params, latents) -> images``
        (scaled latents float ``(B, h, w, C)`` -> uint8 ``(B, H, W, 3)``), to compose into a
        larger compiled program (e.g. :mod:`jattn.batch`'s micro-batched job program);
        :meth:`decode` runs it jitted."""
        cfg = self.vae_config

        def decode(params, latents_nhwc):
            self._count("decode")
            x = vae_lib.decode_latents(params, cfg, latents_nhwc.astype(self.dtype))
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

            def encode(params, images):
                self._count("encode")
                return vae_lib.encode_latents(params, cfg, images.astype(self.dtype)).astype(
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
        """``(latents, timesteps, context, policy, step) -> (eps, aux)`` closing over params."""
        module = self.unet
        dtype = self.dtype

        def fn(x, t, ctx, policy, step):
            interrupt.check_in_graph()  # Ctrl-C stops here when enabled (jattn.io.interrupt)
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
            b = int(np.shape(prompt_embeds)[0])
        if np.dtype(self.dtype) == np.float16 and jax.default_backend() == "cpu":
            raise ValueError("dtype=float16: XLA on CPU has no float16 matrix products; load "
                             "with dtype='bfloat16' (same memory) or 'float32' on CPU.")
        seeds = checks.seed_list(seed, b)
        steps = checks.whole_number(num_inference_steps, "num_inference_steps", minimum=1,
                                    maximum=self.scheduler_config.num_train_timesteps)
        return b, prompts, seeds, self.check_size(height, width, b), steps

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
          hooks: :class:`jattn.sampling.sampler.SamplerHooks` (per-step noise maps, start
            step), passed to the sampler loop as is.
        Returns:
          :class:`GenerateOutput`.
        Raises:
          TypeError: a prompt that is not a string, a seed or step count that is not an int.
          ValueError: an empty prompt list, prompts over 77 tokens; sizes not multiples of
            the VAE factor, below :meth:`min_size` or too large for the device's memory;
            seeds outside ``[0, 2**32 - 1]`` (also ``seed + i``); a step count < 1, not
            whole or over the training timesteps; a negative or non-finite guidance scale
            or eta; guidance_rescale outside [0, 1]; latents of the wrong shape, not float
            or not finite; negative prompts of the wrong count; float16 on CPU.
        """
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
        cond = prompt_embeds if prompt_embeds is not None else self.encode_prompts(prompts)
        uncond = None
        if do_cfg and uncond_per_step is None:
            if uncond_embeds is not None:
                uncond = uncond_embeds
            else:
                negs = checks.prompt_list(negative_prompt if negative_prompt is not None
                                          else "", "negative_prompt")
                negs = negs * b if isinstance(negative_prompt, (str, type(None))) else negs
                if len(negs) != b:
                    raise ValueError(f"negative_prompt: got {len(negs)} for {b} prompts; give "
                                     "one string or one per prompt.")
                uncond = self.encode_prompts(negs, name="negative_prompt")
        else:
            uncond = cond  # placeholder, unused without CFG (keeps one signature)
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
      TypeError / ValueError: a bad ``model=``, ``dtype=``, ``allow_pickle=``,
        ``revision=`` or ``variant=`` argument (names it and what is accepted).
      CheckpointNotFoundError: missing folder/files (names them) or hub unreachable.
      CheckpointDamagedError: a truncated/corrupted file, invalid JSON, NaN/inf weights,
        a directory where a file belongs, an unreadable file (names the file).
      CheckpointConfigError: a config value of the wrong type or out of range, or a
        required key missing (names the file, the key and what is expected).
      CheckpointUnsupportedError: a valid config asking for a feature jattn lacks.
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
    for comp in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if comp not in index:
            warnings.warn(f"model_index.json has no {comp!r} entry; reading {comp}/ anyway")
    unet_cfg = ckpt.parse_config(folder, "unet", unet_lib.UNetConfig.from_diffusers)
    vae_cfg = ckpt.parse_config(folder, "vae", vae_lib.VAEConfig.from_diffusers)
    text_cfg = ckpt.parse_config(folder, "text_encoder",
                                 clip_lib.CLIPTextConfig.from_transformers)
    sched_cfg = ckpt.parse_config(folder, "scheduler", sch.SchedulerConfig.from_diffusers)
    from jattn.io.tokenizer import MAX_LENGTH, load_tokenizer

    tok_dir = folder / "tokenizer"
    if not tok_dir.is_dir():
        raise ckpt.CheckpointNotFoundError(
            f"{tok_dir}: missing folder (vocab.json, merges.txt). Fix: copy or download the "
            "checkpoint's tokenizer/ folder.")
    tokenizer = load_tokenizer(tok_dir)
    # components that load one by one but cannot work together (silent clamping or a
    # shape error deep inside jit otherwise)
    clash = []
    if unet_cfg.cross_attention_dim != text_cfg.hidden_size:
        clash.append(f"unet/config.json cross_attention_dim={unet_cfg.cross_attention_dim} but "
                     f"text_encoder/config.json hidden_size={text_cfg.hidden_size}")
    if not unet_cfg.in_channels == unet_cfg.out_channels == vae_cfg.latent_channels:
        clash.append(f"unet/config.json in_channels={unet_cfg.in_channels}, out_channels="
                     f"{unet_cfg.out_channels} but vae/config.json latent_channels="
                     f"{vae_cfg.latent_channels} (inpainting/depth UNets with extra input "
                     "channels are not supported)")
    if text_cfg.max_position_embeddings < MAX_LENGTH:
        clash.append(f"text_encoder/config.json max_position_embeddings="
                     f"{text_cfg.max_position_embeddings} < the {MAX_LENGTH} tokens per prompt")
    if len(tokenizer) > text_cfg.vocab_size:
        clash.append(f"tokenizer/ has {len(tokenizer)} tokens but text_encoder/config.json "
                     f"vocab_size={text_cfg.vocab_size}")
    if clash:
        raise ckpt.CheckpointMismatchError(
            f"{folder}: the components do not belong together: " + "; ".join(clash)
            + ". Fix: take every component folder from the same checkpoint.")
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
    return Pipeline(unet_cfg, vae_cfg, text_cfg, sched_cfg, tokenizer, params, dt, str(folder))
