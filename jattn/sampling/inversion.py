"""DDIM inversion and null-text inversion, compiled.

Source: Mokady, Hertz, Aberman, Pritch, Cohen-Or, "Null-text Inversion for Editing Real
Images using Guided Diffusion Models" (CVPR 2023); reference google/prompt-to-prompt
``null_text_w_ptp.ipynb`` (``NullInversion``: ``ddim_loop``, ``null_optimization``).

* DDIM inversion: the VAE posterior mean × scaling factor, then ``T`` DDIM steps backwards
  with the conditional prediction only (guidance 1), keeping every latent
  ``z*_0 … z*_T``.
* Null-text inversion: for each step ``i`` (from ``z̄_T = z*_T``), Adam on the
  unconditional embedding (warm-started from the previous step's), lr ``1e-2·(1 − i/100)``,
  at most ``inner_steps`` iterations, loss ``MSE(DDIM step with CFG from z̄_i, z*_{T−i−1})``,
  early stop once the loss (measured before the update, as the reference) is below
  ``1e-5 + i·2e-5``; then ``z̄`` takes the CFG step with the optimised embedding. The loop
  over steps is a ``lax.scan``, the inner loop a ``lax.while_loop``; a batch of images is
  ``vmap`` ped (each image stops on its own).

Shapes: latents ``(B, h, w, C)`` NHWC; embeddings ``(B, S, D)``; per-step embeddings
``(T, B, S, D)``.

SDXL (issue 16): the conditioning is the pipeline's pytree ``{"context", "text_embeds",
"time_ids"}`` (:mod:`jattn.pipeline`), with the default micro-conditioning of the image
size. Null-text inversion optimises the **context** ``(B, 77, D1 + D2)`` of the empty
prompt only; its pooled ``text_embeds`` and the ``time_ids`` stay fixed (jattn's choice, as
the usual null-text ports to SDXL, which optimise the unconditional prompt embeddings and
pass the added conditioning unchanged; the pooled vector enters the UNet only through the
time embedding, a single vector per image).
``Inversion.uncond_per_step`` is then ``{"context": (T, B, S, D), "text_embeds":
(T, B, P)}``, what :meth:`jattn.pipeline.Pipeline.generate` takes as ``uncond_per_step``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jattn.io import checks
from jattn.io.images import as_uint8_images
from jattn.sampling import schedulers as sch

Array = jax.Array

__all__ = ["Inversion", "ddim_inversion_loop", "null_text_loop", "invert", "save_inversion",
           "load_inversion"]


@dataclasses.dataclass
class Inversion:
    """Result of :func:`invert`.

    Attributes:
      latents: float32 ``(T+1, B, h, w, C)`` DDIM-inversion trajectory ``z*_0 … z*_T``.
      uncond_per_step: float32 ``(T, B, S, D)`` optimised null-text embeddings (None for
        plain DDIM inversion); SDXL: ``{"context": (T, B, S, D), "text_embeds": (T, B, P)}``
        (the optimised context, the empty prompt's pooled embedding at every step).
      prompt: the source prompt(s); num_inference_steps, guidance_scale: the settings.
      inner_iterations: int ``(T, B)`` Adam iterations used per step (null-text).
    """

    latents: np.ndarray
    uncond_per_step: np.ndarray | None
    prompt: list[str]
    num_inference_steps: int
    guidance_scale: float
    inner_iterations: np.ndarray | None = None

    @property
    def x_t(self) -> np.ndarray:
        """``z*_T`` as NCHW ``(B, C, h, w)`` (diffusers' ``latents=``; DDIM's init sigma is 1)."""
        return self.latents[-1].transpose(0, 3, 1, 2)


def _opt_part(uncond):
    """The optimised part of the unconditional conditioning: the array itself (SD1/SD2) or
    the ``"context"`` of SDXL's pytree (text_embeds and time_ids stay fixed)."""
    return uncond["context"] if isinstance(uncond, dict) else uncond


def _with_part(uncond, part):
    """``uncond`` with its optimised part replaced by ``part``."""
    return {**uncond, "context": part} if isinstance(uncond, dict) else part


def conditioning(pipe, prompts: list[str], height: int, width: int):
    """The UNet conditioning of ``prompts`` as the sampler sees it: SD1/SD2 the embeddings
    ``(B, 77, D)``; SDXL :meth:`~jattn.pipeline.Pipeline.encode_prompts`' dict plus the
    default ``time_ids`` of an ``height × width`` image (original = target size, crop
    ``(0, 0)``)."""
    text = pipe.encode_prompts(prompts)
    if isinstance(text, dict):
        return {**text, "time_ids": pipe.time_ids(len(prompts), height, width)}
    return text


def ddim_inversion_loop(unet_fn, schedule: sch.Schedule, z0: Array, cond: Array,
                        uncond: Array | None = None, guidance_scale: Array | float = 1.0
                        ) -> Array:
    """``z*_0 … z*_T`` ``(T+1, B, h, w, C)`` by DDIM inversion.

    With ``uncond`` None the model output is the conditional eps (null-text inversion's
    ``ddim_loop``); with ``uncond`` ``(B, S, D)`` it is the CFG output
    ``e_u + s (e_c − e_u)`` at ``guidance_scale`` s (StyleAligned's inversion of a
    reference image, google/style-aligned ``inversion.py`` ``_ddim_loop``, CFG 2 in
    ``style_aligned_transfer_sdxl.ipynb``).
    """
    n = schedule.timesteps.shape[0]
    from jattn.sampling.sampler import guided_eps

    def body(z, i):
        t = schedule.timesteps[i]
        if uncond is None:
            eps, _ = unet_fn(z, jnp.broadcast_to(t, (z.shape[0],)), cond, None, None)
        else:
            eps, _ = guided_eps(unet_fn, z, t, cond, uncond, jnp.asarray(guidance_scale,
                                                                         jnp.float32),
                                jnp.float32(0.0), None, None)
        z = sch.ddim_inversion_step(schedule, eps.astype(jnp.float32), i, z)
        return z, z

    _, zs = jax.lax.scan(body, z0, jnp.arange(n - 1, -1, -1))
    return jnp.concatenate([z0[None], zs], axis=0)


def null_text_loop(unet_fn, schedule: sch.Schedule, latents: Array, cond: Array, uncond: Array,
                   guidance_scale: float, inner_steps: int = 10, epsilon: float = 1e-5
                   ) -> tuple[Array, Array]:
    """Null-text optimisation for ONE image (batch axis 1; ``vmap`` it for several).

    Args:
      latents: ``(T+1, 1, h, w, C)`` from :func:`ddim_inversion_loop`.
      cond, uncond: ``(1, S, D)`` prompt and initial unconditional ("") embeddings; or
        SDXL pytrees (``{"context", "text_embeds", "time_ids"}``), of which only
        ``uncond["context"]`` is optimised.
    Returns:
      ``(uncond_per_step (T, 1, S, D), iterations (T,))`` (SDXL: the optimised context).
    """
    n = schedule.timesteps.shape[0]
    adam = optax.scale_by_adam()  # torch.optim.Adam defaults: b1 .9, b2 .999, eps 1e-8

    def eps_of(z, t, ctx):
        out, _ = unet_fn(z, jnp.broadcast_to(t, (z.shape[0],)), ctx, None, None)
        return out.astype(jnp.float32)

    def outer(carry, i):
        z, u = carry
        t = schedule.timesteps[i]
        target = latents[n - i - 1]
        e_c = jax.lax.stop_gradient(eps_of(z, t, cond))
        lr = 1e-2 * (1.0 - i / 100.0)

        def loss_fn(u_):
            e_u = eps_of(z, t, _with_part(uncond, u_))
            e = e_u + guidance_scale * (e_c - e_u)
            prev, _, _ = sch.step(schedule, sch.init_state(schedule, z), e, i, z)
            return jnp.mean((prev - target) ** 2)

        def cond_fn(s):
            j, _, _, done = s
            return (j < inner_steps) & ~done

        def body_fn(s):
            j, u_, opt, _ = s
            loss, g = jax.value_and_grad(loss_fn)(u_)
            upd, opt = adam.update(g, opt)
            u_ = u_ - lr * upd
            return j + 1, u_, opt, loss < epsilon + i * 2e-5

        j, u, _, _ = jax.lax.while_loop(cond_fn, body_fn,
                                        (jnp.int32(0), u, adam.init(u), jnp.asarray(False)))
        e_u = eps_of(z, t, _with_part(uncond, u))
        e = e_u + guidance_scale * (e_c - e_u)
        z, _, _ = sch.step(schedule, sch.init_state(schedule, z), e, i, z)
        return (z, u), (u, j)

    (_, _), (us, iters) = jax.lax.scan(outer, (latents[-1], _opt_part(uncond)),
                                       jnp.arange(n))
    return us, iters


def invert(pipe, images: np.ndarray, prompt: str | list[str], *, method: str = "null-text",
           num_inference_steps: int = 50, guidance_scale: float = 7.5, inner_steps: int = 10,
           epsilon: float = 1e-5, inversion_guidance: float = 1.0) -> Inversion:
    """Invert real images for editing.

    Args:
      pipe: a :class:`jattn.pipeline.Pipeline` (DDIM schedule with the checkpoint's betas).
      images: uint8 ``(B, H, W, 3)`` (H, W multiples of 8; the pipeline's size for
        editing).
      prompt: one source prompt per image (a str for all).
      method: ``"null-text"`` or ``"ddim"``.
      guidance_scale: the CFG scale the edit will run at (null-text optimises for it).
      inversion_guidance: CFG scale of the DDIM inversion itself (1: the conditional eps
        only, null-text inversion's reference; StyleAligned inverts a reference image at
        2 with the empty prompt as the unconditional one). Only with ``method="ddim"``.
    Returns:
      :class:`Inversion`.
    Raises:
      ValueError: unknown method, image shape not (B, H, W, 3), floats in [0, 1] or values
        outside 0..255, a size the model cannot take, prompt count.
    """
    if method not in ("null-text", "ddim"):
        raise ValueError(f"method={method!r}: choose 'null-text' or 'ddim'")
    images = as_uint8_images(images, "images")
    pipe.check_size(images.shape[1], images.shape[2], images.shape[0])
    prompts = checks.prompt_list(prompt, "prompt")
    prompts = prompts * images.shape[0] if isinstance(prompt, str) else prompts
    if len(prompts) != images.shape[0]:
        raise ValueError(f"prompt: {len(prompts)} prompts for {images.shape[0]} images")
    ig = checks.finite_number(inversion_guidance, "inversion_guidance")
    if ig < 1.0 or (ig != 1.0 and method != "ddim"):
        raise ValueError(f"inversion_guidance={inversion_guidance!r}: must be ≥ 1, and other "
                         "than 1 only with method='ddim' (null-text inverts with the "
                         "conditional prediction)")
    schedule = pipe.schedule(num_inference_steps, "ddim", 0.0)
    z0 = pipe.encode_images(images)
    hw = images.shape[1:3]
    cond = conditioning(pipe, prompts, *hw)
    cfg = ig != 1.0
    key = ("ddim_invert", num_inference_steps, cfg)
    if key not in pipe._cache:
        def run(params, schedule, z0, cond, uncond, gs):
            pipe._count("ddim_invert")
            return ddim_inversion_loop(pipe.unet_fn(params), schedule, z0, cond, uncond, gs)

        pipe._cache[key] = jax.jit(run)
    un = conditioning(pipe, [""] * len(prompts), *hw) if cfg else None
    lats = pipe._cache[key](pipe.params["unet"], schedule, z0, cond, un, jnp.float32(ig))
    if method == "ddim":
        return Inversion(np.asarray(lats), None, prompts, num_inference_steps, guidance_scale)
    uncond = conditioning(pipe, [""] * len(prompts), *hw)
    key = ("null_text", num_inference_steps, inner_steps, float(epsilon))
    if key not in pipe._cache:
        def run_nt(params, schedule, lats, cond, uncond, gs):
            pipe._count("null_text")
            fn = pipe.unet_fn(params)

            def one(l, c, u):  # one image: add the batch axis of 1
                add = lambda tree: jax.tree_util.tree_map(lambda a: a[None], tree)  # noqa: E731
                us, it = null_text_loop(fn, schedule, l[:, None], add(c), add(u), gs,
                                        inner_steps, epsilon)
                return us[:, 0], it

            us, it = jax.vmap(one, in_axes=(1, 0, 0), out_axes=(1, 1))(lats, cond, uncond)
            return us, it

        pipe._cache[key] = jax.jit(run_nt)
    us, iters = pipe._cache[key](pipe.params["unet"], schedule, lats, cond, uncond,
                                 jnp.float32(guidance_scale))
    us = np.asarray(us, np.float32)
    if isinstance(uncond, dict):  # SDXL: the optimised context + the fixed pooled embedding
        pooled = np.asarray(uncond["text_embeds"], np.float32)
        us = {"context": us, "text_embeds": np.broadcast_to(pooled, (us.shape[0],)
                                                            + pooled.shape).copy()}
    return Inversion(np.asarray(lats), us, prompts, num_inference_steps,
                     guidance_scale, np.asarray(iters))


def save_inversion(inv: Inversion, path) -> None:
    """Write an :class:`Inversion` as ``.npz`` (reusable by ``jattn edit --inversion-file``)."""
    u = inv.uncond_per_step
    pooled = u["text_embeds"] if isinstance(u, dict) else np.zeros(0)  # SDXL
    u = u["context"] if isinstance(u, dict) else u
    np.savez_compressed(
        path, latents=inv.latents, uncond_text_embeds=pooled,
        uncond_per_step=u if u is not None else np.zeros(0),
        prompt=np.asarray(inv.prompt), num_inference_steps=inv.num_inference_steps,
        guidance_scale=inv.guidance_scale,
        inner_iterations=inv.inner_iterations if inv.inner_iterations is not None else np.zeros(0))


def load_inversion(path) -> Inversion:
    """Read an ``.npz`` written by :func:`save_inversion`.

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file is damaged or not an inversion file (names it).
    """
    from pathlib import Path

    if not Path(path).is_file():
        raise FileNotFoundError(f"inversion file {str(path)!r}: no such file")
    try:
        with np.load(path, allow_pickle=False) as d:
            u = d["uncond_per_step"]
            it = d["inner_iterations"]
            pooled = d["uncond_text_embeds"] if "uncond_text_embeds" in d else np.zeros(0)
            if u.size and pooled.size:  # SDXL
                u = {"context": u, "text_embeds": pooled}
            has_u = isinstance(u, dict) or u.size
            inv = Inversion(np.asarray(d["latents"], np.float32), u if has_u else None,
                            [str(p) for p in np.atleast_1d(d["prompt"])],
                            int(d["num_inference_steps"]), float(d["guidance_scale"]),
                            it if it.size else None)
    except Exception as e:  # zipfile/npy errors, missing keys, wrong dtypes: all "damaged"
        raise ValueError(f"inversion file {str(path)!r} is damaged or not written by `jattn "
                         f"invert` ({type(e).__name__}: {e}); invert the image again.") from None
    if inv.latents.ndim != 5 or not np.isfinite(inv.latents).all():
        raise ValueError(f"inversion file {str(path)!r} is damaged (latents of shape "
                         f"{inv.latents.shape} or not finite); invert the image again.")
    return inv
