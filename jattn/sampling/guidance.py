"""The guidance hook: a loss on attention recorded during a UNet call, differentiated with
respect to the latents inside the compiled loop (Attend-and-Excite, layout guidance,
Bounded Attention's guidance).

At step i (when ``step_size[i] != 0``), ``iterations`` times: run the UNet on the
conditional batch with ``policy`` (which records attention), fold its records with the
policy's own aggregation (one call), evaluate ``loss_fn(acc, i)`` and update
``z ← z − step_size[i] · ∇_z loss``. The denoising step then proceeds from the updated
latents.

Sources: Chefer et al., "Attend-and-Excite" (SIGGRAPH 2023, yuval-alaluf/Attend-and-Excite
``_update_latent``); Chen et al., "Training-Free Layout Control with Cross-Attention
Guidance" (WACV 2024); Dahary et al., "Bounded Attention" (ECCV 2024).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from jattn.policy.core import Policy

Array = jax.Array

__all__ = ["Guidance", "apply_guidance"]


@struct.dataclass
class Guidance:
    """Attention guidance (a pytree: arrays are dynamic, the loss and count are static).

    Attributes:
      policy: records what the loss reads; its layout must have ``cfg=False`` (the hook
        runs the UNet on the conditional batch only, as the references do).
      step_size: float32 ``(steps,)``: the gradient step per denoising step (0 = off).
      loss_fn: static ``(acc, step) -> scalar``; ``acc`` is ``policy.aux_update(
        policy.aux_init(), aux, step)`` for one UNet call.
      iterations: static number of gradient steps per denoising step.
    """

    policy: Policy
    step_size: Array
    loss_fn: Callable = struct.field(pytree_node=False)
    iterations: int = struct.field(pytree_node=False, default=1)


def apply_guidance(guidance: Guidance, unet_fn, latents_in_fn, x: Array, t: Array,
                   cond: Array, i: Array) -> tuple[Array, Array]:
    """Update latents ``x`` ``(B, h, w, C)`` by the guidance of step ``i``.

    ``latents_in_fn(x)`` maps latents to the UNet input (the scheduler's
    ``scale_model_input``). Returns ``(x, last loss)``.
    """
    pol = guidance.policy
    if pol.layout.cfg:
        raise ValueError("Guidance.policy: use a layout with cfg=False (the guidance pass "
                         "runs on the conditional batch only)")
    tt = jnp.broadcast_to(t, (x.shape[0],))

    def loss_of(z):
        _, aux = unet_fn(latents_in_fn(z), tt, cond, pol, i)
        acc = pol.aux_update(pol.aux_init(z), aux, i)
        return guidance.loss_fn(acc, i)

    lr = guidance.step_size[i]
    loss = jnp.zeros((), jnp.float32)
    for _ in range(guidance.iterations):
        loss, g = jax.value_and_grad(loss_of)(x)
        x = x - lr * g.astype(x.dtype)
    return x, loss
