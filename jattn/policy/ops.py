"""Generic attention ops shared by the methods (one op with parameters per idea).

:class:`MemberSource` — **member sourcing** of queries, keys and/or values: at the sites it
is resolved to, member ``m`` of each group uses member ``table[m]``'s Q (K, V) of the same
group and CFG half, per step. It is what these methods do at self- or cross-attention:

* Cross-Image Attention (Alaluf, Garibi et al. SIGGRAPH 2024; garibida/cross-image-attention
  ``AppearanceTransferModel``): the output member takes the appearance member's K, V (the
  structure member's at some steps) on decoder self-attention;
* MasaCtrl (Cao et al. ICCV 2023; TencentARC/MasaCtrl ``MutualSelfAttentionControl``): every
  member's Q attends to member 0's K, V from a step on;
* Plug-and-Play (Tumanyan et al. CVPR 2023; MichalGeyer/pnp-diffusers): members take member
  0's Q and K (not V) during the first steps;
* prompt mixing (Patashnik et al. ICCV 2023; orpatashnik/local-prompt-mixing): in
  cross-attention, keys from the original prompt's member, values from a proxy's;
* Prompt-to-Prompt's self-attention replacement through Q and K.

Per-step tables are int32 arrays (dynamic leaves): new windows or sources never recompile.
Build them with :func:`member_table`.

Shapes: q ``(B, T, N, H)``, k and v ``(B, S, N, H)``; B = halves × G × M rows
(``Layout``), group-major, CFG halves ``[uncond; cond]``.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jattn.policy.core import Op, PolicyError, SiteContext

Array = jax.Array

__all__ = ["MemberSource", "member_table", "window_mask", "take_members", "HALVES", "Contrast", "contrast_probs",
           "masked_adain"]

HALVES = ("both", "cond", "uncond")


def member_table(num_steps: int, members: int, sources: Mapping[int, int], *,
                 window: tuple[float, float] | tuple[int, int] = (0.0, 1.0),
                 steps: np.ndarray | None = None) -> np.ndarray:
    """A per-step source table ``(num_steps, members)`` int32 for :class:`MemberSource`.

    Row ``i`` maps each member to the member it takes from at step ``i``: ``sources[m]``
    inside the window, ``m`` itself (no change) outside.

    Args:
      num_steps: denoising steps of the run.
      members: M, members per group.
      sources: ``{member: source member}``.
      window: ``(start, end)`` as fractions of the steps in [0, 1] (floats, ``int(f·n)`` as
        the references) or step indices (ints); steps ``start <= i < end``.
      steps: optional bool ``(num_steps,)`` that further selects steps (e.g. periodic
        steps), ANDed with the window.
    Raises:
      ValueError: members outside ``[0, M)``, a window outside [0, 1] / [0, num_steps].
    """
    n, m = int(num_steps), int(members)
    for k, v in sources.items():
        if not (0 <= int(k) < m and 0 <= int(v) < m):
            raise ValueError(f"sources={dict(sources)}: members must be in [0, {m})")
    on = window_mask(n, window, steps)
    table = np.tile(np.arange(m, dtype=np.int32), (n, 1))
    for k, v in sources.items():
        table[on, int(k)] = int(v)
    return table


def window_mask(num_steps: int, window: tuple[float, float] | tuple[int, int] = (0.0, 1.0),
                steps: np.ndarray | None = None) -> np.ndarray:
    """Bool ``(num_steps,)``: the steps ``start <= i < end`` of ``window`` (fractions in
    [0, 1] as floats, ``int(f·n)`` as the references, or step indices as ints), ANDed with
    ``steps`` when given.

    Raises:
      ValueError: a window outside [0, 1] / [0, num_steps] or with start > end.
    """
    n = int(num_steps)
    s0, s1 = window
    if isinstance(s0, float) or isinstance(s1, float):
        if not 0.0 <= s0 <= s1 <= 1.0:
            raise ValueError(f"window={window}: fractions need 0 <= start <= end <= 1")
        s0, s1 = int(s0 * n), int(s1 * n)
    elif not 0 <= s0 <= s1 <= n:
        raise ValueError(f"window={window}: step indices need 0 <= start <= end <= {n}")
    on = np.zeros(n, bool)
    on[s0:s1] = True
    if steps is not None:
        on &= np.asarray(steps, bool)
    return on


def take_members(ctx: SiteContext, x: Array, row: Array, halves: str = "both") -> Array:
    """Rows of ``x`` (batch-leading, ``halves × G × M`` rows) taken from other members:
    member ``m`` of every group gets member ``row[m]``'s rows of the same group and half,
    in the selected CFG halves (``"both"``, ``"cond"`` or ``"uncond"``)."""
    parts = ctx.layout.split(x)                           # (halves, G, M, …)
    taken = jnp.take(parts, row, axis=2)
    if halves == "both" or not ctx.layout.cfg:
        return ctx.layout.merge(taken)
    which = 1 if halves == "cond" else 0
    return ctx.layout.merge(parts.at[which].set(taken[which]))


@struct.dataclass
class MemberSource(Op):
    """Member sourcing of Q, K and/or V (replace; see the module docstring).

    Attributes:
      q_from, k_from, v_from: int32 ``(M,)`` (every step) or ``(n_steps, M)`` (per step; a
        step index past the table uses its last row) source member per member, or None
        (own). :func:`member_table` builds them.
      halves: static; which CFG halves are edited: ``"both"`` (each half from its own
        half, MasaCtrl), ``"cond"`` (the references that edit only the conditional half)
        or ``"uncond"``. Without CFG the single half is edited.
    Keeps the fused attention path (no probabilities are materialised).
    """

    q_from: Array | None = None
    k_from: Array | None = None
    v_from: Array | None = None
    halves: str = struct.field(pytree_node=False, default="both")

    def __post_init__(self):
        if self.halves not in HALVES:
            raise PolicyError(f"MemberSource.halves={self.halves!r}: use one of {HALVES}")

    def _row(self, table: Array, step: Array | None) -> Array:
        table = jnp.asarray(table, jnp.int32)
        if table.ndim == 1:
            return table
        i = 0 if step is None else jnp.clip(step, 0, table.shape[0] - 1)
        return table[i]

    def _apply(self, ctx: SiteContext, x: Array, table: Array | None) -> Array:
        if table is None:
            return x
        m = ctx.layout.members
        if table.shape[-1] != m:
            raise PolicyError(f"MemberSource table of shape {table.shape}: its last axis must "
                              f"be the {m} members of the layout")
        return take_members(ctx, x, self._row(table, ctx.step), self.halves)

    def qkv(self, ctx: SiteContext, q: Array, k: Array, v: Array):
        return (self._apply(ctx, q, self.q_from), self._apply(ctx, k, self.k_from),
                self._apply(ctx, v, self.v_from))


# ---------------------------------------------------------------------------------------
# Contrast of attention probabilities; AdaIN of latents inside masks (Cross-Image Attention)


def contrast_probs(p: Array, strength: Array | float, *, reference_quirks: bool = False
                   ) -> Array:
    """Attention contrast ``clip((p − mean)·strength + mean, 0, 1)``, no renormalisation.

    Source: Alaluf, Garibi et al., "Cross-Image Attention for Zero-Shot Appearance Transfer"
    (SIGGRAPH 2024), eq. 4; garibida/cross-image-attention ``utils/attention_utils.py``
    (``enhance_tensor``, clipped per head in ``compute_scaled_dot_product_attention``).

    Args:
      p: probabilities ``(…, T, S)`` (rows over the S keys sum to 1).
      strength: the contrast factor (the reference: 1.67); 1 leaves ``p`` (then clipped).
      reference_quirks: the reference takes ``mean(dim=-1)`` without keepdim, so the
        ``(T,)`` row means broadcast along the *last* axis: entry ``[i, j]`` uses the mean of
        row ``j``. Needs ``T == S`` (self-attention). Default: each row's own mean.
    Returns:
      ``(…, T, S)`` in ``p``'s dtype.
    Raises:
      ValueError: ``reference_quirks`` with ``T != S``.
    """
    pf = p.astype(jnp.float32)
    if reference_quirks:
        if p.shape[-1] != p.shape[-2]:
            raise ValueError(f"contrast_probs(reference_quirks=True): the reference's mean "
                             f"broadcast needs T == S, got {p.shape[-2:]}")
        mean = jnp.mean(pf, axis=-1)[..., None, :]                   # (…, 1, T): row j's mean at column j
    else:
        mean = jnp.mean(pf, axis=-1, keepdims=True)                  # (…, T, 1)
    s = jnp.asarray(strength, jnp.float32)
    return jnp.clip((pf - mean) * s + mean, 0.0, 1.0).astype(p.dtype)


def _member_rows(ctx: SiteContext, on_m: Array, halves: str) -> Array:
    """Bool ``(B,)`` over the batch rows: member ``m`` of every group where ``on_m[m]``, in
    the selected CFG halves."""
    lay = ctx.layout
    on = jnp.broadcast_to(jnp.asarray(on_m, bool)[None, None, :],
                          (lay.halves, lay.groups, lay.members))
    if lay.cfg and halves != "both":
        keep = jnp.arange(lay.halves) == (1 if halves == "cond" else 0)
        on = on & keep[:, None, None]
    return on.reshape(-1)


@struct.dataclass
class Contrast(Op):
    """Contrast the attention probabilities of chosen members (:func:`contrast_probs`).

    Cross-Image Attention contrasts the output member's map where its keys and values were
    swapped for the appearance member's (``edit_probs``, after the softmax).

    Attributes:
      strength: float32 ``()`` contrast factor (dynamic).
      members: bool ``(M,)`` or ``(n_steps, M)`` (per step; a step past the table uses its
        last row): which members are contrasted at each step.
      halves: static; CFG halves edited (``"both"``, ``"cond"``, ``"uncond"``).
      reference_quirks: static; the reference's mean broadcast (:func:`contrast_probs`).
    """

    strength: Array = struct.field(default_factory=lambda: jnp.float32(1.67))
    members: Array | None = None
    halves: str = struct.field(pytree_node=False, default="both")
    reference_quirks: bool = struct.field(pytree_node=False, default=False)

    needs_probs = True

    def __post_init__(self):
        if self.halves not in HALVES:
            raise PolicyError(f"Contrast.halves={self.halves!r}: use one of {HALVES}")

    def edit_probs(self, ctx: SiteContext, p: Array) -> Array:
        m = ctx.layout.members
        table = (jnp.ones((m,), bool) if self.members is None
                 else jnp.asarray(self.members, bool))
        if table.shape[-1] != m:
            raise PolicyError(f"Contrast.members of shape {table.shape}: its last axis must be "
                              f"the {m} members of the layout")
        if table.ndim == 2:
            i = 0 if ctx.step is None else jnp.clip(ctx.step, 0, table.shape[0] - 1)
            table = table[i]
        rows = _member_rows(ctx, table, self.halves)                  # (B,)
        edited = contrast_probs(p, self.strength, reference_quirks=self.reference_quirks)
        return jnp.where(rows[:, None, None, None], edited, p)


def masked_adain(content: Array, style: Array, content_mask: Array | None = None,
                 style_mask: Array | None = None, *, eps: float = 1e-5) -> Array:
    """AdaIN of ``content`` toward ``style`` with per-channel statistics inside masks.

    ``out = content·(1 − m_c) + ((content − μ_c) / σ_c · σ_s + μ_s)·m_c`` where μ, σ are the
    per-channel mean and ``sqrt(var + eps)`` (unbiased variance, torch's default) over the
    pixels inside each mask.

    Source: Huang & Belongie, "Arbitrary Style Transfer in Real-time with Adaptive Instance
    Normalization" (ICCV 2017); the masked form on latents of Cross-Image Attention
    (garibida/cross-image-attention ``utils/adain.py``: ``masked_adain``, ``calc_mean_std``).

    Args:
      content, style: ``(…, h, w, C)`` latents (NHWC), leading axes batched.
      content_mask, style_mask: ``(…, h, w)`` in {0, 1}, or None (every pixel: plain AdaIN).
      eps: added to the variance.
    Returns:
      ``(…, h, w, C)`` float32. Where a mask holds fewer than 2 pixels the content is
      returned unchanged (the reference would produce NaN from an empty selection).
    """
    x = content.astype(jnp.float32)
    y = style.astype(jnp.float32)
    ones = jnp.ones(x.shape[:-1], jnp.float32)
    mc = ones if content_mask is None else jnp.asarray(content_mask, jnp.float32)
    ms = jnp.ones(y.shape[:-1], jnp.float32) if style_mask is None else \
        jnp.asarray(style_mask, jnp.float32)

    def stats(z, m):
        n = jnp.sum(m, axis=(-2, -1))[..., None, None, None]        # (…, 1, 1, 1)
        mean = jnp.sum(z * m[..., None], axis=(-3, -2), keepdims=True) / jnp.maximum(n, 1.0)
        var = jnp.sum(((z - mean) ** 2) * m[..., None], axis=(-3, -2), keepdims=True) \
            / jnp.maximum(n - 1.0, 1.0)
        return mean, jnp.sqrt(var + eps), n

    mu_c, sd_c, n_c = stats(x, mc)
    mu_s, sd_s, n_s = stats(y, ms)
    moved = (x - mu_c) / sd_c * sd_s + mu_s
    out = x * (1.0 - mc[..., None]) + moved * mc[..., None]
    ok = (n_c >= 2) & (n_s >= 2)
    return jnp.where(ok, out, x)
