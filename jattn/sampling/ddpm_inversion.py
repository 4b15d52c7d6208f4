"""Edit-friendly DDPM inversion: per-step noise maps that regenerate a real image exactly.

Source: Huberman-Spiegelglas, Kulikov, Michaeli, "An Edit Friendly DDPM Noise Space:
Inversion and Manipulations" (CVPR 2024), Algorithm 1; reference inbarhub/DDPM_inversion
``ddm_inversion/inversion_utils.py`` (``sample_xts_from_x0``, ``inversion_forward_process``,
``inversion_reverse_process``), used as is by Cross-Image Attention
(garibida/cross-image-attention ``utils/ddpm_inversion.py``: 100 steps, source CFG 3.5,
regeneration from ``xts[skip]`` with ``zs[skip:]``, skip 32).

Algorithm, per image, with the stochastic scheduler of the loop (the reference's
``DDIMScheduler`` with eta 1; DDPM works the same way):

1. ``x_0`` = VAE posterior mean × scaling factor; for every step index ``i`` draw
   ``x_i = sqrt(ᾱ_{t_i}) x_0 + sqrt(1 − ᾱ_{t_i}) ε_i`` with ``ε_i`` independent for each step
   (``x_n = x_0``) — not a Markov chain, which is what makes the noise space edit-friendly;
2. for every ``i``: ``ε̂ = CFG(UNet(x_i, t_i))`` with the source prompt, ``μ_i`` = the
   scheduler step from ``x_i`` with zero variance noise, ``z_i = (x_{i+1} − μ_i) / σ_i``.

Then the sampler loop started at ``x_skip`` with ``SamplerHooks(noise=z, start_step=skip)``
takes exactly the steps ``x_i → μ_i + σ_i z_i = x_{i+1}`` and lands on ``x_0`` (to float32
rounding) with the source prompt; another prompt or an attention policy edits the image.
The loop over steps is a ``lax.scan``, ``vmap`` ped over images, one PRNG key per image
(image b's noise depends on its seed only).

Reference quirks (``reference_quirks=True``; default off): the reference sets the last
noise map to zero (``zs[-1] = 0``), so the regeneration ends on ``μ_{n-1}`` instead of
``x_0``. Its DDIM direction term uses ``1 − ᾱ_prev − η·var`` where diffusers (and jattn)
use ``η²·var``; the two agree at the reference's η = 1 (jattn follows diffusers).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jattn.sampling import schedulers as sch
from jattn.sampling.sampler import SamplerHooks, guided_eps, per_sample_keys

Array = jax.Array

__all__ = ["DDPMInversion", "ddpm_inversion_loop", "ddpm_invert", "regenerate"]


@dataclasses.dataclass
class DDPMInversion:
    """Result of :func:`ddpm_invert` (host arrays, NHWC latents).

    Attributes:
      x_ts: float32 ``(n+1, B, h, w, C)``: ``x_ts[i]`` the latents before step index ``i``
        (at ``timesteps[i]``), ``x_ts[n]`` = ``latents0``.
      noise_maps: float32 ``(n, B, h, w, C)``: ``z_i``, the variance noise of step ``i``.
      latents0: float32 ``(B, h, w, C)`` the encoded images (scaled posterior mean).
      prompts: the source prompt per image; guidance_scale: the source CFG scale.
      num_inference_steps: as requested (the schedule has ``n`` = ``len(noise_maps)``
        steps; "trailing" spacing sometimes gives one more); skip: default first step of
        :func:`regenerate`.
      scheduler, eta: the scheduler of the inversion (regenerate with the same).
      seeds: the seed of each image.
    """

    x_ts: np.ndarray
    noise_maps: np.ndarray
    latents0: np.ndarray
    prompts: list[str]
    num_inference_steps: int
    guidance_scale: float
    skip: int
    scheduler: str
    eta: float | None
    seeds: list[int]

    def _skip(self, skip: int | None) -> int:
        skip = self.skip if skip is None else skip
        n = self.noise_maps.shape[0]
        if not isinstance(skip, (int, np.integer)) or not 0 <= skip < n:
            raise ValueError(f"skip={skip!r}: must be an int in [0, {n}) (the number of "
                             "denoising steps)")
        return int(skip)

    def x_start(self, skip: int | None = None) -> np.ndarray:
        """``x_ts[skip]`` as NCHW ``(B, C, h, w)`` (``generate``'s ``latents=``; the
        init sigma of DDIM/DDPM is 1)."""
        return self.x_ts[self._skip(skip)].transpose(0, 3, 1, 2)

    def hooks(self, skip: int | None = None) -> SamplerHooks:
        """The sampler hooks that replay the inversion from step ``skip``."""
        return SamplerHooks(noise=jnp.asarray(self.noise_maps), start_step=self._skip(skip))


def ddpm_inversion_loop(unet_fn, schedule: sch.Schedule, z0: Array, cond: Array,
                        uncond: Array | None, guidance_scale: Array, key: Array, *,
                        reference_quirks: bool = False) -> tuple[Array, Array]:
    """Edit-friendly DDPM inversion of ONE image (batch axis of 1; ``vmap`` it).

    Args:
      unet_fn: the sampler's :data:`jattn.sampling.sampler.UNetFn`.
      schedule: a stochastic schedule ("ddpm", or "ddim" with eta > 0).
      z0: ``(1, h, w, C)`` clean latents; cond / uncond: ``(1, S, D)`` (uncond None: no
        CFG); guidance_scale: () the source CFG scale; key: one PRNG key.
    Returns:
      ``(x_ts (n+1, 1, h, w, C), noise maps (n, 1, h, w, C))``, float32.
    """
    n = schedule.timesteps.shape[0]
    z0 = z0.astype(jnp.float32)
    eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), z0.shape))(
        jnp.arange(n))                                                  # (n, 1, h, w, C)
    x_ts = jax.vmap(lambda e, t: sch.add_noise(schedule, z0, e, t))(eps, schedule.timesteps)
    x_ts = jnp.concatenate([x_ts, z0[None]], axis=0)                    # (n+1, 1, h, w, C)
    state = sch.init_state(schedule, z0)
    zero = jnp.zeros_like(z0)

    def body(_, i):
        x = x_ts[i]
        e, _ = guided_eps(unet_fn, sch.scale_model_input(schedule, x, i), schedule.timesteps[i],
                          cond, uncond, guidance_scale, jnp.float32(0.0), None, i)
        mean, _, _ = sch.step(schedule, state, e, i, x, noise=zero)
        std = schedule.coef["std"][i]
        z = jnp.where(std > 0, (x_ts[i + 1] - mean) / jnp.where(std > 0, std, 1.0), 0.0)
        return None, z

    _, zs = jax.lax.scan(body, None, jnp.arange(n))
    if reference_quirks:
        zs = zs.at[-1].set(0.0)
    return x_ts, zs


def _images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: shape {images.shape}, expected (B, H, W, 3) uint8")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.number) or images.min() < 0 or images.max() > 255:
            raise ValueError(f"images: dtype {images.dtype} with values outside 0..255; "
                             "expected uint8 (B, H, W, 3)")
        images = images.astype(np.uint8)
    return images


def ddpm_invert(pipe, images_uint8, prompts: str | list[str], *,
                num_inference_steps: int = 100, guidance_scale: float = 3.5, skip: int = 0,
                seed: int | list[int] = 0, scheduler: str = "ddim", eta: float = 1.0,
                reference_quirks: bool = False) -> DDPMInversion:
    """Edit-friendly DDPM inversion of real images (module docstring).

    Args:
      pipe: a :class:`jattn.pipeline.Pipeline` (its scheduler config's betas and spacing).
      images_uint8: uint8 ``(B, H, W, 3)`` (or one ``(H, W, 3)``), a size the model takes.
      prompts: the source prompt of each image (a str for all); "" as in the reference's
        default.
      num_inference_steps: n (the reference: 100).
      guidance_scale: source CFG scale (the reference's ``cfg_scale_src`` 3.5); CFG runs
        when it is > 1 (against the "" embedding), as in ``generate``.
      skip: the default first step of :func:`regenerate` (Cross-Image Attention: 32 of
        100); the noise maps of every step are computed whatever it is.
      seed: int (image b uses seed + b) or one per image: the noise of ``x_i``.
      scheduler: "ddim" (the reference's, with ``eta``) or "ddpm".
      eta: DDIM's eta, > 0 (the reference: 1); ignored for "ddpm".
      reference_quirks: zero the last noise map as the reference does.
    Returns:
      :class:`DDPMInversion`.
    Raises:
      ValueError: images not (B, H, W, 3) uint8-like; prompt or seed count; scheduler not
        "ddim"/"ddpm"; eta <= 0 with "ddim"; skip outside [0, n); num_inference_steps < 1.
    """
    images = _images(images_uint8)
    b = images.shape[0]
    prompts = [prompts] * b if isinstance(prompts, str) else list(prompts)
    if len(prompts) != b:
        raise ValueError(f"prompts: {len(prompts)} prompts for {b} images")
    seeds = [seed + k for k in range(b)] if isinstance(seed, (int, np.integer)) else list(seed)
    if len(seeds) != b:
        raise ValueError(f"seed: {len(seeds)} seeds for {b} images; give one int or one each")
    if scheduler not in ("ddim", "ddpm"):
        raise ValueError(f"scheduler={scheduler!r}: DDPM inversion needs a stochastic "
                         "scheduler, 'ddim' (with eta > 0) or 'ddpm'")
    if scheduler == "ddim" and not eta > 0:
        raise ValueError(f"eta={eta!r}: must be > 0 for DDPM inversion with 'ddim' "
                         "(the reference uses 1)")
    if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps!r}: must be an int >= 1")
    eta = float(eta) if scheduler == "ddim" else None
    schedule = pipe.schedule(num_inference_steps, scheduler, eta)
    n = int(schedule.timesteps.shape[0])
    if not isinstance(skip, (int, np.integer)) or not 0 <= skip < n:
        raise ValueError(f"skip={skip!r}: must be an int in [0, {n})")
    do_cfg = guidance_scale > 1.0
    z0 = pipe.encode_images(images)
    from jattn.sampling.inversion import conditioning  # SDXL: + the image's time_ids

    hw = tuple(np.shape(images)[1:3])
    cond = conditioning(pipe, prompts, *hw)
    uncond = conditioning(pipe, [""] * b, *hw) if do_cfg else cond  # placeholder w/o CFG
    keys = per_sample_keys(np.asarray(seeds, np.uint32))
    cache_key = ("ddpm_invert", do_cfg, bool(reference_quirks))
    if cache_key not in pipe._cache:
        def run(params, schedule, z0, cond, uncond, gs, keys):
            pipe._count("ddpm_invert")
            fn = pipe.unet_fn(params)

            def one(z, c, u, k):  # one image: add the batch axis of 1 (SDXL: each leaf)
                add = lambda tree: jax.tree_util.tree_map(lambda a: a[None], tree)  # noqa: E731
                x_ts, zs = ddpm_inversion_loop(fn, schedule, z[None], add(c),
                                               add(u) if do_cfg else None, gs, k,
                                               reference_quirks=reference_quirks)
                return x_ts[:, 0], zs[:, 0]

            return jax.vmap(one, out_axes=(1, 1))(z0, cond, uncond, keys)

        pipe._cache[cache_key] = jax.jit(run)
    x_ts, zs = pipe._cache[cache_key](pipe.params["unet"], schedule, z0, cond, uncond,
                                      jnp.float32(guidance_scale), keys)
    x_ts = np.asarray(x_ts, np.float32)
    return DDPMInversion(x_ts=x_ts, noise_maps=np.asarray(zs, np.float32),
                         latents0=x_ts[-1], prompts=prompts,
                         num_inference_steps=int(num_inference_steps),
                         guidance_scale=float(guidance_scale), skip=int(skip),
                         scheduler=scheduler, eta=eta, seeds=[int(s) for s in seeds])


def regenerate(pipe, inv: DDPMInversion, prompts: str | list[str] | None = None, *,
               guidance_scale: float | None = None, skip: int | None = None, **generate_kwargs):
    """Run the sampler loop from ``inv.x_ts[skip]`` with the inversion's noise maps
    (the reference's ``inversion_reverse_process(xT=wts[skip], zs=zs[skip:])``).

    With the source prompts and scale (the defaults) the result's latents are
    ``inv.latents0`` to float32 rounding; other prompts (the reference's target prompt and
    ``cfg_scale_tar``), a ``policy=`` or other ``generate`` arguments edit the image.

    Args:
      pipe: the pipeline of the inversion.
      inv: from :func:`ddpm_invert`.
      prompts: one per image (default: the source prompts).
      guidance_scale: default the inversion's.
      skip: first step index (default ``inv.skip``).
      generate_kwargs: passed to ``pipe.generate`` (policy, decode, …).
    Returns:
      ``pipe.generate``'s output.
    Raises:
      ValueError: skip outside [0, n); what ``generate`` raises.
    """
    prompts = inv.prompts if prompts is None else prompts
    return pipe.generate(
        prompts, num_inference_steps=inv.num_inference_steps,
        guidance_scale=inv.guidance_scale if guidance_scale is None else guidance_scale,
        scheduler=inv.scheduler, eta=inv.eta, seed=inv.seeds, latents=inv.x_start(skip),
        hooks=inv.hooks(skip), **generate_kwargs)
