"""The one sampler loop: ``lax.scan`` over denoising steps, CFG, policies, per-sample keys.

Every generation and every editing method of jattn runs through :func:`sample`; methods
differ only in the policy, the guidance hook, the per-step callback and the
:class:`SamplerHooks` they pass. A new per-step need (given noise maps, a start step,
later re-imposed latents or a second UNet pass) becomes a field of :class:`SamplerHooks`,
never a keyword per method and never a copy of the loop.

Batch layout: latents ``(B, h, w, C)`` NHWC inside jattn (the pipeline converts from/to
diffusers' NCHW at the API boundary). With classifier-free guidance the UNet sees the
batch ``[uncond (B); cond (B)]`` (diffusers' order), i.e. ``2B`` rows.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jattn.sampling import schedulers as sch

Array = jax.Array

__all__ = ["sample", "SamplerHooks", "guided_eps", "per_sample_keys", "initial_noise",
           "UNetFn", "reimposition"]

# unet_fn(latents (B', h, w, C), timesteps (B',), context (B', S, D), policy, step)
#   -> (eps (B', h, w, C), aux dict). The context may be a pytree whose every leaf has the
# batch axis first (SDXL: {"context": (B', S, D), "text_embeds": (B', P), "time_ids":
# (B', 6)}, see jattn.pipeline.Pipeline.unet_fn); the loop only concatenates and indexes it.
UNetFn = Callable[[Array, Array, Array, Any, Array], tuple[Array, dict]]


def per_sample_keys(seeds: Array) -> Array:
    """One PRNG key per sample from integer seeds ``(B,)`` (image i depends on seed i only)."""
    return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


def initial_noise(keys: Array, shape_hwc: tuple[int, int, int], dtype=jnp.float32) -> Array:
    """Unit Gaussian latents ``(B, h, w, C)``, sample b drawn from ``keys[b]`` only."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0x1A7E), shape_hwc,
                                                dtype))(keys)


@struct.dataclass
class SamplerHooks:
    """Per-step inputs of the sampler loop other than the policy (a small pytree).

    Every field left at its default leaves the loop exactly as without hooks
    (``hooks=SamplerHooks()`` gives bit-identical latents to ``hooks=None``).

    Attributes:
      noise: float32 ``(n_steps, B, h, w, C)`` or None: the variance noise of each step of a
        stochastic scheduler (DDPM, DDIM with eta > 0), used instead of drawing it from
        the per-sample keys; row ``i`` is the noise of step index ``i`` (absolute, also
        when ``start_step > 0``). Edit-friendly DDPM inversion's noise maps
        (:mod:`jattn.sampling.ddpm_inversion`). Dynamic: new values never recompile.
      start_step: static int; the loop runs step indices ``[start_step, n_steps)`` (the
        timesteps ``schedule.timesteps[start_step:]``), starting from the given latents,
        which must then be the latents at ``timesteps[start_step]`` (DDPM inversion's
        ``skip``, SDEdit-style strength). Step indices seen by the policy, guidance,
        ``uncond_per_step`` and ``noise`` stay absolute. Changing it recompiles (the loop
        length is static).
      second_scale: float32 ``(n_steps,)`` or None: a second UNet pass per step with
        ``second_policy``, combined as ``eps = eps_2nd + s_i·(eps − eps_2nd)`` (CFG, if on,
        inside each pass); where ``s_i == 1`` the second pass is skipped (``lax.cond``) and
        eps is the first pass's exactly. Cross-Image Attention's swap guidance (garibida/
        cross-image-attention ``models/stable_diffusion.py``: swap / no-swap passes).
        Dynamic: new scales never recompile.
      second_policy: the attention policy of the second pass (None: plain attention); what
        it records is not aggregated.
      reimpose: float32 ``(n_steps, B, h, w, C)`` or None: latent re-imposition. After step
        index ``i`` (absolute, also when ``start_step > 0``; after the scheduler step and
        the per-step callback) the rows where ``reimpose_rows`` is True are replaced by
        ``reimpose[i]``, the latents the next step starts from (the last row,
        ``reimpose[n_steps-1]``, becomes the final latents of those rows). StyleAligned
        from a reference image (google/style-aligned ``inversion.py``,
        ``make_inversion_callback``: ``latents[0] = zts[max(offset + 1, i + 1)]`` after
        each step), Plug-and-Play and MasaCtrl on real images; :func:`reimposition` builds
        it from a DDIM-inversion trajectory. With multistep schedulers (DPM-Solver++,
        PNDM) the scheduler's history of those rows stays the model's. Dynamic: a new
        trajectory never recompiles.
      reimpose_rows: bool ``(B,)``: which rows are re-imposed (required with
        ``reimpose``).
      pre_policy: a :class:`jattn.policy.core.Policy` (same layout as the main policy) or
        None: a **pre-pass** per step, a UNet pass with this policy on the same model
        input (CFG, if on, as the main pass) run before the main pass at the steps of
        ``pre_window`` (``lax.cond``; elsewhere it does not run). Its records are folded
        from ``pre_policy.aux_init()`` by ``pre_policy.aux_update`` at that step and handed
        to the main policy's ops that have ``bind_pre_aux(pre_acc)`` before the main UNet
        call (outside the window they get ``aux_init``); its eps is discarded. ConsiStory's
        query blending (vanilla queries of the first steps, :mod:`jattn.policy.prepass`).
      pre_window: int32 ``(2,)`` steps ``start <= i < end`` of the pre-pass (required with
        ``pre_policy``). Dynamic: a new window never recompiles; an empty window leaves the
        loop bit-identical to no pre-pass when no main op reads it.
    """

    noise: Array | None = None
    start_step: int = struct.field(pytree_node=False, default=0)
    second_scale: Array | None = None
    second_policy: Any = None
    reimpose: Array | None = None
    reimpose_rows: Array | None = None
    pre_policy: Any = None
    pre_window: Array | None = None


def _check_hooks(hooks: SamplerHooks, schedule: sch.Schedule, latents: Array) -> None:
    n = schedule.timesteps.shape[0]
    start = hooks.start_step
    if isinstance(start, bool) or not isinstance(start, numbers.Integral) or not 0 <= start < n:
        raise ValueError(f"hooks.start_step={hooks.start_step!r}: must be an int in "
                         f"[0, {n}) for a schedule of {n} steps")
    if hooks.second_scale is not None and tuple(hooks.second_scale.shape) != (n,):
        raise ValueError(f"hooks.second_scale: shape {tuple(hooks.second_scale.shape)}, "
                         f"expected (n_steps,) = ({n},)")
    if hooks.noise is not None:
        want = (n,) + tuple(latents.shape)
        if tuple(hooks.noise.shape) != want:
            raise ValueError(f"hooks.noise: shape {tuple(hooks.noise.shape)}, expected "
                             f"(n_steps, B, h, w, C) = {want}")
        if not schedule.stochastic:
            raise ValueError(f"hooks.noise: scheduler kind={schedule.kind!r} adds no noise; "
                             "given noise maps need 'ddpm' or 'ddim' with eta > 0")
    if hooks.reimpose is not None:
        want = (n,) + tuple(latents.shape)
        if tuple(hooks.reimpose.shape) != want:
            raise ValueError(f"hooks.reimpose: shape {tuple(hooks.reimpose.shape)}, expected "
                             f"(n_steps, B, h, w, C) = {want} (row i: the latents after step i; "
                             "see jattn.sampling.sampler.reimposition)")
        if hooks.reimpose_rows is None or tuple(hooks.reimpose_rows.shape) != want[1:2]:
            got = None if hooks.reimpose_rows is None else tuple(hooks.reimpose_rows.shape)
            raise ValueError(f"hooks.reimpose_rows: shape {got}, expected bool (B,) = "
                             f"{want[1:2]}: which rows take the given trajectory")
    elif hooks.reimpose_rows is not None:
        raise ValueError("hooks.reimpose_rows given without hooks.reimpose: give the "
                         "trajectory (n_steps, B, h, w, C) too")
    if (hooks.pre_policy is None) != (hooks.pre_window is None):
        raise ValueError("hooks.pre_policy and hooks.pre_window go together: give the "
                         "pre-pass policy and its step window (start, end), or neither")
    if hooks.pre_window is not None and tuple(jnp.shape(hooks.pre_window)) != (2,):
        raise ValueError(f"hooks.pre_window: shape {tuple(jnp.shape(hooks.pre_window))}, "
                         "expected int32 (2,) = (start, end) step indices")
    if hooks.pre_policy is not None and not hasattr(hooks.pre_policy, "aux_update"):
        raise ValueError("hooks.pre_policy: a jattn.policy.core.Policy (its records are "
                         "folded by aux_init/aux_update and bound into the main policy)")


def reimposition(trajectory: Array, offset: int = 0) -> tuple[Array, Array]:
    """Initial latents and the :attr:`SamplerHooks.reimpose` rows from a DDIM-inversion
    trajectory, as StyleAligned's ``make_inversion_callback(zts, offset)``.

    The reference flips the inversion's ``[z*_0 … z*_T]`` into ``zts`` (``zts[0] = z*_T``),
    starts the reference member from ``zts[offset]`` and after step ``i`` sets it to
    ``zts[max(offset + 1, i + 1)]``. ``offset`` > 0 (5 in the SDXL notebooks) therefore
    starts the reference ``offset`` steps *less noisy* than the schedule and holds it at
    ``zts[offset + 1]`` for the first ``offset`` steps; from step ``offset`` on it follows
    the inverted trajectory exactly. ``offset = 0``: the plain trajectory.

    Args:
      trajectory: float32 ``(n_steps + 1, B, h, w, C)`` ``z*_0 … z*_T`` (e.g.
        ``Inversion.latents`` of :mod:`jattn.sampling.inversion`).
      offset: int in ``[0, n_steps)``.
    Returns:
      ``(x_T (B, h, w, C), reimpose (n_steps, B, h, w, C))``.
    Raises:
      ValueError: a trajectory of fewer than 2 entries or an offset out of range.
    """
    z = jnp.asarray(trajectory, jnp.float32)
    n = z.shape[0] - 1
    if z.ndim != 5 or n < 1:
        raise ValueError(f"trajectory of shape {tuple(z.shape)}: expected (n_steps + 1, B, h, "
                         "w, C) z*_0 … z*_T")
    if isinstance(offset, bool) or not 0 <= int(offset) < n:
        raise ValueError(f"offset={offset!r}: must be an int in [0, {n})")
    zts = z[::-1]
    idx = [max(int(offset) + 1, i + 1) for i in range(n)]
    return zts[int(offset)], zts[jnp.asarray(idx)]


def _bind_policy(policy: Any, acc: Any, pre_acc: Any = None) -> Any:
    """Give ops that read the accumulators (``bind_aux``, e.g. a mask from another op's
    recording) the accumulators as they are before this step's UNet call, and ops that
    read the pre-pass (``bind_pre_aux``) its accumulators of this step."""
    ops = getattr(policy, "ops", None)
    if not ops:
        return policy
    if acc is not None and any(hasattr(op, "bind_aux") for op in ops):
        ops = tuple(op.bind_aux(acc) if hasattr(op, "bind_aux") else op for op in ops)
    if pre_acc is not None and any(hasattr(op, "bind_pre_aux") for op in ops):
        ops = tuple(op.bind_pre_aux(pre_acc) if hasattr(op, "bind_pre_aux") else op
                    for op in ops)
    return policy if ops is policy.ops else policy.replace(ops=ops)


def guided_eps(unet_fn: UNetFn, x_in: Array, t: Array, cond: Array, uncond: Array | None,
               guidance_scale: Array, guidance_rescale: Array, policy: Any, i: Array
               ) -> tuple[Array, dict]:
    """The model output of one step with classifier-free guidance (the sampler's, shared
    with the inversions so that they see exactly the loop's prediction).

    Args:
      x_in: ``(B, h, w, C)`` model input (after ``scale_model_input``).
      t: () timestep; cond / uncond: ``(B, S, D)`` or a pytree of ``(B, ...)`` leaves of
        the same structure (SDXL's conditioning), ``uncond`` None for no CFG.
      guidance_scale: () or broadcastable to ``(B, 1, 1, 1)``; guidance_rescale: ().
    Returns:
      ``(eps (B, h, w, C) float32, aux)``: ``e_u + s (e_c - e_u)`` (then rescaled, see
      :func:`sample`) with the UNet run once on ``[uncond; cond]`` (diffusers' order).
    """
    b = x_in.shape[0]
    if uncond is not None:
        x_in = jnp.concatenate([x_in, x_in], axis=0)
        ctx = jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c], axis=0),
                                     uncond, cond)
    else:
        ctx = cond
    eps, aux = unet_fn(x_in, jnp.broadcast_to(t, (x_in.shape[0],)), ctx, policy, i)
    eps = eps.astype(jnp.float32)
    if uncond is not None:
        e_u, e_c = eps[:b], eps[b:]
        eps = e_u + guidance_scale * (e_c - e_u)
        eps = _rescale_cfg(eps, e_c, guidance_rescale)
    return eps, aux


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
    hooks: SamplerHooks | None = None,
) -> tuple[Array, Any]:
    """Run the denoising loop. Pure; call it under ``jax.jit``.

    Args:
      unet_fn: see :data:`UNetFn` (closes over the UNet params).
      schedule: from :func:`jattn.sampling.schedulers.make_schedule` (static kind/steps).
      latents: ``(B, h, w, C)`` initial latents already multiplied by
        ``schedule.init_noise_sigma`` (or the inverted latents for real-image editing).
      cond: ``(B, S, D)`` prompt embeddings, or a pytree of ``(B, ...)`` leaves handed to
        ``unet_fn`` as is (SDXL: ``{"context", "text_embeds", "time_ids"}``).
      uncond: negative/unconditional conditioning of ``cond``'s structure, or ``None`` for
        no CFG.
      guidance_scale: CFG scale (scalar or ``(B,)``), traced: changing it never recompiles.
      keys: ``(B,)`` PRNG keys, one per sample (stochastic schedulers fold in the step).
      policy: attention policy passed to every UNet call with the step index.
      aux_init / aux_update: in-graph aggregation of what the policy records:
        ``aux_update(acc, aux_of_this_step, i) -> acc``; ``acc`` starts as ``aux_init``.
      callback: per-step pure function on the carried state dict
        ``{"latents", "step", "x0", "aux"}`` returning the same structure (e.g. local blend,
        latent re-imposition).
      uncond_per_step: ``(n_steps, B, S, D)`` unconditional embeddings per step (null-text
        inversion), or ``uncond``'s pytree with a leading step axis on every leaf;
        overrides ``uncond``.
      guidance: a :class:`jattn.sampling.guidance.Guidance` (attention loss, gradient step
        on the latents before each denoising step where its step size is non-zero).
      guidance_rescale: phi in [0, 1], traced: the CFG output is rescaled to the standard
        deviation (over h, w, C) of the conditional output and mixed back,
        ``phi * cfg * std(cond) / std(cfg) + (1 - phi) * cfg`` (Lin et al. 2024, sec. 3.4,
        against over-exposure of zero-terminal-SNR models; diffusers' ``guidance_rescale``,
        ``rescale_noise_cfg``); 0 leaves CFG as is.
      hooks: :class:`SamplerHooks` (given per-step noise, start step); None or default
        fields: the plain loop.
    Returns:
      ``(final latents (B, h, w, C), aggregated aux)``.
    Raises:
      ValueError: ``hooks.start_step`` outside ``[0, n_steps)``; ``hooks.noise`` of the
        wrong shape, or given to a deterministic scheduler; ``hooks.reimpose`` /
        ``reimpose_rows`` of the wrong shape or one without the other.
    """
    do_cfg = uncond is not None or uncond_per_step is not None
    gs = jnp.asarray(guidance_scale, jnp.float32)
    if gs.ndim == 1:
        gs = gs[:, None, None, None]
    gr = jnp.asarray(guidance_rescale, jnp.float32)
    n = schedule.timesteps.shape[0]
    latents = latents.astype(jnp.float32)  # the carry stays float32 whatever the UNet dtype
    state0 = sch.init_state(schedule, latents)
    hooks = SamplerHooks() if hooks is None else hooks
    _check_hooks(hooks, schedule, latents)

    carries = guidance is not None and getattr(guidance, "carries_loss", False)

    def body(carry, i):
        if carries:  # guidance's per-sample loss persists across steps ("carried")
            x, state, acc, gl = carry
        else:
            x, state, acc = carry
        t = schedule.timesteps[i]
        if guidance is not None:
            from jattn.sampling.guidance import apply_guidance

            if carries:
                x, gl = jax.lax.cond(
                    guidance.step_size[i] != 0,
                    lambda z, l: apply_guidance(
                        guidance, unet_fn, lambda y: sch.scale_model_input(schedule, y, i),
                        z, t, cond, i, prev_loss=l),
                    lambda z, l: (z, l), x, gl)
            else:
                x = jax.lax.cond(
                    guidance.step_size[i] != 0,
                    lambda z: apply_guidance(guidance, unet_fn,
                                             lambda y: sch.scale_model_input(schedule, y, i),
                                             z, t, cond, i)[0],
                    lambda z: z, x)
        x_in = sch.scale_model_input(schedule, x, i)
        u = None
        if do_cfg:
            u = (jax.tree_util.tree_map(lambda a: a[i], uncond_per_step)
                 if uncond_per_step is not None else uncond)
        pre_acc = None
        if hooks.pre_policy is not None:  # pre-pass: records bound into the main pass
            pre0 = hooks.pre_policy.aux_init()
            w = jnp.asarray(hooks.pre_window, jnp.int32)

            def pre(a0):
                _, aux_p = guided_eps(unet_fn, x_in, t, cond, u, gs, gr, hooks.pre_policy, i)
                return hooks.pre_policy.aux_update(a0, aux_p, i)

            pre_acc = jax.lax.cond((i >= w[0]) & (i < w[1]), pre, lambda a0: a0, pre0)
        pol = _bind_policy(policy, acc, pre_acc)
        eps, aux = guided_eps(unet_fn, x_in, t, cond, u, gs, gr, pol, i)
        if hooks.second_scale is not None:  # second pass: eps_2 + s (eps - eps_2)
            s_i = hooks.second_scale[i]

            def second(e):
                e2, _ = guided_eps(unet_fn, x_in, t, cond, u, gs, gr, hooks.second_policy, i)
                return e2 + s_i * (e - e2)

            eps = jax.lax.cond(s_i != 1.0, second, lambda e: e, eps)
        noise = hooks.noise[i] if hooks.noise is not None else None
        x_new, state, x0 = sch.step(schedule, state, eps, i, x, key=_step_keys(keys, i),
                                    noise=noise)
        if aux_update is not None:
            acc = aux_update(acc, aux, i)
        if callback is not None:
            out = callback({"latents": x_new, "step": i, "x0": x0, "aux": acc})
            x_new, acc = out["latents"], out["aux"]
        if hooks.reimpose is not None:  # rows that follow a given trajectory
            rows = jnp.asarray(hooks.reimpose_rows, bool)[:, None, None, None]
            x_new = jnp.where(rows, hooks.reimpose[i].astype(x_new.dtype), x_new)
        if carries:
            return (x_new, state, acc, gl), None
        return (x_new, state, acc), None

    steps = jnp.arange(int(hooks.start_step), n)
    if carries:
        gl0 = jnp.full((latents.shape[0],), jnp.inf, jnp.float32)
        (x, _, acc, _), _ = jax.lax.scan(body, (latents, state0, aux_init, gl0), steps)
        return x, acc
    (x, _, acc), _ = jax.lax.scan(body, (latents, state0, aux_init), steps)
    return x, acc
