"""Ops of a per-step pre-pass: record Q/K/V in a UNet pass run before the main one, and
blend the main pass's Q/K/V toward them.

The sampler's pre-pass hook (:class:`jattn.sampling.sampler.SamplerHooks` ``pre_policy``,
``pre_window``) runs, at the steps of its window, a UNet pass with another policy on the
same latents before the main pass; what that pass records (its policy's
``aux_init``/``aux_update``, folded from the initial accumulators at each step) is handed to
the main policy's ops that have a ``bind_pre_aux(pre_acc)`` method, before the main UNet
call of the step. Outside the window the pre-pass does not run (``lax.cond``) and the
bound accumulators are the pre-policy's ``aux_init`` (zeros).

* :class:`RecordQKV` (pre-pass policy): records the final Q (K, V) of its sites,
  ``{site_path: {"q": (B, T, N, H) float32}}``.
* :class:`PrePassBlend` (main policy): ``x := w_i·x_pre + (1 − w_i)·x`` at the same site
  for Q (K, V), with a per-step weight ``w`` (0: unchanged, bit for bit) and the rows
  that blend.

ConsiStory (Tewel et al. SIGGRAPH 2024; NVlabs/consistory ``consistory_pipeline.py``: for
steps ``i <= n//10`` a vanilla UNet pass, no extended attention, caches the queries of
every decoder self-attention, ``QueryStore.cache_query``; the main pass then uses
``strength·q_vanilla + (1 − strength)·q`` where it extends attention,
``QueryStore.inject_query``, in both CFG halves of every image).

Shapes: q ``(B, T, N, H)``, k and v ``(B, S, N, H)``; B = halves × G × M rows (``Layout``).
Weights and row masks are dynamic leaves: new values never recompile.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jattn.policy.core import Layout, Op, PolicyError, SiteContext

Array = jax.Array

__all__ = ["RecordQKV", "PrePassBlend"]

_WHICH = ("q", "k", "v")


def _check_which(name: str, which: tuple) -> tuple:
    which = tuple(which)
    if not which or any(w not in _WHICH for w in which):
        raise PolicyError(f"{name}.which={which!r}: a non-empty tuple of 'q', 'k', 'v'")
    return which


@struct.dataclass
class RecordQKV(Op):
    """Record the final Q (and/or K, V) at each of its attention sites, all rows.

    Attributes:
      which: static; a tuple of ``"q"``, ``"k"``, ``"v"`` (default queries only).
    Accumulator: ``{site_path: {"q": (B, T, N, H) float32, …, "step": int32 ()}}``, zeros
    and step −1 at ``aux_init``; ``aux_update`` keeps the value of the latest UNet call (not
    a sum) and its step index.
    """

    which: tuple = struct.field(pytree_node=False, default=("q",))

    def __post_init__(self):
        object.__setattr__(self, "which", _check_which("RecordQKV", self.which))

    def record_qkv(self, ctx: SiteContext, q: Array, k: Array, v: Array) -> dict:
        got = {"q": q, "k": k, "v": v}
        return {w: got[w].astype(jnp.float32) for w in self.which}

    def aux_init(self, sites: Sequence, layout: Layout, context_tokens: int) -> Any:
        out = {}
        for s in sites:
            h, w = s.resolution
            t = h * w
            kv = t if s.kind == "self" else context_tokens
            shape = {"q": (layout.rows, t, s.num_heads, s.head_dim),
                     "k": (layout.rows, kv, s.num_heads, s.head_dim),
                     "v": (layout.rows, kv, s.num_heads, s.head_dim)}
            out[s.path] = {x: jnp.zeros(shape[x], jnp.float32) for x in self.which}
            out[s.path]["step"] = jnp.int32(-1)
        return out

    def aux_update(self, acc, per_site, step, sites):
        out = dict(acc)
        for path, rec in per_site.items():
            out[path] = {x: rec[x] for x in self.which}
            out[path]["step"] = jnp.asarray(step, jnp.int32)
        return out


@struct.dataclass
class PrePassBlend(Op):
    """``x := w·x_pre + (1 − w)·x`` for Q (K, V) with the pre-pass's value at the same site.

    Attributes:
      weight: float32 ``(n_steps,)`` (a step past the end uses the last entry) or ``()``:
        the pre-pass value's weight ``w``; where ``w == 0``, or where the pre-pass did not
        run at this step (outside its window), the input is returned unchanged (bit for
        bit).
      rows: bool ``(M,)`` or None (every member): the members that blend, in both CFG
        halves.
      op_index: static; the index of the :class:`RecordQKV` in the pre-pass policy's ops.
      which: static; what is blended (``("q",)``; each must be recorded by that op).
      pre: filled by :meth:`bind_pre_aux` (the sampler, before each main UNet call).
    Keeps the fused attention path.
    Raises:
      PolicyError: unbound (run without the sampler's pre-pass hook), a site the pre-pass
        did not record, a rows mask not of M members.
    """

    weight: Array
    rows: Array | None = None
    op_index: int = struct.field(pytree_node=False, default=0)
    which: tuple = struct.field(pytree_node=False, default=("q",))
    pre: Any = None

    def __post_init__(self):
        object.__setattr__(self, "which", _check_which("PrePassBlend", self.which))

    def bind_pre_aux(self, pre_acc: Sequence[Any]) -> "PrePassBlend":
        return self.replace(pre=pre_acc[self.op_index])

    def _apply(self, ctx: SiteContext, x: Array, name: str) -> Array:
        if self.pre is None:
            raise PolicyError("PrePassBlend is not bound: run it through jattn's sampler with "
                              "SamplerHooks(pre_policy=…) whose op "
                              f"{self.op_index} is a RecordQKV at the same sites")
        rec = self.pre.get(ctx.site.path) if isinstance(self.pre, dict) else None
        if rec is None or name not in rec:
            raise PolicyError(f"PrePassBlend at {ctx.site.path}: the pre-pass recorded no "
                              f"{name!r} there; give the pre-pass's RecordQKV the same sites")
        w = jnp.asarray(self.weight, jnp.float32)
        if w.ndim == 1:
            w = w[0 if ctx.step is None else jnp.clip(ctx.step, 0, w.shape[0] - 1)]
        src = rec[name]
        mixed = (w * src + (1.0 - w) * x.astype(jnp.float32)).astype(x.dtype)
        lay = ctx.layout
        on = jnp.ones((lay.members,), bool) if self.rows is None else jnp.asarray(self.rows, bool)
        if on.shape != (lay.members,):
            raise PolicyError(f"PrePassBlend.rows of shape {tuple(on.shape)}: expected (M,) = "
                              f"({lay.members},)")
        on = jnp.broadcast_to(on, (lay.halves, lay.groups, lay.members)).reshape(-1)
        now = jnp.int32(-2) if ctx.step is None else jnp.asarray(ctx.step, jnp.int32)
        on = on & (w != 0) & (rec["step"] == now)
        return jnp.where(on[:, None, None, None], mixed, x)

    def qkv(self, ctx: SiteContext, q: Array, k: Array, v: Array):
        got = {"q": q, "k": k, "v": v}
        for name in self.which:
            got[name] = self._apply(ctx, got[name], name)
        return got["q"], got["k"], got["v"]
