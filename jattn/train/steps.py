"""Losses and jitted train steps of the bundled model (VAE; UNet + text encoder).

A train state is a dict of arrays ``{"params", "ema", "opt_state", "step"}`` (a pytree
that Orbax saves and restores as is). A train step is ``jit``-compiled once per stage
config and is a pure function of ``(state, batch)``: its randomness (posterior samples,
timesteps, noise, caption dropout) comes from ``fold_in(key(seed), step)``, so the same
state and batch give the same new state, bit for bit.

Legend: B batch, h/w latent cells, C latent channels, S tokens, D text width.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jattn.models import clip_text as clip_lib
from jattn.models import unet as unet_lib
from jattn.models import vae as vae_lib
from jattn.train.config import DiffusionStageConfig, VAEStageConfig

Array = jax.Array

__all__ = ["lr_schedule", "make_optimizer", "decay_mask", "ema_update", "init_state",
           "alphas_cumprod", "vae_loss", "make_vae_step", "diffusion_loss",
           "make_diffusion_step", "vae_config_of", "unet_config_of", "text_config_of"]

_VAE_STREAM, _DIFFUSION_STREAM = 11, 12


def vae_config_of(stage: VAEStageConfig) -> vae_lib.VAEConfig:
    return vae_lib.VAEConfig(**dict(stage.model))


def unet_config_of(stage: DiffusionStageConfig) -> unet_lib.UNetConfig:
    return unet_lib.UNetConfig(**dict(stage.unet))


def text_config_of(stage: DiffusionStageConfig) -> clip_lib.CLIPTextConfig:
    return clip_lib.CLIPTextConfig(**dict(stage.text_encoder))


# ----------------------------------------------------------------------------- optimizer
def lr_schedule(lr: float, warmup_steps: int, steps: int, end_fraction: float,
                kind: str = "cosine") -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then constant (``kind="constant"``) or cosine decay
    to ``lr * end_fraction`` at ``steps``.

    Raises:
      ValueError: unknown kind.
    """
    if kind == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(int(warmup_steps), 1)), optax.constant_schedule(lr)],
            [max(int(warmup_steps), 1)])
    if kind != "cosine":
        raise ValueError(f"lr schedule {kind!r}: use constant or cosine")
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, max(int(warmup_steps), 1), max(int(steps), int(warmup_steps) + 1),
        end_value=lr * end_fraction)


def decay_mask(params) -> dict:
    """True for the leaves weight decay applies to: conv and dense ``kernel``s only (not
    embeddings, norm scales or biases)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_optimizer(schedule: optax.Schedule, weight_decay: float, grad_clip: float | None
                   ) -> optax.GradientTransformation:
    """AdamW (b1 0.9, b2 0.999, eps 1e-8) with kernel-only decay, after global-norm clipping."""
    parts = []
    if grad_clip:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)


def ema_update(ema, params, decay: float, step: Array):
    """``ema <- d * ema + (1 - d) * params`` with ``d = min(decay, (1 + step) / (10 + step))``
    (the usual warmup, so early EMA weights are not dominated by the initialisation)."""
    step = step.astype(jnp.float32)
    d = jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))
    return jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def init_state(params, tx: optax.GradientTransformation) -> dict:
    """A fresh train state (step 0; EMA starts at the initial params)."""
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return {"params": params,
            "ema": jax.tree_util.tree_map(jnp.copy, params),
            "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32)}


def _step_key(seed: int, stream: int, step: Array) -> Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), step)


# ----------------------------------------------------------------------------- VAE
def vae_loss(params, config: vae_lib.VAEConfig, images: Array, key: Array, *,
             l1_weight: float, mse_weight: float, kl_weight: float) -> tuple[Array, dict]:
    """KL-regularised autoencoder loss (Rombach et al. 2022, without the GAN/LPIPS terms).

    Args:
      images: float32 ``(B, H, W, 3)`` in [-1, 1].
      key: PRNG key of the posterior sample ``z = mean + std * eps``.
    Returns:
      (loss scalar, ``{"l1", "mse", "kl"}``): l1/mse are means over pixels, kl is the sum
      over latent cells of ``KL(N(mean, std^2) || N(0, 1))`` averaged over the batch.
    """
    model = vae_lib.AutoencoderKL(config)
    mean, std = model.apply({"params": params}, images, method=vae_lib.AutoencoderKL.encode)
    z = mean + std * jax.random.normal(key, mean.shape, mean.dtype)
    recon = model.apply({"params": params}, z, method=vae_lib.AutoencoderKL.decode)
    err = recon - images
    l1 = jnp.mean(jnp.abs(err))
    mse = jnp.mean(jnp.square(err))
    var = jnp.square(std)
    kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + var - 1.0 - jnp.log(var), axis=(1, 2, 3)))
    loss = l1_weight * l1 + mse_weight * mse + kl_weight * kl
    return loss, {"l1": l1, "mse": mse, "kl": kl}


def _optimizer_step(state, loss_of_params, tx, schedule, ema_decay):
    """One AdamW step + EMA on ``state = {params, ema, opt_state, step}``;
    ``loss_of_params(params) -> (loss, aux metrics)``."""
    (loss, aux), grads = jax.value_and_grad(loss_of_params, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = ema_update(state["ema"], params, ema_decay, state["step"]) if ema_decay else params
    metrics = {"loss": loss, **aux, "lr": schedule(state["step"])}
    return {"params": params, "ema": ema, "opt_state": opt_state,
            "step": state["step"] + 1}, metrics


@functools.lru_cache(maxsize=8)
def make_vae_step(stage: VAEStageConfig, seed: int) -> tuple[Callable, optax.GradientTransformation]:
    """``(jitted step(state, images) -> (state, metrics), optimizer)`` for stage A.

    ``images``: float32 ``(B, crop, crop, 3)`` in [-1, 1]. Metrics: loss, l1, mse, kl, lr.
    Cached per (stage config, seed), so restarting a stage in one process does not recompile.
    """
    config = vae_config_of(stage)
    schedule = lr_schedule(stage.lr, stage.warmup_steps, stage.steps, stage.end_lr_fraction)
    tx = make_optimizer(schedule, stage.weight_decay, 1.0)
    loss_fn = functools.partial(vae_loss, config=config, l1_weight=stage.l1_weight,
                                mse_weight=stage.mse_weight, kl_weight=stage.kl_weight)

    def step_fn(state, images):
        key = _step_key(seed, _VAE_STREAM, state["step"])
        return _optimizer_step(state, lambda p: loss_fn(p, images=images, key=key), tx,
                               schedule, stage.ema_decay)

    return jax.jit(step_fn, donate_argnums=0), tx


# ----------------------------------------------------------------------------- diffusion
def alphas_cumprod(stage: DiffusionStageConfig) -> np.ndarray:
    """``prod(1 - beta)`` over the training timesteps, float64 ``(num_train_timesteps,)``.

    ``scaled_linear`` (SD): ``beta = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``;
    ``linear``: ``linspace(beta_start, beta_end, T)``. With ``rescale_betas_zero_snr`` the
    sampler's own rescaled schedule (:mod:`jattn.sampling.schedulers`), so training and
    sampling use the same alpha_bar (the last one 0).
    Raises:
      ValueError: another schedule name.
    """
    t = stage.num_train_timesteps
    if stage.beta_schedule not in ("scaled_linear", "linear"):
        raise ValueError(f"beta_schedule {stage.beta_schedule!r}: use scaled_linear or linear")
    if stage.rescale_betas_zero_snr:
        from jattn.sampling import schedulers as sch

        cfg = sch.SchedulerConfig(kind="ddim", num_train_timesteps=t, beta_start=stage.beta_start,
                                  beta_end=stage.beta_end, beta_schedule=stage.beta_schedule,
                                  rescale_betas_zero_snr=True)
        return sch._alphas_cumprod(cfg).astype(np.float64)
    if stage.beta_schedule == "scaled_linear":
        betas = np.linspace(stage.beta_start ** 0.5, stage.beta_end ** 0.5, t, dtype=np.float64) ** 2
    else:
        betas = np.linspace(stage.beta_start, stage.beta_end, t, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def diffusion_loss(params, unet_config: unet_lib.UNetConfig,
                   text_config: clip_lib.CLIPTextConfig, latents: Array, token_ids: Array,
                   key: Array, *, alphas_bar: Array, empty_ids: Array, caption_dropout: float,
                   snr_gamma: float, grounding: dict | None = None,
                   prediction_type: str = "epsilon") -> tuple[Array, dict]:
    """Epsilon- or v-prediction loss of latent diffusion (Ho et al. 2020; Rombach et al.
    2022; v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, Salimans & Ho 2022).

    ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` with t uniform over the training
    timesteps; loss ``mean_b w_t * mean_{hwc} (eps_theta(x_t, t, c) - eps)^2`` where
    ``w_t = min(SNR_t, gamma) / SNR_t`` (Min-SNR-gamma, Hang et al. 2023) or 1 when
    ``snr_gamma == 0``. For v-prediction ``w_t = min(SNR_t + 1, gamma) / (SNR_t + 1)``, the
    form of earlier diffusers ``train_text_to_image.py`` (v-loss = (SNR + 1) x_0-loss):
    at zero terminal SNR the last timestep, the one that must read the layout from the
    text alone, keeps weight 1 (``min(SNR, gamma) / (SNR + 1)`` would give it 0).
    A caption is replaced by the empty prompt's ids with probability ``caption_dropout``.

    Args:
      params: ``{"unet": ..., "text_encoder": ...}``.
      latents: float32 ``(B, h, w, C)`` scaled latents x_0.
      token_ids: int32 ``(B, S)``; empty_ids: int32 ``(S,)`` (tokenized "").
      alphas_bar: float32 ``(T,)``.
      grounding: None, or the token grounding terms (:mod:`jattn.train.grounding`):
        ``{"policy": static capture policy, "sites_res": {path: (h, w)}, "masks": float
        (B, K, m, m), "positions": int32 (B, K, R), "token_weight": scalar, "pixel_weight":
        scalar}``; the weights may be traced (0 switches the terms off).
    Returns:
      (loss, ``{"mse"}``) with mse the unweighted mean squared error (and, with grounding,
      ``"ground_token"``, ``"ground_pixel"``: the unweighted grounding losses).
    """
    k_drop, k_t, k_noise = jax.random.split(key, 3)
    b = latents.shape[0]
    drop = jax.random.uniform(k_drop, (b,)) < caption_dropout
    ids = jnp.where(drop[:, None], empty_ids[None, :], token_ids)
    context = clip_lib.CLIPTextModel(text_config).apply(
        {"params": params["text_encoder"]}, ids)["last_hidden_state"]  # (B, S, D)
    t = jax.random.randint(k_t, (b,), 0, alphas_bar.shape[0])
    noise = jax.random.normal(k_noise, latents.shape, latents.dtype)
    a = alphas_bar[t][:, None, None, None]
    x_t = jnp.sqrt(a) * latents + jnp.sqrt(1.0 - a) * noise
    policy = None if grounding is None else grounding["policy"]
    eps, aux = unet_lib.UNet2DConditionModel(unet_config).apply(
        {"params": params["unet"]}, x_t, t.astype(jnp.float32), context, policy=policy)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * latents
    else:
        raise ValueError(f"prediction_type {prediction_type!r}: use epsilon or v_prediction")
    per_sample = jnp.mean(jnp.square(eps - target), axis=(1, 2, 3))  # (B,)
    if snr_gamma:
        snr = alphas_bar[t] / (1.0 - alphas_bar[t])
        if prediction_type == "v_prediction":
            snr = snr + 1.0
        weight = jnp.minimum(snr, snr_gamma) / snr
    else:
        weight = jnp.ones_like(per_sample)
    loss = jnp.mean(weight * per_sample)
    metrics = {"mse": jnp.mean(per_sample)}
    if grounding is not None:
        from jattn.train.grounding import grounding_loss

        tok, pix = grounding_loss(aux, grounding["sites_res"], grounding["masks"],
                                  grounding["positions"], ~drop)
        loss = loss + grounding["token_weight"] * tok + grounding["pixel_weight"] * pix
        metrics.update(ground_token=tok, ground_pixel=pix)
    return loss, metrics


@functools.lru_cache(maxsize=8)
def make_diffusion_step(stage: DiffusionStageConfig, seed: int, empty_ids: tuple[int, ...]
                        ) -> tuple[Callable, optax.GradientTransformation]:
    """``(jitted step(state, latents, token_ids) -> (state, metrics), optimizer)`` for stage C.

    ``latents`` float32 ``(B, h, w, C)``, ``token_ids`` int32 ``(B, S)``; params and EMA are
    ``{"unet", "text_encoder"}``. Metrics: loss, mse, lr. Cached per (config, seed, ids).
    With ``stage.grounding`` the step also takes ``masks`` float ``(B, K, m, m)`` and
    ``positions`` int32 ``(B, K, R)`` (:func:`jattn.train.grounding.grounding_targets`) and
    reports ground_token, ground_pixel.
    """
    unet_config, text_config = unet_config_of(stage), text_config_of(stage)
    schedule = lr_schedule(stage.lr, stage.warmup_steps, stage.steps, stage.end_lr_fraction,
                           stage.lr_schedule)
    tx = make_optimizer(schedule, stage.weight_decay, stage.grad_clip)
    abar = jnp.asarray(alphas_cumprod(stage), jnp.float32)
    empty = jnp.asarray(empty_ids, jnp.int32)
    loss_fn = functools.partial(diffusion_loss, unet_config=unet_config,
                                text_config=text_config, alphas_bar=abar, empty_ids=empty,
                                caption_dropout=stage.caption_dropout, snr_gamma=stage.snr_gamma,
                                prediction_type=stage.prediction_type)

    policies: dict = {}  # grounding capture policy per (batch, latent side), built at trace

    def grounding_terms(step, latents, masks, positions):
        b, h = latents.shape[0], latents.shape[1]
        if (b, h) not in policies:
            from jattn.train.grounding import grounding_policy

            pol = grounding_policy(unet_config, b, h)
            policies[b, h] = (pol, {s.path: s.resolution for s in pol.sites})
        pol, sites_res = policies[b, h]
        on = (step >= stage.grounding_from_step).astype(jnp.float32)
        return {"policy": pol, "sites_res": sites_res, "masks": masks, "positions": positions,
                "token_weight": on * stage.grounding_token_weight,
                "pixel_weight": on * stage.grounding_pixel_weight}

    def step_fn(state, latents, token_ids, *grounding_batch):
        key = _step_key(seed, _DIFFUSION_STREAM, state["step"])
        g = (grounding_terms(state["step"], latents, *grounding_batch)
             if stage.grounding else None)
        return _optimizer_step(
            state, lambda p: loss_fn(p, latents=latents, token_ids=token_ids, key=key,
                                     grounding=g), tx, schedule, stage.ema_decay)

    return jax.jit(step_fn, donate_argnums=0), tx
