"""The guidance hook: a loss on attention recorded during a UNet call, differentiated with
respect to the latents inside the compiled loop (Attend-and-Excite, layout guidance,
Bounded Attention's guidance).

At step i (when ``step_size[i] != 0``), ``iterations`` times: run the UNet on the
conditional batch with ``policy`` (which records attention), fold its records with the
policy's own aggregation (one call), evaluate ``loss_fn(acc, i)`` and update
``z ← z − step_size[i] · ∇_z loss``. The denoising step then proceeds from the updated
latents.

Refinement (``max_refine > 0``; Attend-and-Excite's iterative refinement, layout
guidance's iteration rule): before those ``iterations``, at steps where ``threshold[i]`` is
finite, a bounded ``lax.while_loop`` repeats "evaluate the per-sample loss, take the
gradient step" for every sample whose *checked* loss is above ``threshold[i]``, at most
``max_refine`` times. The checked loss is the loss evaluated before the last update, as in
both references (their ``while loss > target`` tests the loss of the previous iteration);
it starts from ``refine_from``: ``"current"`` the loss at the step's latents (A&E: refine
only when the step's loss misses the target), ``"reset"`` +inf (at least one iteration:
layout guidance, fresh per step), ``"carried"`` the last loss evaluated at an earlier step
(layout guidance's reference quirk: its ``loss`` variable persists across steps, so once
it drops below the threshold no later step is guided). ``loss_fn`` may return per-sample
losses ``(B,)`` (their sum is differentiated; samples are independent in the UNet) or a
scalar (then all samples refine together). Defaults (``max_refine=0``) leave the hook as
it was, bit for bit.

Sources: Chefer et al., "Attend-and-Excite" (SIGGRAPH 2023, yuval-alaluf/Attend-and-Excite
``_update_latent``); Chen et al., "Training-Free Layout Control with Cross-Attention
Guidance" (WACV 2024); Dahary et al., "Bounded Attention" (ECCV 2024).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
      iterations: static number of gradient steps per denoising step (after refinement).
      threshold: float32 ``(steps,)`` or None: the refinement target per step (+inf: the
        step does not refine); refinement runs while a sample's checked loss is above it.
      max_refine: static; at most this many refinement iterations per step (0: none).
      refine_from: static; where the checked loss starts: "current", "reset", "carried".
      loss_args: a pytree of dynamic arrays (token positions, boxes …) or None; when given,
        ``loss_fn(acc, step, loss_args)`` is called instead (new values never recompile).
    """

    policy: Policy
    step_size: Array
    loss_fn: Callable = struct.field(pytree_node=False)
    iterations: int = struct.field(pytree_node=False, default=1)
    threshold: Array | None = None
    max_refine: int = struct.field(pytree_node=False, default=0)
    refine_from: str = struct.field(pytree_node=False, default="current")
    loss_args: Any = None

    @property
    def carries_loss(self) -> bool:
        """The sampler carries the per-sample loss from step to step ("carried")."""
        return self.max_refine > 0 and self.refine_from == "carried"

    @staticmethod
    def loss_fn_sum(raw: Array) -> Array:
        """The differentiated scalar: ``loss_fn``'s value, summed over samples if ``(B,)``."""
        return raw if jnp.ndim(raw) == 0 else jnp.sum(raw)


def apply_guidance(guidance: Guidance, unet_fn, latents_in_fn, x: Array, t: Array,
                   cond: Array, i: Array, prev_loss: Array | None = None
                   ) -> tuple[Array, Array]:
    """Update latents ``x`` ``(B, h, w, C)`` by the guidance of step ``i``.

    ``latents_in_fn(x)`` maps latents to the UNet input (the scheduler's
    ``scale_model_input``). ``prev_loss`` ``(B,)``: the last loss of an earlier step
    (``refine_from="carried"``). Returns ``(x, last loss)`` (per sample ``(B,)`` when
    refining, else what ``loss_fn`` returns).
    """
    pol = guidance.policy
    if pol.layout.cfg:
        raise ValueError("Guidance.policy: use a layout with cfg=False (the guidance pass "
                         "runs on the conditional batch only)")
    tt = jnp.broadcast_to(t, (x.shape[0],))

    def loss_raw(z):
        _, aux = unet_fn(latents_in_fn(z), tt, cond, pol, i)
        acc = pol.aux_update(pol.aux_init(z), aux, i)
        if guidance.loss_args is not None:
            return guidance.loss_fn(acc, i, guidance.loss_args)
        return guidance.loss_fn(acc, i)

    def loss_of(z):
        return guidance.loss_fn_sum(loss_raw(z))

    lr = guidance.step_size[i]
    loss = jnp.zeros((), jnp.float32)
    checked = None
    if guidance.max_refine > 0:
        x, checked = _refine(guidance, loss_raw, x, i, prev_loss)
        loss = checked
    for _ in range(guidance.iterations):
        loss, g = jax.value_and_grad(loss_of)(x)
        x = x - lr * g.astype(x.dtype)
    if guidance.carries_loss:
        return x, checked
    return x, loss


def _per_sample(l: Array, b: int) -> Array:
    return jnp.broadcast_to(jnp.asarray(l, jnp.float32), (b,))


def _refine(guidance: Guidance, loss_raw, x: Array, i: Array, prev_loss: Array | None
            ) -> tuple[Array, Array]:
    """The bounded refinement loop (see the module docstring)."""
    if guidance.threshold is None:
        raise ValueError("Guidance.threshold: max_refine > 0 needs a (steps,) threshold "
                         "array (+inf where a step does not refine)")
    if guidance.refine_from not in ("current", "reset", "carried"):
        raise ValueError(f"Guidance.refine_from={guidance.refine_from!r}: one of 'current', "
                         "'reset', 'carried'")
    b = x.shape[0]
    thr = guidance.threshold[i]
    lr = guidance.step_size[i]
    bshape = (b,) + (1,) * (x.ndim - 1)

    def vag(z):
        def f(y):
            raw = loss_raw(y)
            return jnp.sum(raw), _per_sample(raw, b)
        (_, per), g = jax.value_and_grad(f, has_aux=True)(z)
        return per, g

    def run(z):
        if guidance.refine_from == "current":
            l0 = _per_sample(loss_raw(z), b)
        elif guidance.refine_from == "reset" or prev_loss is None:
            l0 = jnp.full((b,), jnp.inf, jnp.float32)
        else:
            l0 = _per_sample(prev_loss, b)

        def cond_fn(c):
            _, checked, it = c
            return (it < guidance.max_refine) & jnp.any(checked > thr)

        def body(c):
            z, checked, it = c
            active = checked > thr
            per, g = vag(z)
            z = jnp.where(active.reshape(bshape), z - lr * g.astype(z.dtype), z)
            return z, jnp.where(active, per, checked), it + 1

        z, checked, _ = jax.lax.while_loop(cond_fn, body, (z, l0, jnp.int32(0)))
        return z, checked

    def skip(z):
        l = (jnp.full((b,), jnp.inf, jnp.float32) if prev_loss is None
             else _per_sample(prev_loss, b))
        return z, l

    return jax.lax.cond(jnp.isfinite(thr), run, skip, x)
