"""Blending a member's queries toward another member's, and tying members' latents.

Two generic ops that together give a "shadow" member: a member of the group that runs the
model without the method (plain attention at the sites where the others share) from the
same latents as the member it shadows, so that the others can read what the plain model
computes at a site *in the same UNet call*:

* :class:`TieLatents` (``on_step``): after every step member ``m`` takes member
  ``src[m]``'s latents, so at the next step the shadow's input is exactly the shadowed
  member's;
* :class:`MemberBlend` (``qkv``): member ``m``'s queries (keys, values) become ``w·x_src +
  (1 − w)·x_m`` with ``src = table[step, m]`` and a per-step weight ``w``.

ConsiStory (Tewel et al. SIGGRAPH 2024; NVlabs/consistory ``consistory_pipeline.py``:
for steps ``i <= n//10`` a vanilla UNet pass (no extended attention) caches the queries of
every decoder self-attention (``QueryStore.cache_query``), then the main pass uses
``strength·q_vanilla + (1 − strength)·q`` where it extends attention
(``QueryStore.inject_query``, strengths ``linspace(0.9, 0.81836735, n//10 + 1)``)). With a
shadow per member the vanilla queries are the shadow's at the same site and step: exact,
at the cost of a batch twice as large for the whole run (the reference pays one extra
UNet call on ``n//10 + 1`` steps).

Shapes: q, k, v ``(B, T, N, H)``; latents ``(R, h, w, C)`` with R = G·M (the sampler's
rows without the CFG doubling). Tables are int32 dynamic leaves: new tables or weights
never recompile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jattn.policy.core import Layout, Op, PolicyError, SiteContext
from jattn.policy.ops import HALVES, _member_rows, take_members

Array = jax.Array

__all__ = ["MemberBlend", "TieLatents"]


def _row(table: Array, step: Array | None) -> Array:
    t = jnp.asarray(table)
    if t.ndim == 1:
        return t
    i = 0 if step is None else jnp.clip(step, 0, t.shape[0] - 1)
    return t[i]


@struct.dataclass
class MemberBlend(Op):
    """``x_m := w·x_src + (1 − w)·x_m`` for Q, K and/or V, per member and step.

    Attributes:
      q_from, k_from, v_from: int32 ``(M,)`` or ``(n_steps, M)`` source member per member
        (``m`` itself: unchanged, bit for bit), or None (untouched);
        :func:`jattn.policy.ops.member_table` builds them.
      weight: float32 ``()`` or ``(n_steps,)``: the source's weight ``w`` (a step past the
        table uses its last entry).
      halves: static; the CFG halves edited (``"both"`` as ConsiStory).
    Keeps the fused attention path.
    Raises:
      PolicyError: bad halves, a table whose last axis is not M.
    """

    q_from: Array | None = None
    k_from: Array | None = None
    v_from: Array | None = None
    weight: Array = struct.field(default_factory=lambda: jnp.float32(1.0))
    halves: str = struct.field(pytree_node=False, default="both")

    def __post_init__(self):
        if self.halves not in HALVES:
            raise PolicyError(f"MemberBlend.halves={self.halves!r}: use one of {HALVES}")

    def _apply(self, ctx: SiteContext, x: Array, table: Array | None) -> Array:
        if table is None:
            return x
        m = ctx.layout.members
        if table.shape[-1] != m:
            raise PolicyError(f"MemberBlend table of shape {tuple(table.shape)}: its last axis "
                              f"must be the {m} members of the layout")
        row = _row(jnp.asarray(table, jnp.int32), ctx.step)
        w = jnp.asarray(self.weight, jnp.float32)
        if w.ndim == 1:
            w = w[0 if ctx.step is None else jnp.clip(ctx.step, 0, w.shape[0] - 1)]
        src = take_members(ctx, x, row)
        mixed = (w * src.astype(jnp.float32) + (1.0 - w) * x.astype(jnp.float32)).astype(x.dtype)
        on = _member_rows(ctx, row != jnp.arange(m), self.halves)
        return jnp.where(on[:, None, None, None], mixed, x)

    def qkv(self, ctx: SiteContext, q: Array, k: Array, v: Array):
        return (self._apply(ctx, q, self.q_from), self._apply(ctx, k, self.k_from),
                self._apply(ctx, v, self.v_from))


@struct.dataclass
class TieLatents(Op):
    """After every step, member ``m``'s latents := member ``source[m]``'s (``m`` itself:
    unchanged). Acts only through ``on_step``; at its sites it changes nothing.

    Attributes:
      source: int32 ``(M,)``.
    """

    source: Array

    def on_step(self, latents: Array, acc, step: Array, layout: Layout) -> Array:
        g, m = layout.groups, layout.members
        src = jnp.asarray(self.source, jnp.int32)
        if src.shape != (m,):
            raise PolicyError(f"TieLatents.source of shape {tuple(src.shape)}: expected (M,) "
                              f"= ({m},)")
        x = latents.reshape((g, m) + latents.shape[1:])
        return jnp.take(x, src, axis=1).reshape(latents.shape)
