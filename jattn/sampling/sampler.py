"""The one sampler loop: ``lax.scan`` over denoising steps, CFG, policies, per-sample keys.

Every generation and every editing method of jattn runs through :func:`sample`; methods
differ only in the policy, the guidance hook and the per-step callback they pass.

Batch layout: latents ``(B, h, w, C)`` NHWC inside jattn (the pipeline converts from/to
diffusers' NCHW at the API boundary). With classifier-free guidance the UNet sees the
batch ``[uncond (B); cond (B)]`` (diffusers' order), i.e. ``2B`` rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jattn.sampling import schedulers as sch

Array = jax.Array

__all__ = ["sample", "per_sample_keys", "initial_noise", "UNetFn"]

# unet_fn(latents (B', h, w, C), timesteps (B',), context (B', S, D), policy, step)
#   -> (eps (B', h, w, C), aux dict)
UNetFn = Callable[[Array, Array, Array, Any, Array], tuple[Array, dict]]


def per_sample_keys(seeds: Array) -> Array:
    """One PRNG key per sample from integer seeds ``(B,)`` (image i depends on seed i only)."""
    return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


def initial_noise(keys: Array, shape_hwc: tuple[int, int, int], dtype=jnp.float32) -> Array:
    """Unit Gaussian latents ``(B, h, w, C)``, sample b drawn from ``keys[b]`` only."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0x1A7E), shape_hwc,
                                                dtype))(keys)


def _step_keys(keys: Array, i: Array) -> Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, i + 1))(keys)


def _rescale_cfg(out: Array, cond_out: Array, phi: Array) -> Array:
    """Guidance rescale (Lin et al. 2024, eq. 15-16): per sample, over (h, w, C)."""
    axes = tuple(range(1, out.ndim))
    ratio = jnp.std(cond_out, axis=axes, keepdims=True) / jnp.std(out, axis=axes, keepdims=True)
    # where: phi = 0 stays exactly plain CFG, also where std(out) = 0 makes the ratio inf
    return jnp.where(phi > 0, phi * out * ratio + (1.0 - phi) * out, out)


def sample(
    unet_fn: UNetFn,
    schedule: sch.Schedule,
    latents: Array,
    cond: Array,
    uncond: Array | None,
    guidance_scale: Array | float,
    keys: Array,
    *,
    policy: Any = None,
    aux_init: Any = None,
    aux_update: Callable[[Any, dict, Array], Any] | None = None,
    callback: Callable[[dict], dict] | None = None,
    uncond_per_step: Array | None = None,
    guidance: Any = None,
    guidance_rescale: Array | float = 0.0,
) -> tuple[Array, Any]:
    """Run the denoising loop. Pure; call it under ``jax.jit``.

    Args:
      unet_fn: see :data:`UNetFn` (closes over the UNet params).
      schedule: from :func:`jattn.sampling.schedulers.make_schedule` (static kind/steps).
      latents: ``(B, h, w, C)`` initial latents already multiplied by
        ``schedule.init_noise_sigma`` (or the inverted latents for real-image editing).
      cond: ``(B, S, D)`` prompt embeddings.
      uncond: ``(B, S, D)`` negative/unconditional embeddings, or ``None`` for no CFG.
      guidance_scale: CFG scale (scalar or ``(B,)``), traced: changing it never recompiles.
      keys: ``(B,)`` PRNG keys, one per sample (stochastic schedulers fold in the step).
      policy: attention policy passed to every UNet call with the step index.
      aux_init / aux_update: in-graph aggregation of what the policy records:
        ``aux_update(acc, aux_of_this_step, i) -> acc``; ``acc`` starts as ``aux_init``.
      callback: per-step pure function on the carried state dict
        ``{"latents", "step", "x0", "aux"}`` returning the same structure (e.g. local blend,
        latent re-imposition).
      uncond_per_step: ``(n_steps, B, S, D)`` unconditional embeddings per step (null-text
        inversion); overrides ``uncond``.
      guidance: a :class:`jattn.sampling.guidance.Guidance` (attention loss, gradient step
        on the latents before each denoising step where its step size is non-zero).
      guidance_rescale: phi in [0, 1], traced: the CFG output is rescaled to the standard
        deviation (over h, w, C) of the conditional output and mixed back,
        ``phi * cfg * std(cond) / std(cfg) + (1 - phi) * cfg`` (Lin et al. 2024, sec. 3.4,
        against over-exposure of zero-terminal-SNR models; diffusers' ``guidance_rescale``,
        ``rescale_noise_cfg``); 0 leaves CFG as is.
    Returns:
      ``(final latents (B, h, w, C), aggregated aux)``.
    """
    do_cfg = uncond is not None or uncond_per_step is not None
    gs = jnp.asarray(guidance_scale, jnp.float32)
    if gs.ndim == 1:
        gs = gs[:, None, None, None]
    gr = jnp.asarray(guidance_rescale, jnp.float32)
    n = schedule.timesteps.shape[0]
    b = latents.shape[0]
    latents = latents.astype(jnp.float32)  # the carry stays float32 whatever the UNet dtype
    state0 = sch.init_state(schedule, latents)

    def body(carry, i):
        x, state, acc = carry
        t = schedule.timesteps[i]
        if guidance is not None:
            from jattn.sampling.guidance import apply_guidance

            x, _ = jax.lax.cond(
                guidance.step_size[i] != 0,
                lambda z: apply_guidance(guidance, unet_fn,
                                         lambda y: sch.scale_model_input(schedule, y, i),
                                         z, t, cond, i),
                lambda z: (z, jnp.zeros((), jnp.float32)), x)
        x_in = sch.scale_model_input(schedule, x, i)
        if do_cfg:
            u = uncond_per_step[i] if uncond_per_step is not None else uncond
            x_in = jnp.concatenate([x_in, x_in], axis=0)
            ctx = jnp.concatenate([u, cond], axis=0)
        else:
            ctx = cond
        tt = jnp.broadcast_to(t, (x_in.shape[0],))
        eps, aux = unet_fn(x_in, tt, ctx, policy, i)
        eps = eps.astype(jnp.float32)
        if do_cfg:
            e_u, e_c = eps[:b], eps[b:]
            eps = e_u + gs * (e_c - e_u)
            eps = _rescale_cfg(eps, e_c, gr)
        x_new, state, x0 = sch.step(schedule, state, eps, i, x, key=_step_keys(keys, i))
        if aux_update is not None:
            acc = aux_update(acc, aux, i)
        if callback is not None:
            out = callback({"latents": x_new, "step": i, "x0": x0, "aux": acc})
            x_new, acc = out["latents"], out["aux"]
        return (x_new, state, acc), None

    (x, _, acc), _ = jax.lax.scan(body, (latents, state0, aux_init), jnp.arange(n))
    return x, acc
